"""The application layer: entry points that wire the services together (the `recsys` CLI, `make
run`, benchmarks, load generation, evaluation wiring, the in-process cascade).

It imports the services and the core; nothing imports it (tests/test_layers.py checks the graph).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any


def load_entry(target: str) -> Callable[..., Any]:
    """The callable a ``"module:function"`` target names, imported only now (so a command that
    does not train never imports torch). ImportError when the module cannot be imported,
    AttributeError when it has no such callable."""
    module_name, _, function_name = target.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    if not callable(function):
        raise AttributeError(f"{target} is not callable")
    return function


def count_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``; anything else is a usage error naming the
    flag (exit status 2), never a traceback later."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse
