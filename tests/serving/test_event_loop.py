"""The services run on uvloop when it is installed, on asyncio when asked, and refuse a typo."""

from __future__ import annotations

import asyncio

import pytest

from recsys.serving.bootstrap import run_event_loop


async def loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_services_run_on_uvloop_by_default(monkeypatch):
    monkeypatch.delenv("RECSYS_EVENT_LOOP", raising=False)
    assert run_event_loop(loop_module()).startswith("uvloop")


def test_the_standard_loop_when_asked(monkeypatch):
    monkeypatch.setenv("RECSYS_EVENT_LOOP", "asyncio")
    assert run_event_loop(loop_module()).startswith("asyncio")


def test_an_unknown_event_loop_is_refused(monkeypatch):
    monkeypatch.setenv("RECSYS_EVENT_LOOP", "tokio")
    coroutine = loop_module()
    with pytest.raises(ValueError, match="RECSYS_EVENT_LOOP"):
        run_event_loop(coroutine)
    coroutine.close()
