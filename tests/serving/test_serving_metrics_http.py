"""The /metrics HTTP endpoint's serving thread: it sleeps until a scrape or close (no polling while
idle), answers scrapes, and close() ends the thread and releases the port."""

from __future__ import annotations

import selectors
import socket
import time
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, Counter

from recsys.serving import metrics
from recsys.serving.metrics import MetricsHttpServer


class CountingSelector(selectors.DefaultSelector):
    """The selector the serving loop gets, counting how often the loop waited."""

    waits = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        CountingSelector.waits += 1
        return super().select(timeout)


@pytest.fixture
def counting_selector(monkeypatch: pytest.MonkeyPatch) -> type[CountingSelector]:
    CountingSelector.waits = 0
    monkeypatch.setattr(metrics.selectors, "DefaultSelector", CountingSelector)
    return CountingSelector


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_the_idle_metrics_thread_waits_without_waking_until_a_scrape(
    counting_selector: type[CountingSelector],
) -> None:
    registry = CollectorRegistry()
    Counter("scrapes_test", "a counter to find in the scrape", registry=registry).inc(3)
    server = MetricsHttpServer("127.0.0.1", 0, registry)
    try:
        wait_for(lambda: counting_selector.waits == 1)
        time.sleep(0.3)  # the stdlib loop (poll_interval 0.05) would have woken ~6 times by now
        assert counting_selector.waits == 1

        assert "scrapes_test_total 3.0" in scrape(server.port)
        assert "scrapes_test_total 3.0" in scrape(server.port)
        # one wake per scrape; the loop may get back to its wait just after the client has the answer
        wait_for(lambda: counting_selector.waits == 3)
        time.sleep(0.3)
        assert counting_selector.waits == 3
    finally:
        server.close()


def test_close_ends_the_thread_and_releases_the_port_and_is_idempotent() -> None:
    server = MetricsHttpServer("127.0.0.1", 0, CollectorRegistry())
    port = server.port
    scrape(port)
    server.close()
    assert not server._thread.is_alive()
    server.close()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))  # free again


def test_close_right_after_start_does_not_hang() -> None:
    server = MetricsHttpServer("127.0.0.1", 0, CollectorRegistry())
    server.close()
    assert not server._thread.is_alive()
