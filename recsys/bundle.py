"""The bundle format: the only thing training hands to serving.

A bundle is a directory of ONNX graphs, ``.npy`` arrays, id maps (one id per line) and JSON,
described by ``manifest.json``: kind, version, schema version, data fingerprint, files with their
size and sha256 (``file_digests``), the catalog its item indices refer to (``catalog``: the
fingerprint of ``items.txt`` and its item count) and free metadata (dims, index type, eval
numbers). No pickle crosses this boundary.

A bundle location is either such a directory (the plain layout ``make run`` uses) or a root of
versioned directories with a ``current`` link naming the served one::

    BUNDLE/v20261201T0600/manifest.json ...
    BUNDLE/v20261202T0600/manifest.json ...
    BUNDLE/current -> v20261202T0600

Versions sort by name (``new_version`` names sort by time); ``publish_bundle`` adds one,
``activate_version`` and ``rollback`` repoint ``current`` atomically (a new link renamed over the
old one), and serving watches the link (``recsys.serving.reload``).

For a cluster, ``publish_to_store`` packs a bundle into one tar and uploads it, immutably, to an
object store as ``<store>/<name>/<version>.tar`` (plus ``<version>.tar.sha256``); the Helm chart's
init container (``deploy/helm/recsys/files/fetch_bundle.py``) fetches exactly that object, checks
the sha256 the chart was given, and the version is a pod annotation, so a values change rolls the
pods and ``helm rollback`` serves the previous model again. Stores: ``s3://`` and ``gs://`` (and
any other fsspec protocol) through fsspec with the cloud's default credentials (the ``stores``
extra), ``file://`` or a plain path, and ``http(s)://`` (HTTP PUT) with the standard library.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ITEMS_FILE = "items.txt"
CURRENT = "current"
HASH_CHUNK_BYTES = 1 << 20  # files are hashed in 1 MiB reads: memory stays flat for any bundle


class BundleError(RuntimeError):
    """A bundle is missing, incomplete, corrupt, or of the wrong kind/schema."""


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in ``HASH_CHUNK_BYTES`` chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _items_catalog(items_path: Path) -> dict[str, Any]:
    """``{"fingerprint", "num_items"}`` of an id map file: what the wire calls the catalog."""
    # Imported here: recsys.serving imports this module (a top-level import would be circular).
    from recsys.serving.wire import catalog_fingerprint

    ids = items_path.read_text(encoding="utf-8").splitlines()
    return {"fingerprint": catalog_fingerprint(ids), "num_items": len(ids)}


def write_manifest(
    bundle_dir: str | Path, kind: str, version: str, data_fingerprint: str, **metadata: Any
) -> dict[str, Any]:
    """Write ``manifest.json`` listing every file in the bundle with its size and sha256, and the
    catalog fingerprint of ``items.txt`` when the bundle has one; returns the manifest."""
    bundle_dir = Path(bundle_dir)
    files = sorted(
        str(p.relative_to(bundle_dir)) for p in bundle_dir.rglob("*") if p.is_file() and p.name != MANIFEST
    )
    digests = {
        name: {"size": (bundle_dir / name).stat().st_size, "sha256": file_sha256(bundle_dir / name)}
        for name in files
    }
    manifest = {
        "kind": kind,
        "version": version,
        "schema_version": SCHEMA_VERSION,
        "data_fingerprint": data_fingerprint,
        "created_unix": int(time.time()),
        "files": files,
        "file_digests": digests,
        **metadata,
    }
    if (bundle_dir / ITEMS_FILE).is_file():
        manifest["catalog"] = _items_catalog(bundle_dir / ITEMS_FILE)
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def verify_bundle(bundle_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Check every listed file's size and sha256, and that ``items.txt`` is the manifest's catalog.

    Raises BundleError naming the first file that does not match. A manifest without
    ``file_digests`` (exported before bundles were hashed) is accepted with a warning: its files
    cannot be checked; re-exporting the bundle adds the digests.
    """
    bundle_dir = Path(bundle_dir)
    digests: dict[str, dict[str, Any]] | None = manifest.get("file_digests")
    if digests is None:
        log.warning(
            "bundle %s has no file digests (exported before bundles were hashed): loaded UNVERIFIED; "
            "re-export it with `recsys export %s` to have it verified",
            bundle_dir,
            manifest.get("kind", "KIND"),
        )
    else:
        unlisted = sorted(set(manifest.get("files", [])) - set(digests))
        if unlisted:
            raise BundleError(f"{bundle_dir}: {unlisted[0]}: listed in files but has no digest")
        # sizes first: a truncated or replaced file is found without hashing anything
        for name, expected in sorted(digests.items()):
            path = bundle_dir / name
            if not path.is_file():
                raise BundleError(f"{bundle_dir}: {name}: missing")
            size = path.stat().st_size
            if size != expected["size"]:
                raise BundleError(
                    f"{bundle_dir}: {name}: size {size} bytes, manifest says {expected['size']}"
                )
        for name, expected in sorted(digests.items()):
            if file_sha256(bundle_dir / name) != expected["sha256"]:
                raise BundleError(f"{bundle_dir}: {name}: sha256 differs from the manifest (corrupt file)")
    catalog = manifest.get("catalog")
    if catalog is not None:
        if not (bundle_dir / ITEMS_FILE).is_file():
            raise BundleError(f"{bundle_dir}: {ITEMS_FILE}: missing (the manifest names a catalog)")
        found = _items_catalog(bundle_dir / ITEMS_FILE)
        if found["num_items"] != catalog.get("num_items"):
            raise BundleError(
                f"{bundle_dir}: {ITEMS_FILE}: {found['num_items']} item ids, "
                f"manifest catalog says {catalog.get('num_items')}"
            )
        if found["fingerprint"] != catalog.get("fingerprint"):
            raise BundleError(
                f"{bundle_dir}: {ITEMS_FILE}: catalog fingerprint {found['fingerprint'][:12]} differs "
                f"from the manifest's {str(catalog.get('fingerprint'))[:12]}"
            )
    num_items = manifest.get("num_items")
    if num_items is not None and catalog is not None and int(num_items) != catalog["num_items"]:
        raise BundleError(
            f"{bundle_dir}: {ITEMS_FILE}: {catalog['num_items']} item ids, manifest num_items {num_items}"
        )


def read_manifest(bundle_dir: str | Path, kind: str, verify: bool = False) -> dict[str, Any]:
    """Read and check a bundle's manifest (kind, schema version, every listed file present);
    with ``verify`` also every file's size and sha256 and the catalog (:func:`verify_bundle`)."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise BundleError(f"no {MANIFEST} in {bundle_dir}: build it with `recsys export {kind}`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleError(f"{bundle_dir}: {MANIFEST}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{bundle_dir}: {MANIFEST}: not a JSON object")
    if manifest.get("kind") != kind:
        raise BundleError(f"{bundle_dir} is a {manifest.get('kind')!r} bundle, expected {kind!r}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"{bundle_dir}: schema {manifest.get('schema_version')} != {SCHEMA_VERSION}")
    missing = [f for f in manifest.get("files", []) if not (bundle_dir / f).is_file()]
    if missing:
        raise BundleError(f"{bundle_dir}: missing files {missing}")
    if verify:
        verify_bundle(bundle_dir, manifest)
    return manifest


def new_version(prefix: str) -> str:
    """A sortable version string, e.g. ``recall-20261128T014500``."""
    return f"{prefix}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"


# -- versioned layout ---------------------------------------------------------------------------


def is_versioned(location: str | Path) -> bool:
    """Whether ``location`` is a root of versioned bundles (it has a ``current`` link)."""
    return os.path.lexists(Path(location) / CURRENT)


def resolve_bundle(location: str | Path) -> Path:
    """The bundle directory ``location`` serves: ``location/current`` resolved in the versioned
    layout, else ``location`` itself."""
    location = Path(location)
    if is_versioned(location):
        return (location / CURRENT).resolve()
    return location


def bundle_versions(root: str | Path) -> list[str]:
    """Version folders under ``root`` (those with a manifest), oldest first (by name)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        entry.name
        for entry in root.iterdir()
        if entry.name != CURRENT
        and not entry.name.startswith(".")
        and not entry.is_symlink()
        and (entry / MANIFEST).is_file()
    )


def current_version(root: str | Path) -> str | None:
    """The version folder ``root/current`` points at (None without the link)."""
    link = Path(root) / CURRENT
    if not link.is_symlink():
        return None
    return Path(os.readlink(link)).name


def activate_version(root: str | Path, version: str) -> Path:
    """Point ``root/current`` at ``root/version`` atomically: a new relative link is created next
    to it and renamed over it, so a reader sees the old target or the new one, never none."""
    root = Path(root)
    if version in ("", CURRENT) or "/" in version or not (root / version / MANIFEST).is_file():
        raise BundleError(
            f"{root}: no bundle version {version!r} (known: {', '.join(bundle_versions(root))})"
        )
    temporary = root / f".{CURRENT}.{os.getpid()}.{time.monotonic_ns()}"
    os.symlink(version, temporary, target_is_directory=True)
    try:
        os.replace(temporary, root / CURRENT)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    log.info("bundle %s: current -> %s", root, version)
    return root / version


