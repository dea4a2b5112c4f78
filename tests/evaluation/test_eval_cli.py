"""`recsys eval` end to end on tiny synthetic data, and its plug-in mechanism."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from recsys.app import eval as cli
from recsys.evaluation.protocol import PROTOCOL

METRIC_NAMES = {"HR@10", "NDCG@10", "HR@20", "NDCG@20", "HR@50", "NDCG@50", "MRR", "users"}


def test_popularity_end_to_end(synthetic_dir: Path, synthetic_dataset, tmp_path: Path) -> None:
    out = tmp_path / "reports" / "eval.json"
    completed = subprocess.run(
        [sys.executable, "-m", "recsys", "eval", "--data", str(synthetic_dir), "--stage", "popularity",
         "--out", str(out), "--artifacts", str(tmp_path / "artifacts")],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert completed.stdout.strip().splitlines()[-1] == str(out)
    report = json.loads(out.read_text())
    assert set(report) >= {"dataset", "protocol", "phase", "stages"}
    assert report["dataset"] == synthetic_dataset.summary()
    assert report["protocol"] == PROTOCOL
    assert report["phase"] == "test"
    assert set(report["stages"]) == {"popularity"}
    popularity = report["stages"]["popularity"]
    assert set(popularity) == METRIC_NAMES
    assert popularity["users"] == synthetic_dataset.num_users
    assert (
        0.0 < popularity["NDCG@10"] < popularity["HR@10"] <= popularity["HR@20"] <= popularity["HR@50"] <= 1.0
    )


def test_valid_phase_and_default_out(synthetic_dir: Path, tmp_path: Path, capsys) -> None:
    artifacts = tmp_path / "artifacts"
    assert cli.main(["--data", str(synthetic_dir), "--phase", "valid", "--artifacts", str(artifacts)]) == 0
    out = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == artifacts / "eval-popularity.json"
    assert json.loads(out.read_text())["phase"] == "valid"


@pytest.fixture
def fake_plugins(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Plug-in modules recording their calls, in place of recall_service/rank_service."""
    calls: list[tuple] = []

    def recall_stages(dataset, split, artifacts_dir, phase, quick):
        calls.append(("recall", dataset.name, artifacts_dir, phase, quick))
        return {name: {"HR@10": 0.5} for name in ("recall", "covisit", "candidates")}

    def rank_stages(dataset, split, artifacts_dir, phase, quick):
        calls.append(("rank", dataset.name, artifacts_dir, phase, quick))
        return {name: {"HR@10": 0.6} for name in ("recall", "covisit", "candidates", "pipeline_offline")}

    def served_scenarios(dataset, split, artifacts_dir, names, scenarios_file, phase, quick):
        calls.append(("scenarios", tuple(names)))
        return {name: {"HR@10": 0.7} for name in names}

    for module_name, function in (("fake_recall_eval", recall_stages), ("fake_rank_eval", rank_stages)):
        module = types.ModuleType(module_name)
        module.evaluate_stages = function
        monkeypatch.setitem(sys.modules, module_name, module)
    scenario_module = types.ModuleType("fake_scenario_eval")
    scenario_module.evaluate = served_scenarios
    monkeypatch.setitem(sys.modules, "fake_scenario_eval", scenario_module)
    for stage in ("recall", "covisit", "candidates"):
        monkeypatch.setitem(cli.PLUGINS, stage, "fake_recall_eval:evaluate_stages")
    monkeypatch.setitem(cli.PLUGINS, "pipeline", "fake_rank_eval:evaluate_stages")
    monkeypatch.setitem(cli.PLUGINS, "pipeline_offline", "fake_rank_eval:evaluate_stages")
    monkeypatch.setattr(cli, "SCENARIO_PLUGIN", "fake_scenario_eval:evaluate")
    return calls


def test_plugin_stages_are_merged(
    synthetic_dir: Path, synthetic_dataset, tmp_path: Path, fake_plugins
) -> None:
    out = tmp_path / "eval.json"
    argv = ["--data", str(synthetic_dir), "--stage", "recall", "--stage", "covisit", "--out", str(out),
            "--artifacts", str(tmp_path / "artifacts"), "--quick"]  # fmt: skip
    assert cli.main(argv) == 0
    stages = json.loads(out.read_text())["stages"]
    assert set(stages) == {"popularity", "recall", "covisit", "candidates"}
    name = synthetic_dataset.name
    assert fake_plugins == [("recall", name, tmp_path / "artifacts" / name, "test", True)]  # called once


def test_pipeline_is_the_served_home_scenario_with_the_offline_stages_beside_it(
    synthetic_dir: Path, tmp_path: Path, fake_plugins
) -> None:
    out = tmp_path / "eval.json"
    argv = ["--data", str(synthetic_dir), "--stage", "recall", "--stage", "pipeline", "--out", str(out),
            "--artifacts", str(tmp_path), "--scenario", "cart"]  # fmt: skip
    assert cli.main(argv) == 0
    assert fake_plugins[0][0] == "rank" and fake_plugins[1] == ("scenarios", ("home", "cart"))
    report = json.loads(out.read_text())
    stages = report["stages"]
    assert stages["pipeline"] == {"scenario": "home", "HR@10": 0.7}
    assert stages["pipeline_offline"] == {"HR@10": 0.6} and stages["recall"] == {"HR@10": 0.6}
    assert report["scenarios"] == {"cart": {"HR@10": 0.7}}  # what was asked with --scenario


def test_missing_plugin_fails_clearly(
    synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setitem(cli.PLUGINS, "pipeline", "recsys_no_such_plugin:evaluate_stages")
    out = tmp_path / "eval.json"
    argv = [
        "--data",
        str(synthetic_dir),
        "--stage",
        "pipeline",
        "--out",
        str(out),
        "--artifacts",
        str(tmp_path),
    ]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert "stage 'pipeline'" in error and "recsys_no_such_plugin" in error
    assert not out.exists()


def test_unknown_stage_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as raised:
        cli.main(["--stage", "magic"])
    assert raised.value.code == 2
    assert "magic" in capsys.readouterr().err


def test_bad_data_path_fails_clearly(tmp_path: Path, capsys) -> None:
    assert cli.main(["--data", str(tmp_path), "--artifacts", str(tmp_path)]) == 1
    assert "no dataset found" in capsys.readouterr().err
