"""Validation helpers for the scenario file: every error names the scenario, stage and field."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MAX_NUM_ITEMS = 500


class ScenarioConfigError(ValueError):
    """The scenario file is invalid; the message names the scenario, stage and field."""


def where(scenario: str, stage: str | None = None) -> str:
    """The location prefix of an error message."""
    return f"scenario {scenario!r}" + (f", stage {stage!r}" if stage else "")


def fields(obj: Any, where: str, allowed: set[str]) -> Mapping[str, Any]:
    """``obj`` as a mapping with only ``allowed`` keys (None = empty)."""
    if obj is None:
        return {}
    if not isinstance(obj, Mapping):
        raise ScenarioConfigError(f"{where}: expected a mapping, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ScenarioConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    return obj


def integer(value: Any, where: str, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ScenarioConfigError(f"{where}: {name} must be an integer in {low}..{high}, got {value!r}")
    return value


def number(value: Any, where: str, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ScenarioConfigError(f"{where}: {name} must be a number in {low}..{high}, got {value!r}")
    return float(value)


def boolean(value: Any, where: str, name: str) -> bool:
    if not isinstance(value, bool):
        raise ScenarioConfigError(f"{where}: {name} must be true or false, got {value!r}")
    return value