def rollback(root: str | Path) -> str:
    """Point ``current`` at the newest version older than the current one; returns its name."""
    root = Path(root)
    versions = bundle_versions(root)
    current = current_version(root)
    if current is None:
        raise BundleError(f"{root}: no {CURRENT} link: not a versioned bundle folder")
    older = [version for version in versions if version < current]
    if not older:
        raise BundleError(f"{root}: no version older than {current} to roll back to")
    activate_version(root, older[-1])
    return older[-1]


def publish_bundle(
    source: str | Path, root: str | Path, version: str | None = None, activate: bool = True
) -> Path:
    """Copy the bundle ``source`` into ``root/<version>`` (default: its manifest's version) and,
    with ``activate``, point ``current`` at it. The copy is verified before it becomes visible."""
    source, root = Path(source), Path(root)
    manifest = json.loads((source / MANIFEST).read_text())
    version = version or str(manifest["version"])
    read_manifest(source, str(manifest.get("kind")), verify=True)
    target = root / version
    if os.path.lexists(target):
        raise BundleError(f"{root}: version {version} already exists")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=root))
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        read_manifest(staging, str(manifest.get("kind")), verify=True)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if activate:
        activate_version(root, version)
    return target


# -- object stores (the cluster's source of bundles) ---------------------------------------------

ARCHIVE_SUFFIX = ".tar"
_STDLIB_SCHEMES = ("", "file", "http", "https")


def store_object_url(store: str, name: str, version: str) -> str:
    """Where a bundle version lives in a store: ``<store>/<name>/<version>.tar`` (the chart builds
    the same URL from ``<model>.bundle.store``, ``.name`` and ``.version``)."""
    for part, value in (("name", name), ("version", version)):
        if not value or "/" in value or value in (".", ".."):
            raise BundleError(f"bundle {part} {value!r}: must be a non-empty name without '/'")
    return f"{store.rstrip('/')}/{name}/{version}{ARCHIVE_SUFFIX}"


def pack_bundle(bundle_dir: str | Path, archive: str | Path) -> str:
    """Write the bundle's files into an uncompressed tar at ``archive`` (names relative to the
    bundle, sorted, owner and mtime fixed, so the same bundle always packs to the same bytes) with
    the manifest last (an unpacker that stops early has no manifest); returns its sha256."""
    bundle_dir = Path(bundle_dir)
    names = sorted(str(p.relative_to(bundle_dir)) for p in bundle_dir.rglob("*") if p.is_file())
    names.sort(key=lambda name: name == MANIFEST)

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.mode = 0o644
        return info

    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            tar.add(bundle_dir / name, arcname=name, recursive=False, filter=normalise)
    return file_sha256(Path(archive))


