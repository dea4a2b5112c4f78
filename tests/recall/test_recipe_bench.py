"""`python -m recall_service.recipe_bench`: every recipe trains interleaved epochs with its own
model, and the JSON reports each one's epochs, steps and the ratio to the first."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from recall_service.recipe_bench import main

SMALL = "dim=16,layers=1,heads=1,max_length=10,uniform_negatives=64"


def test_recipes_run_interleaved_epochs_and_report_their_ratio(synthetic_dir, tmp_path) -> None:
    out = tmp_path / "recipes.json"
    args = ["--data", str(synthetic_dir), "--rounds", "2", "--threads", "1", "--out", str(out)]
    recipes = [f"prefix:{SMALL}", f"windows:{SMALL},per_prefix_targets=false,batch_size=64"]
    assert main([*args, *(arg for recipe in recipes for arg in ("--recipe", recipe))]) == 0
    result = json.loads(out.read_text())
    prefix, windows = result["recipes"]["prefix"], result["recipes"]["windows"]
    assert prefix["per_prefix_targets"] and not windows["per_prefix_targets"]
    assert windows["overrides"]["batch_size"] == 64 and prefix["batch_size"] == 256
    # one window per prefix: more windows than one per max_length items of each history
    assert prefix["windows"] > windows["windows"]
    assert prefix["steps_per_epoch"] == -(-prefix["windows"] // 256)
    for recipe in (prefix, windows):
        assert len(recipe["epoch_seconds"]) == len(recipe["valid_hr10_by_epoch"]) == 2
        assert all(0.0 <= hr <= 1.0 for hr in recipe["valid_hr10_by_epoch"])
    assert set(result["epoch_seconds_ratio_to_prefix"]) == {"windows"}
    assert result["epoch_seconds_ratio_to_prefix"]["windows"] > 0
