"""The services' own threads carry their names into the kernel, where top -H and the e2e
benchmark's per-thread CPU read them."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

import pytest

from recsys.serving.batching import BatchThread
from recsys.serving.thread_names import MAX_NAME_BYTES, name_os_thread, os_thread_name
from recsys.timing import MAIN_THREAD, thread_cpu_seconds

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names via Linux prctl")


def kernel_name() -> str:
    """The calling thread's name as /proc shows it."""
    return Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()


def test_names_are_cut_to_what_the_kernel_keeps():
    assert os_thread_name("recall-batch") == b"recall-batch"
    assert os_thread_name("a-name-much-longer-than-fifteen") == b"a-name-much-lon"
    assert len(os_thread_name("x" * 40)) == MAX_NAME_BYTES
    assert os_thread_name("rank-é") == b"rank-?"


def test_a_thread_that_names_itself_is_seen_under_that_name_with_its_cpu_time():
    named, finish = threading.Event(), threading.Event()
    seen: list[str] = []

    def busy() -> None:
        assert name_os_thread("busy-worker")
        seen.append(kernel_name())
        total = 0
        while not finish.is_set():  # burn CPU until the reading is taken
            total += sum(range(1000))
            if not named.is_set() and total > 50_000_000:
                named.set()

    worker = threading.Thread(target=busy, name="ignored-python-name")
    worker.start()
    try:
        assert named.wait(timeout=30)
        used = thread_cpu_seconds(os.getpid())
    finally:
        finish.set()
        worker.join()
    assert seen == ["busy-worker"]
    assert used["busy-worker"] > 0 and MAIN_THREAD in used
    assert thread_cpu_seconds(os.getpid()).get("busy-worker") is None  # it ended: left out


def test_a_batch_thread_takes_its_python_name_in_the_kernel():
    thread = BatchThread("rank-batch")

    async def name_inside() -> str:
        return await thread.run(kernel_name)

    try:
        assert asyncio.run(name_inside()) == "rank-batch"
    finally:
        thread.close()


def test_the_metrics_endpoint_thread_is_named_in_the_kernel():
    from prometheus_client import CollectorRegistry

    from recsys.serving.metrics import MetricsHttpServer

    def names() -> list[str]:
        tasks = Path("/proc/self/task").iterdir()
        return [(task / "comm").read_text().strip() for task in tasks if (task / "comm").exists()]

    server = MetricsHttpServer("127.0.0.1", 0, CollectorRegistry())
    try:
        for _ in range(200):  # the thread names itself as it starts
            if "metrics-http" in names():
                break
            threading.Event().wait(0.01)
        assert "metrics-http" in names()
    finally:
        server.close()
