"""`recsys data` and prepare_dataset: generate, prepare (synthetic and paths), stats, download."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from recsys.data import cli, prepare
from recsys.data.download import REGISTRY, RemoteFile, sha256_of
from recsys.data.loaders import load_dataset, load_id_maps
from recsys.data.prepare import dataset_artifacts, prepare_dataset
from recsys.data.synthetic import GENERATOR_FILE, INTERACTIONS_FILE, SyntheticConfig


@pytest.fixture
def tiny_synthetic(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--data synthetic`` generates the tiny preset (quick: another seed) to keep tests fast."""
    monkeypatch.setattr(
        prepare, "synthetic_config", lambda quick=False: SyntheticConfig.tiny(seed=8 if quick else 7)
    )


def _last_line(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_generate_command(tmp_path: Path, capsys) -> None:
    assert cli.main(["generate", "--out", str(tmp_path / "gen"), "--preset", "tiny", "--seed", "3"]) == 0
    assert _last_line(capsys) == str(tmp_path / "gen")
    recorded = json.loads((tmp_path / "gen" / GENERATOR_FILE).read_text())["config"]
    assert recorded["seed"] == 3 and recorded["num_users"] == SyntheticConfig.tiny().num_users


def test_prepare_synthetic_generates_once_then_reuses(tmp_path: Path, tiny_synthetic, caplog) -> None:
    dataset = prepare_dataset("synthetic", tmp_path)
    assert dataset.name == "synthetic"
    data_file = tmp_path / "synthetic" / "data" / INTERACTIONS_FILE
    first_mtime = data_file.stat().st_mtime_ns
    assert dataset_artifacts(dataset, tmp_path) == tmp_path / "synthetic"

    again = prepare_dataset("synthetic", tmp_path)
    assert data_file.stat().st_mtime_ns == first_mtime and again.fingerprint() == dataset.fingerprint()

    # Other settings asked for: the existing data is kept (bundles built on it stay valid), with a warning.
    with caplog.at_level(logging.WARNING, logger="recsys.data.prepare"):
        quick = prepare_dataset("synthetic", tmp_path, quick=True)
    assert quick.fingerprint() == dataset.fingerprint()
    assert "delete the folder to regenerate" in caplog.text

    shutil.rmtree(tmp_path / "synthetic" / "data")
    assert prepare_dataset("synthetic", tmp_path, quick=True).fingerprint() != dataset.fingerprint()


def test_prepare_command_writes_id_maps_and_stats(tmp_path: Path, synthetic_dir: Path, capsys) -> None:
    assert cli.main(["prepare", "--data", str(synthetic_dir), "--artifacts", str(tmp_path)]) == 0
    data_dir = Path(_last_line(capsys))
    assert data_dir.parent.parent == tmp_path
    users, items = load_id_maps(data_dir)
    stats = json.loads((data_dir / cli.STATS_FILE).read_text())
    assert stats["users"] == len(users) == SyntheticConfig.tiny().num_users
    assert stats["items"] == len(items)


def test_prepare_synthetic_command(tmp_path: Path, tiny_synthetic, capsys) -> None:
    assert cli.main(["prepare", "--data", "synthetic", "--artifacts", str(tmp_path), "--quick"]) == 0
    assert _last_line(capsys) == str(tmp_path / "synthetic" / "data")
    assert (tmp_path / "synthetic" / "data" / "items.txt").is_file()


def test_stats_command_prints_json(synthetic_dir: Path, synthetic_dataset, capsys) -> None:
    assert cli.main(["stats", "--data", str(synthetic_dir)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["interactions"] == synthetic_dataset.num_interactions
    assert stats["sequence_length"]["min"] >= 5
    assert set(stats["event_types"]) == {"VIEW", "CLICK", "ADD_TO_CART", "PURCHASE"}
    assert set(stats["scenarios"]) == set(synthetic_dataset.scenario_names)
    assert stats["catalog"]["categories"] == SyntheticConfig.tiny().num_categories
    assert stats["catalog"]["sponsored"] > 0


def test_stats_on_beauty(beauty_dir: Path, capsys) -> None:
    assert cli.main(["stats", "--data", str(beauty_dir)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["name"], stats["users"], stats["items"], stats["interactions"], stats["attributes"]) == (
        "beauty", 22_363, 12_101, 198_502, 637,
    )  # fmt: skip
    assert "event_types" not in stats and stats["catalog"]["categories"] == 0


def test_bad_data_path_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert cli.main(["stats", "--data", str(tmp_path)]) == 1
    assert "no dataset found" in capsys.readouterr().err


def test_download_command_with_a_mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    source = tmp_path / "mirror" / "Beauty.txt"
    source.parent.mkdir()
    source.write_text("1 1 2 3\n")
    monkeypatch.setitem(REGISTRY, "beauty", (RemoteFile(source.as_uri(), "Beauty.txt", sha256_of(source)),))
    assert cli.main(["download", "beauty", "--out", str(tmp_path / "beauty")]) == 0
    assert _last_line(capsys) == str(tmp_path / "beauty")
    assert (tmp_path / "beauty" / "Beauty.txt").read_text() == "1 1 2 3\n"

    broken = replace(REGISTRY["beauty"][0], sha256="0" * 64)
    monkeypatch.setitem(REGISTRY, "beauty", (broken,))
    assert cli.main(["download", "beauty", "--out", str(tmp_path / "again")]) == 1
    assert "SHA-256 mismatch" in capsys.readouterr().err


def test_tile_writes_disjoint_copies_of_an_s3rec_log(tmp_path: Path, capsys) -> None:
    source = tmp_path / "shop"
    source.mkdir()
    (source / "Shop.txt").write_text("1 1 2 3\n2 2 3\n")
    (source / "Shop_item2attributes.json").write_text(json.dumps({"1": ["7"], "2": ["7", "8"], "3": []}))
    out = tmp_path / "tiled"
    assert cli.main(["tile", "--data", str(source), "--copies", "3", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "Shop.txt")
    original, tiled = load_dataset(source), load_dataset(out)
    assert tiled.num_users == 3 * original.num_users and tiled.num_items == 3 * original.num_items
    assert len(tiled.catalog.attribute_names) == 3 * len(original.catalog.attribute_names)
    assert sum(map(len, tiled.sequences)) == 3 * sum(map(len, original.sequences))
    # copy 2 of user 1 bought copy 2 of items 1, 2, 3, whose attributes are copy 2's
    user = tiled.users.dense("1~2")
    assert [tiled.items.ids[i] for i in tiled.sequences[user]] == ["1~2", "2~2", "3~2"]
    bag = tiled.catalog.attributes[tiled.items.dense("2~2")]
    assert sorted(tiled.catalog.attribute_names[a] for a in bag) == ["7~2", "8~2"]
    assert cli.main(["tile", "--data", str(source), "--copies", "0", "--out", str(out)]) == 2
