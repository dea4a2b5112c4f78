"""`recsys eval report`: the README's quality section is what eval JSON says, kept in artifacts/quality."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys.app import eval as eval_cli
from recsys.app import quality_report

REPORT = {
    "dataset": {"name": "beauty", "users": 22363, "items": 12101},
    "protocol": "leave-one-out",
    "phase": "test",
    "quick": False,
    "stages": {
        "popularity": {"HR@10": 0.013, "NDCG@10": 0.0059},
        "recall": {"HR@10": 0.0817, "NDCG@10": 0.0487, "HR@500": 0.4},
        "pipeline_offline": {"HR@10": 0.1013, "NDCG@10": 0.0632},
        "pipeline": {
            "scenario": "home",
            "HR@10": 0.1011,
            "NDCG@10": 0.0632,
            "users": 22363,
            "degraded_answers": 0,
        },
    },
    "scenarios": {"home": {"HR@10": 0.1011, "users": 22363}, "cart": {"HR@10": 0.0975, "users": 22363}},
    "training": {"recall": {"stop_reason": "early_stop", "epochs_run": 16}},
}


def test_the_section_is_generated_from_the_kept_eval_json(tmp_path: Path):
    source = tmp_path / "eval.json"
    source.write_text(json.dumps(REPORT))
    readme = tmp_path / "README.md"
    readme.write_text(f"# r\n\n{quality_report.BEGIN}\nold text\n{quality_report.END}\nafter\n")
    store = tmp_path / "quality"
    assert (
        eval_cli.main(["report", "--eval", str(source), "--store", str(store), "--readme", str(readme)]) == 0
    )
    assert (store / "beauty.json").is_file()
    text = readme.read_text()
    assert "old text" not in text and text.endswith(f"{quality_report.END}\nafter\n")
    assert "| **`home`** (`pipeline`) | 0.1011 | 0.0632 |" in text
    assert "| `cart` | 0.0975 |" in text and text.count("`home`") == 1  # home once, as the pipeline
    assert (
        "| pipeline_offline | 0.1013 | 0.0632 |" in text
        and "| recall | 0.0817 | 0.0487 | — | 0.4000 |" in text
    )
    assert "training `recall`: stop_reason early_stop, epochs_run 16" in text
    # Regenerating from the store alone gives the same text.
    assert eval_cli.main(["report", "--store", str(store), "--readme", str(readme)]) == 0
    assert readme.read_text() == text


def test_a_readme_without_the_quality_markers_is_refused(tmp_path: Path):
    readme = tmp_path / "README.md"
    readme.write_text("# none\n")
    with pytest.raises(ValueError, match="markers"):
        quality_report.main(["--store", str(tmp_path), "--readme", str(readme)])


def test_runs_of_several_seeds_are_summarised_by_their_mean_and_spread(tmp_path: Path):
    store = tmp_path / "quality"
    for seed, hit in ((1, 0.100), (2, 0.104), (3, 0.102)):
        report = json.loads(json.dumps(REPORT))
        report["training"] = {"recall": {"seed": seed}}
        report["stages"]["pipeline"]["HR@10"] = hit
        source = tmp_path / f"eval-{seed}.json"
        source.write_text(json.dumps(report))
        assert quality_report.keep(source, store).name == f"beauty-seed{seed}.json"
    text = quality_report.render(store)
    assert "seed 1." in text and "Over seeds 1, 2, 3" in text
    assert "| **pipeline (served `home`)** mean ± sd | 0.1020 ± 0.0020 |" in text
