"""The bundle format: the only thing training hands to serving.

A bundle is a directory of ONNX graphs, ``.npy`` arrays, id maps (one id per line) and JSON,
described by ``manifest.json``: kind, version, schema version, data fingerprint, files and free
metadata (dims, index type, eval numbers). No pickle crosses this boundary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(RuntimeError):
    """A bundle is missing, incomplete, or of the wrong kind/schema."""


def write_manifest(
    bundle_dir: str | Path, kind: str, version: str, data_fingerprint: str, **metadata: Any
) -> dict[str, Any]:
    """Write ``manifest.json`` listing every file in the bundle; returns the manifest."""
    bundle_dir = Path(bundle_dir)
    files = sorted(
        str(p.relative_to(bundle_dir)) for p in bundle_dir.rglob("*") if p.is_file() and p.name != MANIFEST
    )
    manifest = {
        "kind": kind,
        "version": version,
        "schema_version": SCHEMA_VERSION,
        "data_fingerprint": data_fingerprint,
        "created_unix": int(time.time()),
        "files": files,
        **metadata,
    }
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(bundle_dir: str | Path, kind: str) -> dict[str, Any]:
    """Read and check a bundle's manifest (kind, schema version, every listed file present)."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise BundleError(f"no {MANIFEST} in {bundle_dir}: build it with `recsys export {kind}`")
    manifest = json.loads(path.read_text())
    if manifest.get("kind") != kind:
        raise BundleError(f"{bundle_dir} is a {manifest.get('kind')!r} bundle, expected {kind!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"{bundle_dir}: schema {manifest.get('schema_version')} != {SCHEMA_VERSION}")
    missing = [f for f in manifest.get("files", []) if not (bundle_dir / f).is_file()]
    if missing:
        raise BundleError(f"{bundle_dir}: missing files {missing}")
    return manifest


def new_version(prefix: str) -> str:
    """A sortable version string, e.g. ``recall-20261128T014500``."""
    return f"{prefix}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
