"""`recsys bench report`: the README's Performance section comes from the benchmark JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recsys.app import bench_report
from recsys.app.e2e_bench import combine_repeats, passes, summarise

MACHINE = {"cpu": "Test CPU", "cores": 2, "python": "3.11"}


def run(rate: float, p99: float, errors: int = 0, degraded: float = 0.0, cpu: float = 5.0) -> dict:
    return {
        "rate": rate,
        "errors": errors,
        "degraded_share": degraded,
        "latency_ms": {"p50": p99 / 3, "p95": p99 / 1.5, "p99": p99},
        "cpu_ms_per_request": {"total": cpu},
    }


def e2e_report() -> dict:
    runs = {
        "grpc": {"home": [run(50, 20), run(200, 30, cpu=6.0), run(400, 300, errors=3)]},
        "inprocess": {"home": [run(50, 10), run(200, 15, cpu=4.0), run(400, 60)]},
        "grpc_per_call": {"home": [run(50, 20), run(200, 60, cpu=7.5), run(400, 900, errors=40)]},
        "grpc_event_engine": {"home": [run(50, 20), run(200, 40, cpu=6.5), run(400, 400, errors=9)]},
    }
    return {
        "command": "recsys bench e2e",
        "machine": MACHINE,
        "settings": {"users": 1000, "deadline_ms": 500, "duration_s": 10, "saturation": "x"},
        "runs": runs,
        "summary": summarise(
            runs, ["grpc", "inprocess", "grpc_per_call", "grpc_event_engine"], ["home"], 100.0
        ),
    }


def test_saturation_is_the_highest_rate_meeting_every_criterion():
    summary = e2e_report()["summary"]
    assert summary["saturation_rps"] == {
        "grpc": {"home": 200},
        "inprocess": {"home": 400},
        "grpc_per_call": {"home": 200},
        "grpc_event_engine": {"home": 200},
    }
    assert not passes(run(100, 50, degraded=0.02), 100.0)
    bars = summary["bars"]
    assert not bars["home_at_200"]["met"] and bars["home_at_200"]["p99_ms"] == 30
    assert bars["cpu_ms_per_request_at_200"] == {"value": 6.0, "met": False}
    assert summary["grpc_over_inprocess"]["home"]["200"]["cpu_per_request"] == 1.5
    assert summary["grpc_over_grpc_per_call"]["home"]["200"] == {
        "p50": 0.5,
        "p99": 0.5,
        "cpu_per_request": 0.8,
    }
    assert summary["grpc_over_grpc_event_engine"]["home"]["200"] == {
        "p50": 0.75,
        "p99": 0.75,
        "cpu_per_request": 0.92,
    }


def test_the_readme_section_is_replaced_between_its_markers(tmp_path: Path):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "e2e.json").write_text(json.dumps(e2e_report()))
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# x\n\n## Performance\n{bench_report.BEGIN}\nold numbers\n{bench_report.END}\n\n## Next\n"
    )
    assert bench_report.main(["--bench", str(bench), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old numbers" not in text and text.endswith("## Next\n")
    assert "| grpc | home | 200 | 10.0 | 20.0 | 30.0 | 0 | 0.0% | 6.00 |" in text
    assert "| CPU per request at 200 req/s | <= 4 ms | 6.00 ms | **not met** |" in text
    assert "batch calls (grpc over grpc_per_call, same run, same rates): home 50 req/s CPU 1.00x" in text
    assert "home 200 req/s CPU 0.80x, p50 0.50x, p99 0.50x" in text
    assert (
        "gRPC I/O setting (grpc over grpc_event_engine, same run, same rates): home 50 req/s CPU 1.00x"
        in text
    )
    assert "home 200 req/s CPU 0.92x, p50 0.75x, p99 0.75x" in text
    assert "Test CPU, 2 cores" in text


def test_a_readme_without_markers_is_refused(tmp_path: Path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="generated-section markers"):
        bench_report.update_readme(readme, "body")


def test_a_benchmark_without_json_keeps_its_published_subsection(tmp_path: Path):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "e2e.json").write_text(json.dumps(e2e_report()))
    readme = tmp_path / "README.md"
    published = (
        f"{bench_report.E2E_HEADING}\n\nstale e2e numbers\n\n"
        f"{bench_report.ANN_HEADING}\n\n| published ANN row |\n"
    )
    readme.write_text(f"# x\n{bench_report.BEGIN}\n{published}{bench_report.END}\n")
    assert bench_report.main(["--bench", str(bench), "--readme", str(readme)]) == 0
    section = bench_report.current_section(readme)
    assert "stale e2e numbers" not in section  # replaced by the new e2e.json
    assert "| grpc | home | 200 | 10.0 | 20.0 | 30.0 | 0 | 0.0% | 6.00 |" in section
    assert "| published ANN row |" in section  # no ann.json: the README's ANN subsection stays
    assert section.index(bench_report.E2E_HEADING) < section.index(bench_report.ANN_HEADING)
    assert bench_report.RANK_HEADING not in section  # never published, no JSON: absent


def test_the_cpu_breakdown_is_reported_per_scenario_and_thread(tmp_path: Path):
    bench = tmp_path / "bench"
    bench.mkdir()
    top = [{"function": "rules.py:55 diversify", "own_share": 0.031, "own_us_per_request": 230.0}]
    cpu = {
        "command": "recsys bench cpu",
        "machine": MACHINE,
        "scenarios": {
            "home": {
                "cpu_ms_per_request": 5.1,
                "cpu_ms_per_request_by_thread": {"MainThread": 2.0, "recall-batch_0": 1.7},
                "top_functions_event_loop": top,
            }
        },
    }
    (bench / "cpu.json").write_text(json.dumps(cpu))
    body = bench_report.render(bench, tmp_path)
    assert body.startswith(bench_report.CPU_HEADING)
    assert "| home | 5.10 | MainThread 2.00, recall-batch_0 1.70 |" in body
    assert "`rules.py:55 diversify` 3.1%" in body


def test_the_grpc_hop_floor_is_reported_with_the_cascades_share(tmp_path: Path):
    bench = tmp_path / "bench"
    bench.mkdir()
    hop = {
        "rate": 200.0,
        "bytes": 12000,
        "server_cpu_ms_per_call": 0.6,
        "client_cpu_ms_per_call": 0.5,
        "grpc": "1.x",
    }
    cpu = {"command": "recsys bench cpu", "machine": MACHINE, "scenarios": {}, "grpc_hop_floor": [hop]}
    (bench / "cpu.json").write_text(json.dumps(cpu))
    body = bench_report.render(bench, tmp_path)
    assert "12,000-byte messages: server 0.60 + client 0.50 ms" in body
    assert "grpc 1.x, asyncio loop" in body  # reports before the loop was recorded: the standard one
    assert "~2.8 ms of its CPU is this floor" in body  # 0.6 public + 2 x (0.6 + 0.5)


def test_an_ann_row_no_peer_reaches_says_how_far_each_peer_got(tmp_path: Path):
    bench = tmp_path / "bench"
    bench.mkdir()
    curve = {"k": 200, "batch": 1, "points": [{"value": 200, "recall": 0.57}, {"value": 800, "recall": 0.68}]}
    dataset = {
        "num_vectors": 12101,
        "dim": 64,
        "indexes": {"default": {"factory": "Flat", "build_s": 0.0}, "hnswlib": {"curves": [curve]}},
        "summary": [
            {"k": 200, "batch": 1, "default": {"value": None, "recall": 1.0, "qps": 8000.0},
             "best_peer": None, "bar_met": True}
        ],
    }  # fmt: skip
    ann = {"command": "recsys bench ann", "machine": MACHINE, "settings": {}, "datasets": {"bundle": dataset}}
    (bench / "ann.json").write_text(json.dumps(ann))
    body = bench_report.render(bench, tmp_path)
    assert "| exact, 1.000, 8,000 | none reaches the target (best recall: hnswlib 0.680) | met |" in body


def test_e2e_bench_refuses_an_unknown_stack_before_building_anything(tmp_path):
    from recsys.app.e2e_bench import build_parser, start_stacks

    args = build_parser().parse_args(["--artifacts", str(tmp_path / "artifacts"), "--stacks", "grpc,nope"])
    with pytest.raises(
        SystemExit, match="unknown stacks \\['nope'\\]; known: \\['grpc', 'grpc_per_call', 'inprocess', "
    ):
        start_stacks(args, tmp_path)
    assert not (tmp_path / "artifacts").exists()


def repeat_result(
    latencies: list[float], cpu: float, errors: int = 0, outcomes: dict | None = None, sent: int = 100
) -> dict:
    return {
        "rate": 200.0,
        "requests": len(latencies),
        "sent": sent,
        "achieved_rps": 200.0,
        "errors": errors,
        "error_share": errors / len(latencies),
        "degraded_share": 0.0,
        "degraded_reasons": {},
        "outcomes": outcomes or {"ok": len(latencies)},
        "loadgen_cpu_ms_per_request": 0.8,
        "latency_ms": {
            "p50": float(np.percentile(latencies, 50)),
            "p99": float(np.percentile(latencies, 99)),
        },
        "latency_samples_ms": latencies,
        "cpu_ms_per_request": {"recall": cpu / 2, "gateway": cpu / 2, "total": cpu},
    }


def test_repeated_runs_pool_their_requests_and_keep_each_repeat():
    fast = [10.0] * 100
    slow = [10.0] * 90 + [500.0] * 10  # one bad repeat: its tail is the pooled tail
    combined = combine_repeats(
        [
            repeat_result(fast, 6.0),
            repeat_result(slow, 7.0, errors=4, outcomes={"ok": 96, "DEADLINE_EXCEEDED": 4}, sent=200),
            repeat_result(fast, 6.5, sent=100),
        ]
    )
    assert combined["latency_ms"]["p50"] == 10.0 and combined["latency_ms"]["p99"] == 500.0
    assert combined["latency_ms"]["max"] == 500.0
    assert combined["cpu_ms_per_request"]["total"] == round((6.0 * 100 + 7.0 * 200 + 6.5 * 100) / 400, 3)
    assert combined["errors"] == 4 and not passes(combined, 1000.0)  # any repeat's error counts
    assert combined["error_share"] == round(4 / 300, 4) and combined["requests"] == 300
    assert combined["outcomes"] == {"ok": 296, "DEADLINE_EXCEEDED": 4}
    assert [r["p99"] for r in combined["repeats"]] == [10.0, 500.0, 10.0]
    assert "latency_samples_ms" not in combined
    single = combine_repeats([repeat_result(fast, 6.0)])
    assert "latency_samples_ms" not in single and single["latency_ms"]["p99"] == 10.0


def test_repeats_without_samples_report_the_median_of_each_percentile():
    runs = [repeat_result([float(v)] * 10, 6.0) for v in (10, 30, 20)]
    for run in runs:
        del run["latency_samples_ms"]
    assert combine_repeats(runs)["latency_ms"] == {"p50": 20.0, "p99": 20.0}


def test_the_readme_table_shows_the_range_of_repeated_runs(tmp_path: Path):
    report = e2e_report()
    report["settings"]["repeats"] = 3
    grpc_200 = report["runs"]["grpc"]["home"][1]
    grpc_200["repeats"] = [
        {"p50": 10, "p99": p99, "errors": 0, "degraded_share": 0.0, "cpu_ms_per_request": cpu}
        for p99, cpu in ((30.0, 6.0), (25.5, 5.5), (41.0, 6.75))
    ]
    lines = bench_report.e2e_section(report, None)
    assert "| grpc | home | 200 | 10.0 | 20.0 | 30.0 (25.5-41.0) | 0 | 0.0% | 6.00 (5.50-6.75) |" in lines
    assert any("3 times each, their requests pooled" in line for line in lines)


def test_the_host_calibration_at_both_ends_of_a_sweep_is_reported():
    report = e2e_report()
    assert not any("Host speed" in line for line in bench_report.e2e_section(report, None))  # none run
    report["host_calibration"] = {"what": "x", "before_ms": 3.9, "after_ms": 5.85}
    (header,) = [line for line in bench_report.e2e_section(report, None) if "Host speed" in line]
    assert "3.90 ms before the sweep, 5.85 ms after (1.50x)" in header
    report["host_calibration"]["after_ms"] = None  # the second calibration failed
    assert not any("Host speed" in line for line in bench_report.e2e_section(report, None))


ZEN1_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 2
flags\t\t: fpu sse2 avx fma avx2 bmi2 sha_ni

processor\t: 1
model name\t: Another CPU
flags\t\t: avx512f avx512_bf16
"""


