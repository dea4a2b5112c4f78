"""Bundle files: digests and catalog in the manifest, verification naming the bad file, the
versioned layout (publish, activate, rollback, `recsys bundle`) and the reload watcher's refusals."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from recsys.app.cli import main as cli_main
from recsys.bundle import (
    CURRENT,
    BundleError,
    activate_version,
    bundle_versions,
    current_version,
    publish_bundle,
    read_manifest,
    resolve_bundle,
    rollback,
    verify_bundle,
    write_manifest,
)
from recsys.serving.config import ConfigError, ModelServingConfig, ServingConfig
from recsys.serving.reload import BundleWatcher, bundle_key
from recsys.serving.wire import catalog_fingerprint

ITEMS = ["a", "b", "c"]


def make_bundle(folder: Path, version: str = "v1", items: list[str] = ITEMS) -> Path:
    """A small 'recall' bundle: an id map, a binary array file and a nested file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "items.txt").write_text("".join(f"{item}\n" for item in items))
    (folder / "vectors.bin").write_bytes(bytes(range(256)) * 8)
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "notes.txt").write_text("nested\n")
    write_manifest(folder, "recall", version, "data-fp", num_items=len(items))
    return folder


def edit_manifest(folder: Path, **changes) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def flip_byte(path: Path, offset: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_manifest_records_size_sha256_of_every_file_and_the_catalog(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    manifest = read_manifest(bundle, "recall", verify=True)
    assert set(manifest["file_digests"]) == {"items.txt", "vectors.bin", "sub/notes.txt"}
    assert manifest["file_digests"]["vectors.bin"]["size"] == 2048
    assert len(manifest["file_digests"]["vectors.bin"]["sha256"]) == 64
    assert manifest["catalog"] == {"fingerprint": catalog_fingerprint(ITEMS), "num_items": 3}


def test_one_flipped_byte_is_refused_naming_the_file(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    flip_byte(bundle / "vectors.bin")
    with pytest.raises(BundleError, match=r"vectors\.bin: sha256 differs"):
        read_manifest(bundle, "recall", verify=True)
    read_manifest(bundle, "recall")  # without verify only presence is checked


def test_a_size_mismatch_is_refused_naming_the_file(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    with (bundle / "sub" / "notes.txt").open("a") as stream:
        stream.write("x")
    with pytest.raises(BundleError, match=r"sub/notes\.txt: size 8 bytes, manifest says 7"):
        read_manifest(bundle, "recall", verify=True)


def test_a_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    (bundle / "vectors.bin").unlink()
    with pytest.raises(BundleError, match=r"vectors\.bin"):
        verify_bundle(bundle, json.loads((bundle / "manifest.json").read_text()))


def test_a_manifest_catalog_fingerprint_mismatch_is_refused(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    edit_manifest(bundle, catalog={"fingerprint": catalog_fingerprint(["x", "y", "z"]), "num_items": 3})
    with pytest.raises(BundleError, match=r"items\.txt: catalog fingerprint"):
        read_manifest(bundle, "recall", verify=True)
    edit_manifest(bundle, catalog={"fingerprint": catalog_fingerprint(ITEMS), "num_items": 4})
    with pytest.raises(BundleError, match=r"items\.txt: 3 item ids"):
        read_manifest(bundle, "recall", verify=True)


def test_an_old_bundle_without_digests_loads_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = make_bundle(tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    for key in ("file_digests", "catalog"):
        del manifest[key]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="recsys.bundle"):
        read_manifest(bundle, "recall", verify=True)
    assert "UNVERIFIED" in caplog.text and "recsys export recall" in caplog.text


def test_an_unreadable_manifest_is_a_bundle_error(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest\.json: not valid JSON"):
        read_manifest(bundle, "recall")


def test_publish_activate_and_rollback_repoint_current_atomically(tmp_path: Path) -> None:
    root = tmp_path / "recall"
    for version in ("v1", "v2", "v3"):
        publish_bundle(make_bundle(tmp_path / "src" / version, version), root)
    assert bundle_versions(root) == ["v1", "v2", "v3"]
    assert (root / CURRENT).is_symlink() and current_version(root) == "v3"
    assert resolve_bundle(root) == (root / "v3").resolve()
    assert resolve_bundle(root / "v2") == root / "v2"  # a plain folder is itself

    assert rollback(root) == "v2" and current_version(root) == "v2"
    assert rollback(root) == "v1"
    with pytest.raises(BundleError, match="no version older than v1"):
        rollback(root)
    activate_version(root, "v3")
    assert current_version(root) == "v3"
    with pytest.raises(BundleError, match="no bundle version 'v9'"):
        activate_version(root, "v9")
    with pytest.raises(BundleError, match="already exists"):
        publish_bundle(tmp_path / "src" / "v1", root)
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp links or staging left


def test_publish_refuses_a_corrupt_source(tmp_path: Path) -> None:
    source = make_bundle(tmp_path / "src")
    flip_byte(source / "vectors.bin")
    with pytest.raises(BundleError, match=r"vectors\.bin"):
        publish_bundle(source, tmp_path / "root")
    assert bundle_versions(tmp_path / "root") == []


def test_recsys_bundle_cli_lists_verifies_and_rolls_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "rank"
    for version in ("v1", "v2"):
        assert (
            cli_main(
                ["bundle", "publish", str(make_bundle(tmp_path / version, version)), "--bundle", str(root)]
            )
            == 0
        )
    assert cli_main(["bundle", "list", "--bundle", str(root)]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == ["  v1", "* v2"]
    assert cli_main(["bundle", "verify", "--bundle", str(root)]) == 0
    assert cli_main(["bundle", "rollback", "--bundle", str(root)]) == 0
    assert current_version(root) == "v1"
    assert cli_main(["bundle", "activate", "v2", "--bundle", str(root)]) == 0
    assert current_version(root) == "v2"
    flip_byte(root / "v2" / "vectors.bin")
    capsys.readouterr()
    assert cli_main(["bundle", "verify", "--bundle", str(root)]) == 1
    assert "vectors.bin: sha256 differs" in capsys.readouterr().err


def test_model_config_accepts_a_versioned_folder_and_the_poll_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "recall"
    publish_bundle(make_bundle(tmp_path / "v1", "v1"), root)
    serving = ServingConfig()
    assert ModelServingConfig(serving=serving, bundle=root).bundle_poll_s == 5.0
    with pytest.raises(ConfigError, match="bundle_poll_s"):
        ModelServingConfig(serving=serving, bundle=root, bundle_poll_s=-1)
    monkeypatch.setenv("RECSYS_BUNDLE_POLL_S", "0.5")
    monkeypatch.setenv("RECSYS_BUNDLE", str(root))
    assert ModelServingConfig.from_args([]).bundle_poll_s == 0.5
    assert ModelServingConfig.from_args(["--bundle-poll-s", "0"]).bundle_poll_s == 0.0


def reload_count(registry: CollectorRegistry, outcome: str) -> float:
    value = registry.get_sample_value("recsys_bundle_reload_total", {"service": "test", "outcome": outcome})
    return value or 0.0


async def test_watcher_swaps_a_good_version_refuses_a_corrupt_one_and_follows_rollback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    publish_bundle(make_bundle(tmp_path / "v1", "v1"), root)
    served: list[str] = []
    registry = CollectorRegistry()

    def load(directory: Path) -> str:
        return read_manifest(directory, "recall", verify=True)["version"]

    async def warm(version: str) -> None:
        await asyncio.sleep(0)

    watcher = BundleWatcher(
        root, "test", load, warm, served.append, registry, poll_s=0, served=bundle_key(resolve_bundle(root))
    )
    assert await watcher.check() is None  # nothing new
    publish_bundle(make_bundle(tmp_path / "v2", "v2"), root)
    assert await watcher.check() == "swapped" and served == ["v2"]

    corrupt = make_bundle(root / "v3", "v3")
    flip_byte(corrupt / "vectors.bin")
    activate_version(root, "v3")
    with caplog.at_level(logging.ERROR, logger="recsys.serving.reload"):
        assert await watcher.check() == "refused" and served == ["v2"]
    assert watcher.last_error is not None and "vectors.bin" in watcher.last_error
    assert "refused; the old one keeps serving" in caplog.text and "vectors.bin: sha256" in caplog.text
    assert await watcher.check() is None  # a refused version is not retried
    assert reload_count(registry, "refused") == 1 and reload_count(registry, "swapped") == 1

    assert rollback(root) == "v2"
    assert await watcher.check() is None  # v2 is what is served already
    assert rollback(root) == "v1"
    assert await watcher.check() == "swapped" and served == ["v2", "v1"]
    assert reload_count(registry, "swapped") == 2
