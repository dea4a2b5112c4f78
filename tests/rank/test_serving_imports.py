"""Serving modules never import torch (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

SERVING_MODULES = (
    "rank_service",
    "rank_service.config",
    "rank_service.features",
    "rank_service.runtime",
    "recsys.serving.batching",
    "rank_service.candidates",
    "rank_service.servicer",
    "rank_service.server",
    "rank_service.__main__",
    "rank_service.evaluate",
)


def test_serving_modules_do_not_import_torch():
    code = (
        "import sys, importlib\n"
        f"for name in {SERVING_MODULES!r}: importlib.import_module(name)\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == ""