def test_the_machine_record_names_the_cpu_generation_and_its_vector_units(tmp_path: Path):
    from recsys.timing import cpu_description

    description = cpu_description(ZEN1_CPUINFO)
    assert description == {
        "cpu": "AMD EPYC",
        "cpu_family_model_stepping": "23/1/2",
        "vector_flags": ["avx2", "fma"],  # the first processor's block only; no bf16 units
    }
    arm = cpu_description("processor\t: 0\nmodel name\t: ARMv8 Processor\nFeatures\t: fp asimd\n")
    assert arm == {"cpu": "ARMv8 Processor", "cpu_family_model_stepping": "", "vector_flags": []}
    cpu = {"command": "recsys bench cpu", "machine": {**MACHINE, **description}, "scenarios": {}}
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "cpu.json").write_text(json.dumps(cpu))
    body = bench_report.render(bench, tmp_path)
    assert "AMD EPYC (family/model/stepping 23/1/2), avx2 fma, 2 cores" in body


def test_the_requests_per_internal_call_are_read_off_the_gateways_metrics():
    from prometheus_client import CollectorRegistry

    from gateway.metrics import downstream_call_size
    from recsys.app.e2e_bench import calls_between, scrape_downstream_calls
    from recsys.serving.metrics import MetricsHttpServer

    registry = CollectorRegistry()
    recall, rank = downstream_call_size(registry, "recall"), downstream_call_size(registry, "rank")
    server = MetricsHttpServer("127.0.0.1", 0, registry)
    try:
        assert scrape_downstream_calls(server.port) == {"recall": (0.0, 0.0), "rank": (0.0, 0.0)}
        for size in (1, 1, 4):
            recall(size)
        before = scrape_downstream_calls(server.port)
        for size in (2, 3, 1):
            recall(size)
        rank(6)
        after = scrape_downstream_calls(server.port)
    finally:
        server.close()
    assert before == {"recall": (3.0, 6.0), "rank": (0.0, 0.0)}
    assert calls_between(before, after) == {
        "rank": {"calls": 1, "requests": 6, "requests_per_call": 6.0},
        "recall": {"calls": 3, "requests": 6, "requests_per_call": 2.0},
    }
    assert calls_between(after, after)["rank"]["requests_per_call"] is None  # no call meanwhile
    assert scrape_downstream_calls(server.port, timeout_s=1.0) == {}  # closed: nothing, no error


