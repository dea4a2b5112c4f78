"""`recsys bench rank|recall|gateway|gpu|all ...`: the benchmark commands, each printing JSON.

``recsys bench COMPONENT ARGS`` forwards ARGS to that component's ``bench.main`` (imported only
then, so the gateway bench needs no torch). ``recsys bench all [--artifacts DIR] [--data NAME]
[--out FILE]`` runs every benchmark that can be imported and run here and merges their JSON
under the component names; one that fails is reported with its error instead of stopping the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import logging
import os
import platform
import random
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

BENCHMARKS: dict[str, str] = {
    "rank": "rank_service.bench:main",
    "recall": "recall_service.bench:main",
    "gateway": "gateway.bench:main",
    "gpu": "recsys.gpu_bench:main",
    "ann": "recall_service.ann_bench:main",
    "e2e": "recsys.e2e_bench:main",
}


def latency_summary(latencies_ms: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean/max of latencies in milliseconds (3 decimals) and the sample count."""
    if not len(latencies_ms):
        return {}
    values = np.asarray(latencies_ms, dtype=np.float64)
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 3),
        "p90_ms": round(float(np.percentile(values, 90)), 3),
        "p99_ms": round(float(np.percentile(values, 99)), 3),
        "mean_ms": round(float(values.mean()), 3),
        "max_ms": round(float(values.max()), 3),
        "samples": len(values),
    }


def time_calls(
    function: Callable[[], object], iterations: int, sync: Callable[[], None] | None = None, warmup: int = 20
) -> dict[str, float]:
    """Latency summary of ``function`` after ``warmup`` calls (``sync`` waits for a device after each)."""
    for _ in range(warmup):
        function()
    if sync:
        sync()
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        function()
        if sync:
            sync()
        samples.append((time.perf_counter() - started) * 1000.0)
    return latency_summary(samples)


def time_interleaved(
    functions: Mapping[str, Callable[[], object]],
    rounds: int,
    calls_per_round: int,
    warmup: int = 20,
    seed: int = 0,
    before_block: Mapping[str, Callable[[], None]] | None = None,
    sync: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, object]:
    """Time several variants fairly on a noisy machine: ``rounds`` rounds, in each of which every
    variant runs a block of ``calls_per_round`` timed calls, in an order shuffled per round
    (``random.Random(seed)``), so that load changes hit all variants alike.

    Every variant is first called ``warmup`` times. ``before_block[name]`` (untimed) runs before
    each of that variant's blocks and warmups, e.g. to set a thread count; ``sync`` waits for a
    device after each call. Returns ``results`` (:func:`latency_summary` of all
    ``rounds * calls_per_round`` calls per variant) and ``round_p50_ms`` (per variant, the median of
    each round's block, in round order: per-round ratios come from these).
    """
    names = list(functions)
    setups = before_block or {}
    for name in names:
        if name in setups:
            setups[name]()
        for _ in range(warmup):
            functions[name]()
        if sync:
            sync()
    shuffler = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in names}
    round_p50_ms: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        order = names.copy()
        shuffler.shuffle(order)
        for name in order:
            if name in setups:
                setups[name]()
            function, block = functions[name], []
            for _ in range(calls_per_round):
                started = clock()
                function()
                if sync:
                    sync()
                block.append((clock() - started) * 1000.0)
            samples[name].extend(block)
            round_p50_ms[name].append(float(np.median(block)))
    return {
        "rounds": rounds,
        "calls_per_round": calls_per_round,
        "order_seed": seed,
        "warmup": warmup,
        "results": {name: latency_summary(samples[name]) for name in names},
        "round_p50_ms": round_p50_ms,
    }


def machine_info() -> dict[str, object]:
    """What every benchmark JSON records about the machine it ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def _load(target: str):
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


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
                main = _load(target)
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
TOOLS: dict[str, str] = {"report": "recsys.bench_report:main"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    choices = [*BENCHMARKS, *TOOLS, "all"]
    if not argv or argv[0] not in choices:
        print(f"usage: recsys bench {{{','.join(choices)}}} [ARGS...]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    component, rest = argv[0], argv[1:]
    if component != "all":
        return int(_load({**BENCHMARKS, **TOOLS}[component])(rest) or 0)
    parser = argparse.ArgumentParser(prog="recsys bench all", description="run every benchmark, merge JSON")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--data", default="synthetic", help="dataset name under --artifacts")
    parser.add_argument("--out", type=Path, help="also write the merged JSON here")
    args = parser.parse_args(rest)
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    merged = run_all(args.artifacts, args.data)
    text = json.dumps(merged, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return (
        0
        if any(isinstance(v, dict) and "error" not in v and "skipped" not in v for v in merged.values())
        else 1
    )


if __name__ == "__main__":
    raise SystemExit(main())
