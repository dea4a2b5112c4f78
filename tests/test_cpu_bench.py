"""`recsys bench cpu`: CPU per thread by name, and the functions with the most own CPU time."""

from __future__ import annotations

import cProfile
import itertools
import threading
import time

import pytest

from recsys.app.cpu_bench import build_parser, thread_cpu_seconds, top_functions


def add_up(count: int) -> int:
    total = 0
    for value in range(count):
        total += value
    return total


def test_thread_cpu_is_reported_under_the_thread_name():
    before = thread_cpu_seconds()
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            add_up(10_000)

    worker = threading.Thread(target=busy, name="busy-worker")
    worker.start()
    try:  # read while it runs (a finished thread leaves /proc/self/task); a busy host may be slow
        deadline = time.monotonic() + 30
        seen = 0.0
        while seen <= 0.05 and time.monotonic() < deadline:
            time.sleep(0.05)
            seen = thread_cpu_seconds().get("busy-worker", 0.0)
    finally:
        stop.set()
        worker.join()
    assert seen > 0.05
    assert thread_cpu_seconds()["MainThread"] >= before["MainThread"]


def test_top_functions_rank_own_cpu_per_request():
    profile = cProfile.Profile(time.thread_time)
    profile.enable()
    for _ in range(4):
        add_up(300_000)
        sorted(range(1000))
    profile.disable()
    rows = top_functions(profile, 3, requests=4)
    assert len(rows) == 3
    assert rows[0]["function"].endswith(" add_up") and rows[0]["calls_per_request"] == 1.0
    assert rows[0]["own_share"] > 0.3 and rows[0]["own_us_per_request"] > 1_000
    assert all(a["own_share"] >= b["own_share"] for a, b in itertools.pairwise(rows))


def test_counts_are_checked_on_the_command_line():
    assert build_parser().parse_args(["--profile-requests", "0"]).profile_requests == 0
    for flag, value in (("--requests", "0"), ("--warmup", "-1"), ("--profile-requests", "-5")):
        with pytest.raises(SystemExit):
            build_parser().parse_args([flag, value])
