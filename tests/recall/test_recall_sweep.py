"""`python -m recall_service.sweep`: trial specs parse into typed config overrides."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from recall_service.sweep import parse_trial


def test_trial_spec_becomes_typed_overrides() -> None:
    name, overrides = parse_trial("wide:dim=128,dropout=0.5,logq_correction=false,time_guard_s=60")
    assert name == "wide"
    assert overrides == {"dim": 128, "dropout": 0.5, "logq_correction": False, "time_guard_s": 60.0}
    assert isinstance(overrides["dim"], int)
    assert parse_trial("base:") == ("base", {})


def test_unknown_config_field_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="dimm"):
        parse_trial("typo:dimm=3")
