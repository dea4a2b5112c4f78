"""Checksum-verified downloads of public datasets (``recsys data download NAME --out DIR``).

A download streams to a temporary file beside the destination with a progress bar, checks its
SHA-256, and only then renames it into place: an interrupted or corrupted transfer never leaves a
file that looks complete. ``file://`` URLs work too (tests, mirrors on a shared disk).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60.0


class ChecksumError(ValueError):
    """The downloaded bytes do not have the expected SHA-256."""


@dataclass(frozen=True)
class RemoteFile:
    url: str
    filename: str
    sha256: str
    extract: bool = False


_S3REC_DATA = "https://raw.githubusercontent.com/RUCAIBox/CIKM2020-S3Rec/master/data"

# Known public datasets. Checksums are those of the copies in ../shared/data/amazon-beauty.
REGISTRY: dict[str, tuple[RemoteFile, ...]] = {
    "beauty": (
        RemoteFile(
            f"{_S3REC_DATA}/Beauty.txt",
            "Beauty.txt",
            "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8",
        ),
        RemoteFile(
            f"{_S3REC_DATA}/Beauty_item2attributes.json",
            "Beauty_item2attributes.json",
            "129e40f67486f6877eff0f5318cfa8530ee8ac23d8b0d1de04e1bb7a2ba0b2d4",
        ),
    ),
}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, destination: Path, sha256: str, progress: bool) -> None:
    """Stream ``url`` into ``destination`` atomically, verifying its SHA-256 on the way."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, partial_name = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=".part", dir=destination.parent
    )
    partial = Path(partial_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=destination.name,
                disable=not progress,
                leave=False,
            ) as bar:
                for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        actual = digest.hexdigest()
        if actual != sha256.lower():
            raise ChecksumError(f"{url}: SHA-256 mismatch: expected {sha256.lower()}, got {actual}")
        partial.replace(destination)
    finally:
        partial.unlink(missing_ok=True)


def _extract(archive: Path, folder: Path) -> None:
    """Unpack a zip or tar archive into ``folder``, refusing members that escape it."""
    folder.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as bundle:
            root = folder.resolve()
            for member in bundle.namelist():
                if not (folder / member).resolve().is_relative_to(root):
                    raise ValueError(f"{archive}: member {member!r} escapes the destination folder")
            bundle.extractall(folder)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as bundle:
            bundle.extractall(folder, filter="data")  # "data" rejects absolute/escaping paths and links
    else:
        raise ValueError(f"{archive}: not a zip or tar archive")


def download(url: str, dest: Path, sha256: str, *, extract: bool = False, progress: bool = True) -> Path:
    """Download ``url`` (http(s) or file) and verify its SHA-256; return the result's path.

    Without ``extract``, ``dest`` is the file to write (kept as is when it already has the right
    checksum). With ``extract``, ``dest`` is a folder: the archive is downloaded beside it,
    verified, unpacked into it (replacing same-named entries) and removed. A checksum mismatch
    deletes what was downloaded and raises :class:`ChecksumError`.
    """
    dest = Path(dest)
    if not extract:
        if dest.is_file() and sha256_of(dest) == sha256.lower():
            log.info("%s already present with the expected checksum", dest)
            return dest
        _fetch(url, dest, sha256, progress)
        return dest
    archive = dest.parent / f".{dest.name}.archive"
    try:
        _fetch(url, archive, sha256, progress)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            _extract(archive, staging)
            dest.mkdir(parents=True, exist_ok=True)
            for entry in staging.iterdir():  # replace same-named entries, keep the rest of dest
                target = dest / entry.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                elif target.exists() or target.is_symlink():
                    target.unlink()
                entry.replace(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        archive.unlink(missing_ok=True)
    return dest


def download_dataset(name: str, out: Path, progress: bool = True) -> Path:
    """Download every file of registered dataset ``name`` into folder ``out``; return ``out``."""
    if name not in REGISTRY:
        raise KeyError(f"dataset: unknown {name!r}; known: {', '.join(sorted(REGISTRY))}")
    out = Path(out)
    for remote in REGISTRY[name]:
        target = out if remote.extract else out / remote.filename
        download(remote.url, target, remote.sha256, extract=remote.extract, progress=progress)
    return out