def test_repeats_pool_the_cpu_by_thread_and_the_internal_calls():
    first, second = repeat_result([10.0] * 100, 6.0, sent=100), repeat_result([10.0] * 100, 7.0, sent=300)
    first["cpu_ms_per_request_by_thread"] = {"recall": {"recall-batch": 1.0, "main": 0.5}}
    second["cpu_ms_per_request_by_thread"] = {"recall": {"recall-batch": 2.0, "python": 0.4}}
    first["downstream_calls"] = {"recall": {"calls": 80, "requests": 100, "requests_per_call": 1.25}}
    second["downstream_calls"] = {"recall": {"calls": 120, "requests": 300, "requests_per_call": 2.5}}
    combined = combine_repeats([first, second])
    assert combined["cpu_ms_per_request_by_thread"] == {
        "recall": {"recall-batch": 1.75, "python": 0.3, "main": 0.125}  # weighted by requests sent
    }
    assert combined["downstream_calls"] == {
        "recall": {"calls": 200, "requests": 400, "requests_per_call": 2.0}
    }
    del second["downstream_calls"]  # a stack whose gateway makes no calls in one repeat: not pooled
    assert "downstream_calls" not in combine_repeats([first, second])


def test_the_readme_shows_where_the_grpc_stacks_cpu_goes_when_recorded():
    report = e2e_report()
    assert not any("requests per call" in line for line in bench_report.e2e_section(report, None))
    grpc_200 = report["runs"]["grpc"]["home"][1]
    grpc_200["cpu_ms_per_request_by_thread"] = {
        "recall": {"recall-batch": 1.07, "main": 0.7, "event_engine": 0.006},
        "rank": {"rank-batch": 0.94, "main": 0.75},
        "gateway": {"main": 2.23, "python": 0.22},
    }
    grpc_200["downstream_calls"] = {
        "recall": {"calls": 10, "requests": 13, "requests_per_call": 1.3},
        "rank": {"calls": 0, "requests": 0, "requests_per_call": None},
    }
    lines = bench_report.e2e_section(report, None)
    assert "| scenario | rate req/s | recall | rank | gateway | requests per call (recall / rank) |" in lines
    row = "| home | 200 | recall-batch 1.07, main 0.70 | rank-batch 0.94, main 0.75 | main 2.23, python 0.22 "
    assert row + "| 1.30 / — |" in lines  # threads under 0.01 ms left out; no rank calls: a dash
