"""Download a bundle tarball, check its sha256 and unpack it into the bundle directory.

Runs as the init container of recall/rank pods (stdlib only, so it runs in the serving image).
The archive holds the bundle's files (``manifest.json`` at its root, or inside one top-level
folder). Exit status 0 means ``<dest>/manifest.json`` exists and came from a verified archive.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

MANIFEST = "manifest.json"
CHUNK_BYTES = 1 << 20


def download(url: str, target: Path, attempts: int = 5, timeout_s: float = 60.0) -> str:
    """Stream ``url`` to ``target`` with retries; returns the sha256 hex digest of the bytes."""
    for attempt in range(1, attempts + 1):
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response, target.open("wb") as out:
                while chunk := response.read(CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
            return digest.hexdigest()
        except OSError as error:
            if attempt == attempts:
                raise
            delay_s = min(2**attempt, 30)
            print(f"download attempt {attempt} failed ({error}); retrying in {delay_s} s", file=sys.stderr)
            time.sleep(delay_s)
    raise AssertionError("unreachable")


def unpack(archive: Path, staging: Path, dest: Path) -> None:
    """Extract ``archive`` into ``staging`` (safe ``data`` filter), then move the bundle's files
    (lifting a single top-level folder) into ``dest``; ``staging`` must be on dest's filesystem."""
    with tarfile.open(archive) as tar:
        tar.extractall(staging, filter="data")
    root = staging
    entries = list(staging.iterdir())
    if not (staging / MANIFEST).is_file() and len(entries) == 1 and entries[0].is_dir():
        root = entries[0]
    if not (root / MANIFEST).is_file():
        raise ValueError(f"no {MANIFEST} at the archive root or in its one top-level folder")
    # The manifest moves last, so a present manifest means a complete bundle.
    for entry in sorted(root.iterdir(), key=lambda path: path.name == MANIFEST):
        entry.rename(dest / entry.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="http(s):// or file:// URL of a .tar(.gz) bundle")
    parser.add_argument("--sha256", required=True, help="expected sha256 hex digest of the archive")
    parser.add_argument("--dest", required=True, type=Path, help="bundle directory to fill")
    args = parser.parse_args(argv)

    expected = args.sha256.strip().lower()
    if (args.dest / MANIFEST).is_file():
        print(f"{args.dest}/{MANIFEST} already present; nothing to fetch")
        return 0
    args.dest.mkdir(parents=True, exist_ok=True)
    # Scratch space inside dest: the volume sized for bundles (the root filesystem is read-only).
    scratch = Path(tempfile.mkdtemp(prefix=".fetch-", dir=args.dest))
    try:
        archive = scratch / "bundle.tar"
        actual = download(args.url, archive)
        if actual != expected:
            print(f"sha256 mismatch for {args.url}: expected {expected}, got {actual}", file=sys.stderr)
            return 1
        staging = scratch / "staging"
        staging.mkdir()
        try:
            unpack(archive, staging, args.dest)
        except (ValueError, OSError, tarfile.TarError) as error:
            print(f"cannot unpack {args.url}: {error}", file=sys.stderr)
            return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"fetched {args.url} (sha256 {actual}) into {args.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
