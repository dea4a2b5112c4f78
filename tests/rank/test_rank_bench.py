"""`recsys bench rank`: variants timed interleaved (fake clock, recorded call order), new JSON keys.

No timing assertions: the durations below come from a fake clock.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys.timing import time_interleaved

DURATIONS_MS = {"eager": 8.0, "folded": 4.0, "served": 1.0}


def fake_variants(calls: list[str]) -> tuple[dict, object]:
    """Functions that record their name and advance a fake clock by their duration."""
    now = [0.0]

    def variant(name: str):
        def call() -> None:
            calls.append(name)
            now[0] += DURATIONS_MS[name] / 1000.0

        return call

    return {name: variant(name) for name in DURATIONS_MS}, lambda: now[0]


def test_variants_alternate_in_blocks_and_each_gets_rounds_times_calls_samples():
    calls: list[str] = []
    functions, clock = fake_variants(calls)
    blocks_before: list[str] = []
    before_block = {"eager": lambda: blocks_before.append("eager")}
    timing = time_interleaved(functions, 6, 4, warmup=2, seed=3, before_block=before_block, clock=clock)

    assert calls[:6] == ["eager", "eager", "folded", "folded", "served", "served"]  # warmup
    timed = calls[6:]
    assert len(timed) == 6 * 3 * 4
    blocks = [timed[i : i + 4] for i in range(0, len(timed), 4)]
    assert all(len(set(block)) == 1 for block in blocks)  # a block is one variant's calls
    rounds = [[block[0] for block in blocks[i : i + 3]] for i in range(0, len(blocks), 3)]
    assert all(sorted(order) == sorted(DURATIONS_MS) for order in rounds)
    assert len({tuple(order) for order in rounds}) > 1  # the order changes between rounds
    assert len(blocks_before) == 1 + 6  # before the warmup and before each of its blocks

    assert (timing["rounds"], timing["calls_per_round"], timing["order_seed"]) == (6, 4, 3)
    for name, duration in DURATIONS_MS.items():
        assert timing["results"][name]["samples"] == 6 * 4
        assert timing["round_p50_ms"][name] == pytest.approx([duration] * 6)


def test_ratios_are_taken_per_round_then_summarised():
    from rank_service.bench import ratio_summary

    round_p50_ms = {"eager": [8.0, 9.0, 30.0], "served": [2.0, 3.0, 5.0]}  # a noisy last round
    assert ratio_summary(round_p50_ms, "eager", "served") == {"median": 4.0, "min": 3.0, "max": 6.0}


def test_same_seed_same_order():
    orders = []
    for _ in range(2):
        calls: list[str] = []
        functions, clock = fake_variants(calls)
        time_interleaved(functions, 5, 1, warmup=0, seed=7, clock=clock)
        orders.append(calls)
    assert orders[0] == orders[1]


def test_bench_rank_writes_interleaved_results_and_ratios(rank_bundle: Path, tmp_path: Path, capsys):
    from rank_service.bench import main

    out = tmp_path / "rank.json"
    argv = ["--bundle", str(rank_bundle), "--history", "5", "--candidates", "8"]
    argv += ["--iterations", "4", "--calls-per-round", "2", "--warmup", "1", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report

    assert report["threads"] == 1
    assert report["interleaved"] == {"rounds": 2, "calls_per_round": 2, "order_seed": 0, "warmup": 1}
    results = report["results"]
    for name in ("torch_eager", "torch_folded", "ort_served_cpu_graph", "runtime_score_end_to_end"):
        assert results[name]["samples"] == 4 and results[name]["p99_ms"] >= results[name]["p50_ms"]
    # The folded model computes the model's scores (float32 rounding of the folded tables).
    assert results["torch_folded"]["max_abs_diff_vs_torch"] < 1e-3
    assert results["ort_served_cpu_graph"]["max_abs_diff_vs_torch"] < 1e-3
    for ratio in ("folding_gain", "runtime_gain", "served_vs_torch_eager"):
        summary = report["ratios"][ratio]
        assert set(summary) == {"median", "min", "max"}
        assert summary["min"] <= summary["median"] <= summary["max"]
    assert isinstance(report["speedup_served_vs_torch_eager"], float)
    assert isinstance(report["passes_bar"], bool)
