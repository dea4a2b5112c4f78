"""`python -m recall_service.sweep`: trial specs parse into typed config overrides; each trial a
worker runs logs under its own name."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from recall_service.sweep import log_as, parse_trial


def test_trial_spec_becomes_typed_overrides() -> None:
    name, overrides = parse_trial("wide:dim=128,dropout=0.5,logq_correction=false,time_guard_s=60")
    assert name == "wide"
    assert overrides == {"dim": 128, "dropout": 0.5, "logq_correction": False, "time_guard_s": 60.0}
    assert isinstance(overrides["dim"], int)
    assert parse_trial("base:") == ("base", {})


def test_unknown_config_field_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="dimm"):
        parse_trial("typo:dimm=3")


def test_each_trial_a_worker_runs_logs_under_its_own_name() -> None:
    import logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        log_as("first")
        log_as("second")
        record = logging.LogRecord("recall_service.train", logging.INFO, __file__, 1, "epoch 1", (), None)
        assert [h.format(record).split(" ", 2)[-1] for h in root.handlers] == ["second: epoch 1"]
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
