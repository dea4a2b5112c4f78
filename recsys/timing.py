"""Timing helpers every benchmark uses: latency summaries, timed and interleaved calls, and the
machine record a benchmark JSON carries. Core: imported by the services' own benchmarks and by
the application layer's `recsys bench` dispatcher."""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np


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


def _stat_cpu_seconds(stat: Path) -> float:
    """utime + stime of a /proc ``stat`` file, in seconds."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds, all threads, process ``pid`` has used so far (Linux /proc)."""
    return _stat_cpu_seconds(Path(f"/proc/{pid}/stat"))


MAIN_THREAD = "main"


def thread_cpu_seconds(pid: int, names: Mapping[int, str] | None = None) -> dict[str, float]:
    """CPU seconds each thread of process ``pid`` has used so far, by name: ``names[thread id]``
    where given, else the kernel's thread name, the main thread (where the services run their
    event loop) as ``"main"``; threads of one name summed, threads that ended meanwhile left out.
    Linux /proc."""
    names = names or {}
    seconds: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = names.get(int(task.name)) or (
                MAIN_THREAD if task.name == str(pid) else (task / "comm").read_text().strip()
            )
            used = _stat_cpu_seconds(task / "stat")
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended between the listing and the read
        seconds[name] = seconds.get(name, 0.0) + used
    return seconds


def report_json(report: object, out: Path | None = None) -> None:
    """Print a benchmark's JSON report, and write it to ``out`` (its folder created) when given."""
    text = json.dumps(report, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
    print(text)


# The /proc/cpuinfo flags that decide how fast this code's numeric kernels run: the widest
# vector unit and the low-precision matmul units (bf16 training pays only with the last three).
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_description(cpuinfo: str) -> dict[str, object]:
    """The CPU's model name, family/model/stepping and :data:`VECTOR_FLAGS` it has, read from the
    text of /proc/cpuinfo (a virtual machine's model name alone, e.g. "AMD EPYC", hides which
    generation ran the benchmark)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            break  # the first processor's block describes them all
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    identity = "/".join(fields.get(key, "?") for key in ("cpu family", "model", "stepping"))
    return {
        "cpu": fields.get("model name", ""),
        # absent where /proc/cpuinfo has no x86 family (e.g. ARM)
        "cpu_family_model_stepping": identity if "cpu family" in fields else "",
        "vector_flags": [flag for flag in VECTOR_FLAGS if flag in flags],
    }


def machine_info() -> dict[str, object]:
    """What every benchmark JSON records about the machine it ran on."""
    try:
        description = cpu_description(Path("/proc/cpuinfo").read_text())
    except OSError:
        description = {}
    return {
        "platform": platform.platform(),
        **description,
        "cpu": description.get("cpu") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
    }
