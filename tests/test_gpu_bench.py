"""`recsys bench gpu` on a host without a GPU: each part says why it was skipped, exit 0."""

from __future__ import annotations

import json

import pytest

from recsys.app import gpu_bench


def test_gpu_bench_reports_skipped_parts_without_a_gpu(tmp_path, capsys) -> None:
    from rank_service.runtime import gpu_available
    from recall_service.index import cupy_gpu_available

    if gpu_available() or cupy_gpu_available():
        pytest.skip("this host has a GPU: `make gpu-check` runs the real benchmark")
    out = tmp_path / "gpu.json"
    assert gpu_bench.main(["--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert "CUDAExecutionProvider" in report["rank"]["skipped"]
    assert "CuPy" in report["recall"]["skipped"]
    assert json.loads(capsys.readouterr().out) == report