def _upload(local: Path, url: str) -> None:
    """Copy ``local`` to ``url``, refusing to replace an existing object (versions are immutable)."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme in ("", "file"):
        target = Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path)) if scheme else Path(url)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
        shutil.copyfile(local, staging)
        try:
            os.link(staging, target)  # fails if the target exists: no silent overwrite
        except FileExistsError:
            raise BundleError(f"{url} already exists: a published version is never replaced") from None
        finally:
            staging.unlink(missing_ok=True)
    elif scheme in ("http", "https"):
        request = urllib.request.Request(url, data=local.read_bytes(), method="PUT")
        request.add_header("If-None-Match", "*")  # servers that support it refuse an overwrite
        request.add_header("Content-Type", "application/octet-stream")
        try:
            with urllib.request.urlopen(request, timeout=300):
                pass
        except urllib.error.HTTPError as error:
            if error.code == 412:
                raise BundleError(f"{url} already exists: a published version is never replaced") from None
            raise BundleError(f"PUT {url}: HTTP {error.code} {error.reason}") from None
    else:
        fs, path = _fsspec(url)
        if fs.exists(path):
            raise BundleError(f"{url} already exists: a published version is never replaced")
        fs.put_file(str(local), path)


def _fsspec(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise BundleError(
            f"{url}: object stores need fsspec and the store's driver (pip install 'recsys[stores]')"
        ) from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:
        raise BundleError(f"{url}: {error} (pip install 'recsys[stores]')") from None


def publish_to_store(
    source: str | Path, store: str, name: str | None = None, version: str | None = None
) -> tuple[str, str]:
    """Verify the bundle ``source``, pack it and upload it to ``<store>/<name>/<version>.tar``
    (default name: the manifest's kind; version: the manifest's version) with a ``.sha256``
    sidecar; an existing version is never replaced. Returns (object URL, sha256 of the tar)."""
    source = Path(source)
    manifest = json.loads((source / MANIFEST).read_text())
    read_manifest(source, str(manifest.get("kind")), verify=True)
    name = name or str(manifest["kind"])
    version = version or str(manifest["version"])
    if version != str(manifest["version"]):
        raise BundleError(
            f"{source}: version {version!r} differs from the manifest's {manifest['version']!r}: the "
            "pods' bundle-version annotation and the served recsys_bundle_info would disagree"
        )
    url = store_object_url(store, name, version)
    with tempfile.TemporaryDirectory(prefix="recsys-publish-") as scratch:
        archive = Path(scratch) / f"{version}{ARCHIVE_SUFFIX}"
        digest = pack_bundle(source, archive)
        sidecar = Path(scratch) / f"{archive.name}.sha256"
        sidecar.write_text(f"{digest}  {archive.name}\n")
        _upload(archive, url)
        _upload(sidecar, f"{url}.sha256")
    log.info("published %s (sha256 %s)", url, digest)
    return url, digest


def main(argv: list[str] | None = None) -> int:
    """`recsys bundle list|verify|publish|activate|rollback --bundle DIR`, `publish SRC --store URL`."""
    parser = argparse.ArgumentParser(
        prog="recsys bundle", description="List, verify, publish, activate or roll back bundle versions."
    )
    parser.add_argument("action", choices=("list", "verify", "publish", "activate", "rollback"))
    parser.add_argument("version", nargs="?", help="activate: the version; publish: the source bundle dir")
    parser.add_argument("--bundle", type=Path, help="bundle folder (versioned: has `current`)")
    parser.add_argument("--name", help="publish: version folder name (default: the manifest's version)")
    parser.add_argument("--no-activate", action="store_true", help="publish without repointing current")
    parser.add_argument(
        "--store",
        help="publish: upload <STORE>/<model>/<version>.tar instead (s3://bucket/prefix, gs://..., "
        "https://..., file:///...); prints the chart values that fetch it",
    )
    parser.add_argument("--model", help="publish --store: the folder under the store (default: the kind)")
    args = parser.parse_args(argv)
    if args.bundle is None and not (args.action == "publish" and args.store):
        parser.error("--bundle is required (publish: --bundle or --store)")
    try:
        if args.action == "list":
            current = current_version(args.bundle)
            for version in bundle_versions(args.bundle):
                print(f"{'*' if version == current else ' '} {version}")
        elif args.action == "verify":
            bundle_dir = resolve_bundle(args.bundle)
            started = time.perf_counter()
            kind = json.loads((bundle_dir / MANIFEST).read_text()).get("kind", "")
            manifest = read_manifest(bundle_dir, kind, verify=True)
            print(f"{bundle_dir}: {manifest['version']} ok ({time.perf_counter() - started:.3f} s)")
        elif args.action == "publish":
            if not args.version:
                parser.error("publish needs the source bundle folder")
            if args.store:
                manifest = json.loads((Path(args.version) / MANIFEST).read_text())
                url, digest = publish_to_store(Path(args.version), args.store, args.model, args.name)
                kind = manifest["kind"]  # the chart's component: recall | rank
                values = [f"{kind}.bundle.version={manifest['version']}", f"{kind}.bundle.sha256={digest}"]
                if args.model:
                    values.append(f"{kind}.bundle.name={args.model}")
                print(f"published {url}\nsha256 {digest}")
                print("helm values: " + " ".join(f"--set {value}" for value in values))
            else:
                target = publish_bundle(Path(args.version), args.bundle, args.name, not args.no_activate)
                print(f"published {target}")
        elif args.action == "activate":
            if not args.version:
                parser.error("activate needs a version (see `recsys bundle list`)")
            activate_version(args.bundle, args.version)
            print(f"{args.bundle}: current -> {args.version}")
        else:
            print(f"{args.bundle}: current -> {rollback(args.bundle)}")
    except (BundleError, OSError, ValueError, KeyError) as error:
        print(f"recsys bundle {args.action}: {error}", file=sys.stderr)
        return 1
    return 0
