"""`recsys bench rank|recall|gateway|gpu|all ...`: the benchmark commands, each printing JSON.

``recsys bench COMPONENT ARGS`` forwards ARGS to that component's ``bench.main`` (imported only
then, so the gateway bench needs no torch). ``recsys bench all [--artifacts DIR] [--data NAME]
[--out FILE]`` runs every benchmark that can be imported and run here and merges their JSON
under the component names; one that fails is reported with its error instead of stopping the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import socket
import sys
import tempfile
import time
from pathlib import Path

from recsys.app import load_entry
from recsys.grpc_env import apply_serving_defaults
from recsys.timing import report_json

log = logging.getLogger(__name__)

BENCHMARKS: dict[str, str] = {
    "rank": "rank_service.bench:main",
    "recall": "recall_service.bench:main",
    "gateway": "gateway.bench:main",
    "gpu": "recsys.app.gpu_bench:main",
    "ann": "recall_service.ann_bench:main",
    "e2e": "recsys.app.e2e_bench:main",
    "cpu": "recsys.app.cpu_bench:main",
}


DEFAULT_GATEWAY = "127.0.0.1:50050"


def _reachable(address: str, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections at HOST:PORT."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def _component_args(component: str, artifacts: Path, data: str, out: Path) -> list[str]:
    """Arguments ``all`` gives each benchmark (the gateway bench targets a running gateway)."""
    if component == "gateway":
        return ["--gateway", DEFAULT_GATEWAY, "--out", str(out)]
    if component == "gpu":
        return ["--out", str(out)]
    return ["--artifacts", str(artifacts), "--data", data, "--out", str(out)]


def run_all(artifacts: Path, data: str) -> dict[str, object]:
    """Run every importable benchmark; ``{component: its JSON | {"error": ...}}``."""
    merged: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for component, target in BENCHMARKS.items():
            out = Path(scratch) / f"{component}.json"
            started = time.perf_counter()
            if component == "gateway" and not _reachable(DEFAULT_GATEWAY):
                merged[component] = {
                    "skipped": f"no gateway at {DEFAULT_GATEWAY}: start the stack with `make run`, "
                    "then `recsys bench gateway --gateway HOST:PORT`"
                }
                continue
            try:
                main = load_entry(target)
            except ImportError as error:
                merged[component] = {"skipped": f"cannot import {target}: {error}"}
                continue
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    code = main(_component_args(component, artifacts, data, out))
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except Exception as error:  # one failing benchmark must not lose the others' numbers
                log.exception("benchmark %s failed", component)
                merged[component] = {"error": f"{type(error).__name__}: {error}"}
                continue
            if code == 0 and out.is_file():
                merged[component] = json.loads(out.read_text())
            else:
                merged[component] = {"error": f"exit status {code}"}
            log.info("bench %s: %.1f s", component, time.perf_counter() - started)
    return merged


# Commands beside the benchmarks (not run by ``all``).
TOOLS: dict[str, str] = {"report": "recsys.app.bench_report:main"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The benchmarks' own gRPC clients (and the load generators they start) talk the way the
    # services do; a no-op when something imported grpc already.
    apply_serving_defaults()
    choices = [*BENCHMARKS, *TOOLS, "all"]
    if not argv or argv[0] not in choices:
        print(f"usage: recsys bench {{{','.join(choices)}}} [ARGS...]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    component, rest = argv[0], argv[1:]
    if component != "all":
        return int(load_entry({**BENCHMARKS, **TOOLS}[component])(rest) or 0)
    parser = argparse.ArgumentParser(prog="recsys bench all", description="run every benchmark, merge JSON")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--data", default="synthetic", help="dataset name under --artifacts")
    parser.add_argument("--out", type=Path, help="also write the merged JSON here")
    args = parser.parse_args(rest)
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    merged = run_all(args.artifacts, args.data)
    report_json(merged, args.out)
    return (
        0
        if any(isinstance(v, dict) and "error" not in v and "skipped" not in v for v in merged.values())
        else 1
    )


if __name__ == "__main__":
    raise SystemExit(main())
