"""Fetch one bundle version, check its sha256 and every file in it, and unpack it into the bundle dir.

Runs as the init container of recall/rank pods. The object is ``<store>/<name>/<version>.tar`` (as
``recsys bundle publish --store`` writes it) or any ``--url``:

- ``s3://``, ``gs://`` (and any other fsspec protocol): through fsspec (the ``stores`` extra of the
  serving image) with the cloud's default credential chain, so workload identity works: IRSA or EKS
  Pod Identity (the AWS_* variables their webhooks inject), GKE Workload Identity (the metadata
  server). ``AWS_ENDPOINT_URL`` points S3 at MinIO or another S3-compatible store.
- ``http(s)://`` and ``file://``: the standard library alone.

The archive holds the bundle's files (``manifest.json`` at its root, or inside one top-level
folder). Exit status 0 means ``<dest>/manifest.json`` exists, came from an archive with the expected
sha256, names the expected version, and every file it lists has the listed size and sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

MANIFEST = "manifest.json"
CHUNK_BYTES = 1 << 20
STDLIB_SCHEMES = ("http", "https", "file")


def object_url(store: str, name: str, version: str) -> str:
    """``<store>/<name>/<version>.tar``: the layout ``recsys bundle publish --store`` writes."""
    return f"{store.rstrip('/')}/{name}/{version}.tar"


def open_url(url: str, timeout_s: float) -> BinaryIO:
    """A readable binary stream of ``url``: urllib for http(s)/file, fsspec for anything else."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme in STDLIB_SCHEMES:
        return urllib.request.urlopen(url, timeout=timeout_s)
    try:
        import fsspec
    except ImportError:
        raise RuntimeError(
            f"{scheme}:// needs fsspec and its driver (s3fs, gcsfs): the serving image installs them "
            "(the `stores` extra); use an http(s):// URL otherwise"
        ) from None
    return fsspec.open(url, "rb").open()


def download(url: str, target: Path, attempts: int = 5, timeout_s: float = 60.0) -> str:
    """Stream ``url`` to ``target`` with retries; returns the sha256 hex digest of the bytes."""
    for attempt in range(1, attempts + 1):
        digest = hashlib.sha256()
        try:
            with open_url(url, timeout_s) as response, target.open("wb") as out:
                while chunk := response.read(CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
            return digest.hexdigest()
        except FileNotFoundError:
            raise  # a version that was never published: retrying will not make it appear
        except OSError as error:
            if attempt == attempts:
                raise
            delay_s = min(2**attempt, 30)
            print(f"download attempt {attempt} failed ({error}); retrying in {delay_s} s", file=sys.stderr)
            time.sleep(delay_s)
    raise AssertionError("unreachable")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def check_bundle(root: Path, version: str | None) -> dict:
    """The manifest of the unpacked bundle at ``root``, after checking its version and each listed
    file's size and sha256 (``file_digests``, as recsys.bundle writes them)."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{MANIFEST}: unreadable ({error})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{MANIFEST}: not a JSON object")
    if version is not None and str(manifest.get("version")) != version:
        raise ValueError(f"the archive holds version {manifest.get('version')!r}, expected {version!r}")
    for name, expected in sorted((manifest.get("file_digests") or {}).items()):
        path = root / name
        if not path.is_file():
            raise ValueError(f"{name}: listed in the manifest, missing from the archive")
        if path.stat().st_size != expected["size"] or file_sha256(path) != expected["sha256"]:
            raise ValueError(f"{name}: size or sha256 differs from the manifest")
    return manifest


def unpack(archive: Path, staging: Path, dest: Path, version: str | None) -> dict:
    """Extract ``archive`` into ``staging`` (safe ``data`` filter), check it, then move the
    bundle's files (lifting a single top-level folder) into ``dest``; ``staging`` must be on dest's
    filesystem. Returns the manifest."""
    with tarfile.open(archive) as tar:
        tar.extractall(staging, filter="data")
    root = staging
    entries = list(staging.iterdir())
    if not (staging / MANIFEST).is_file() and len(entries) == 1 and entries[0].is_dir():
        root = entries[0]
    if not (root / MANIFEST).is_file():
        raise ValueError(f"no {MANIFEST} at the archive root or in its one top-level folder")
    manifest = check_bundle(root, version)
    # The manifest moves last, so a present manifest means a complete bundle.
    for entry in sorted(root.iterdir(), key=lambda path: path.name == MANIFEST):
        entry.rename(dest / entry.name)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--store", help="s3://bucket/prefix, gs://..., https://...: fetches <store>/<name>/<version>.tar"
    )
    source.add_argument(
        "--url", help="the archive's URL (s3://, gs://, http(s)://, file://), instead of --store"
    )
    parser.add_argument("--name", help="with --store: the model's folder in the store (recall, rank)")
    parser.add_argument(
        "--version", help="the bundle version; required with --store, checked against the manifest"
    )
    parser.add_argument("--sha256", required=True, help="expected sha256 hex digest of the archive")
    parser.add_argument("--dest", required=True, type=Path, help="bundle directory to fill")
    args = parser.parse_args(argv)
    if args.store and not (args.name and args.version):
        parser.error("--store needs --name and --version")
    url = object_url(args.store, args.name, args.version) if args.store else args.url

    expected = args.sha256.strip().lower()
    if (args.dest / MANIFEST).is_file():
        present = json.loads((args.dest / MANIFEST).read_text()).get("version")
        if args.version is not None and str(present) != args.version:
            print(
                f"{args.dest} holds version {present!r}, not {args.version!r}: refusing to mix",
                file=sys.stderr,
            )
            return 1
        print(f"{args.dest}/{MANIFEST} already present (version {present}); nothing to fetch")
        return 0
    args.dest.mkdir(parents=True, exist_ok=True)
    # Scratch space inside dest: the volume sized for bundles (the root filesystem is read-only).
    scratch = Path(tempfile.mkdtemp(prefix=".fetch-", dir=args.dest))
    try:
        archive = scratch / "bundle.tar"
        try:
            actual = download(url, archive)
        except (OSError, RuntimeError) as error:
            print(f"cannot download {url}: {error}", file=sys.stderr)
            return 1
        if actual != expected:
            print(f"sha256 mismatch for {url}: expected {expected}, got {actual}", file=sys.stderr)
            return 1
        staging = scratch / "staging"
        staging.mkdir()
        try:
            manifest = unpack(archive, staging, args.dest, args.version)
        except (ValueError, OSError, tarfile.TarError) as error:
            print(f"cannot unpack {url}: {error}", file=sys.stderr)
            return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(
        json.dumps(
            {"fetched": url, "sha256": actual, "version": manifest.get("version"), "dest": str(args.dest)}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
