"""`recsys bench`: one component forwards its arguments; `all` merges and survives failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys.app import bench


@pytest.fixture
def fake_benchmarks(monkeypatch):
    calls: dict[str, list[str]] = {}

    def fake(component: str, fail: bool = False):
        def main(argv: list[str]) -> int:
            calls[component] = argv
            if fail:
                raise RuntimeError("no stack running")
            out = Path(argv[argv.index("--out") + 1])
            out.write_text(json.dumps({"benchmark": component}))
            return 0

        return main

    # One fake per registered benchmark, so that adding one to BENCHMARKS needs no change here.
    functions = {target: fake(name, fail=name == "gateway") for name, target in bench.BENCHMARKS.items()}
    monkeypatch.setattr(bench, "load_entry", lambda target: functions[target])
    return calls


def test_single_component_gets_the_arguments(fake_benchmarks, tmp_path):
    out = tmp_path / "rank.json"
    assert bench.main(["rank", "--out", str(out), "--iterations", "5"]) == 0
    assert fake_benchmarks["rank"] == ["--out", str(out), "--iterations", "5"]


def test_all_merges_results_and_reports_failures(fake_benchmarks, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "_reachable", lambda address: True)
    out = tmp_path / "bench.json"
    assert bench.main(["all", "--artifacts", str(tmp_path), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert merged["rank"] == {"benchmark": "rank"} and merged["recall"] == {"benchmark": "recall"}
    assert merged["gpu"] == {"benchmark": "gpu"} and fake_benchmarks["gpu"][0] == "--out"
    assert "no stack running" in merged["gateway"]["error"]
    assert fake_benchmarks["rank"][:2] == ["--artifacts", str(tmp_path)]
    assert json.loads(capsys.readouterr().out) == merged


def test_all_skips_the_gateway_with_a_reason_when_none_is_running(fake_benchmarks, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_reachable", lambda address: False)
    out = tmp_path / "bench.json"
    assert bench.main(["all", "--artifacts", str(tmp_path), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert "make run" in merged["gateway"]["skipped"]
    assert "gateway" not in fake_benchmarks


def test_unknown_component_is_a_usage_error():
    assert bench.main(["disk"]) == 2
