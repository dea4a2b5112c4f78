"""Checksum-verified downloads against local file:// URLs (no network here)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from recsys.data import download as download_module
from recsys.data.download import REGISTRY, ChecksumError, RemoteFile, download, download_dataset, sha256_of


def _source(tmp_path: Path, content: bytes = b"user 1 2 3\n" * 1000) -> tuple[str, str]:
    path = tmp_path / "source" / "Shop.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path.as_uri(), hashlib.sha256(content).hexdigest()


def test_good_checksum_downloads_atomically(tmp_path: Path) -> None:
    url, sha256 = _source(tmp_path)
    dest = tmp_path / "out" / "Shop.txt"
    assert download(url, dest, sha256, progress=False) == dest
    assert sha256_of(dest) == sha256
    assert [p.name for p in dest.parent.iterdir()] == ["Shop.txt"]  # no partial file left behind


def test_bad_checksum_deletes_and_raises(tmp_path: Path) -> None:
    url, _ = _source(tmp_path)
    dest = tmp_path / "out" / "Shop.txt"
    with pytest.raises(ChecksumError, match="SHA-256 mismatch"):
        download(url, dest, "0" * 64, progress=False)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_existing_good_file_is_kept_and_bad_one_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, sha256 = _source(tmp_path)
    dest = tmp_path / "Shop.txt"
    dest.write_bytes(b"corrupted")
    download(url, dest, sha256, progress=False)
    assert sha256_of(dest) == sha256

    def no_network(*args, **kwargs):
        raise AssertionError("a file with the right checksum must not be fetched again")

    monkeypatch.setattr(download_module, "_fetch", no_network)
    assert download(url, dest, sha256, progress=False) == dest


def test_missing_source_raises_and_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "Shop.txt"
    with pytest.raises(OSError):
        download((tmp_path / "absent.txt").as_uri(), dest, "0" * 64, progress=False)
    assert list(dest.parent.iterdir()) == []


def _archives(tmp_path: Path) -> dict[str, Path]:
    files = {"Shop.txt": b"u 1 2\n", "Shop_item2attributes.json": b'{"1": [1]}'}
    zip_path, tar_path = tmp_path / "shop.zip", tmp_path / "shop.tar.gz"
    with zipfile.ZipFile(zip_path, "w") as bundle:
        for name, content in files.items():
            bundle.writestr(f"shop/{name}", content)
    with tarfile.open(tar_path, "w:gz") as bundle:
        for name, content in files.items():
            info = tarfile.TarInfo(f"shop/{name}")
            info.size = len(content)
            bundle.addfile(info, io.BytesIO(content))
    return {"zip": zip_path, "tar": tar_path}


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_extract_into_a_folder(tmp_path: Path, kind: str) -> None:
    archive = _archives(tmp_path)[kind]
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "keep.txt").write_text("unrelated")
    download(archive.as_uri(), dest, sha256_of(archive), extract=True, progress=False)
    assert sorted(p.name for p in (dest / "shop").iterdir()) == ["Shop.txt", "Shop_item2attributes.json"]
    assert (dest / "keep.txt").read_text() == "unrelated"
    assert sorted(p.name for p in dest.iterdir()) == ["keep.txt", "shop"]  # no archive or staging left


def test_extract_refuses_escaping_members(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("../evil.txt", "x")
    with pytest.raises(ValueError, match="escapes"):
        download(archive.as_uri(), tmp_path / "data", sha256_of(archive), extract=True, progress=False)
    assert not (tmp_path / "evil.txt").exists()


def test_registry_checksums_match_the_shared_beauty_files(beauty_dir: Path) -> None:
    for remote in REGISTRY["beauty"]:
        assert remote.url.startswith("https://raw.githubusercontent.com/RUCAIBox/CIKM2020-S3Rec/")
        assert sha256_of(beauty_dir / remote.filename) == remote.sha256


def test_download_dataset_from_a_mirror(
    beauty_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirrored = tuple(
        RemoteFile((beauty_dir / remote.filename).as_uri(), remote.filename, remote.sha256)
        for remote in REGISTRY["beauty"]
    )
    monkeypatch.setitem(REGISTRY, "beauty", mirrored)
    out = download_dataset("beauty", tmp_path / "beauty", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["Beauty.txt", "Beauty_item2attributes.json"]
    with pytest.raises(KeyError, match="unknown"):
        download_dataset("movielens", tmp_path)
