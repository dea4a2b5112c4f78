"""`recsys bench ann` end to end on a tiny setting: JSON keys, plots, peers skipped with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recall_service import ann_bench

TINY = ["--num-vectors", "5000", "--queries", "50", "--k", "100", "--batch", "1,8", "--threads", "1"]


def run_bench(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "ann.json"
    assert ann_bench.main([*TINY, "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_clustered_vectors_are_unit_rows_around_shared_centres() -> None:
    vectors = ann_bench.clustered_vectors(2_000, 16, centres=10, spread=0.3, seed=0)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Clustered, not isotropic: each point's nearest other point is far closer than a random one.
    similarities = vectors[:100] @ vectors.T
    np.fill_diagonal(similarities[:, :100], -1.0)
    assert np.median(similarities.max(axis=1)) > 0.8 > np.median(similarities) + 0.5


def test_bench_writes_json_and_plots_and_skips_missing_peers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(ann_bench.PEER_MODULES, "usearch", "usearch_not_installed_here")
    report = run_bench(tmp_path)
    for key in ("command", "machine", "threads", "versions", "settings", "datasets"):
        assert key in report
    assert {"cpu", "cores", "python"} <= set(report["machine"])
    clustered = report["datasets"]["clustered"]
    assert clustered["num_vectors"] == 5000 and clustered["queries"] == 50
    assert "held-out" in clustered["query_source"]
    indexes = clustered["indexes"]
    assert "not installed" in indexes["usearch"]["skipped"]
    default = indexes["default"]
    assert default["factory"] == "Flat"  # 5,000 items: exact search, nothing to tune
    assert default["tuning"]["tuned"] is False
    for name in ("default", "faiss-hnsw", "hnswlib"):
        if "skipped" in indexes[name]:
            continue
        report_ = indexes[name]
        assert report_["build_s"] >= 0 and report_["index_bytes"] > 0 and "rss_delta_bytes" in report_
        curves = {(c["k"], c["batch"]) for c in report_["curves"]}
        assert curves == {(100, 1), (100, 8)}
        for curve in report_["curves"]:
            for point in curve["points"]:
                assert 0.0 <= point["recall"] <= 1.0 and point["qps"] > 0
                assert point["latency_ms"]["samples"] > 0
    assert indexes["default"]["curves"][0]["points"][0]["recall"] == 1.0  # exact
    summary = {(row["k"], row["batch"]): row for row in clustered["summary"]}
    assert set(summary) == {(100, 1), (100, 8)}
    for row in summary.values():
        assert row["default"]["recall"] >= 0.95 and isinstance(row["bar_met"], bool)
        assert row["best_peer"] is None or row["best_peer"]["library"] in ("faiss-hnsw", "hnswlib")
    for plot in clustered["plots"]:
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(clustered["plots"]) == 2  # one per batch size


def test_bench_on_a_bundle_tunes_an_ivf_default_and_falls_back_to_item_queries(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    vectors = ann_bench.clustered_vectors(3_000, 16, centres=30, spread=0.3, seed=1)
    np.save(bundle / "item_vectors.npy", vectors)
    (bundle / "manifest.json").write_text(json.dumps({"dataset": "tiny", "index_factory": "Flat"}))
    report = run_bench(
        tmp_path,
        "--num-vectors",
        "0",
        "--bundle",
        str(bundle),
        "--libraries",
        "default",
        "--default-factory",
        "IVF32,Flat",
        "--tune-min-items",
        "1000",
    )
    assert "clustered" not in report["datasets"]
    result = report["datasets"]["bundle"]
    assert result["num_vectors"] == 3000 and result["dim"] == 16
    # No user tower in this bundle: queries fall back to noisy item copies, and the JSON says so.
    assert "user vectors unavailable" in result["query_source"]
    assert "noisy copies" in result["query_source"]
    default = result["indexes"]["default"]
    tuning = default["tuning"]
    assert tuning["tuned"] and tuning["parameter"] == "nprobe" and tuning["recall"] >= 0.95
    row = result["summary"][0]
    assert row["default_tuned"]["value"] == tuning["value"]
    assert row["best_peer"] is None and row["bar_met"] is True  # no peer ran
