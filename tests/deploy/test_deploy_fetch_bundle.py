"""The chart's bundle init container script (files/fetch_bundle.py): download, sha256, safe unpack."""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.deploy.chart import CHART_DIR

SCRIPT = CHART_DIR / "files" / "fetch_bundle.py"
MANIFEST = {"kind": "recall", "version": "recall-20260101T000000", "files": ["items.npy"]}


@pytest.fixture(scope="module")
def fetch_bundle() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fetch_bundle", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tarball(path: Path, members: dict[str, bytes]) -> str:
    """Write a .tar.gz with ``members`` (name -> bytes); returns its sha256."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bundle_members(prefix: str = "") -> dict[str, bytes]:
    return {f"{prefix}manifest.json": json.dumps(MANIFEST).encode(), f"{prefix}items.npy": b"\x93NUMPY fake"}


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A loopback HTTP server over a temporary folder: (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("prefix", ["", "recall-20260101T000000/"])
def test_fetches_and_unpacks_a_verified_bundle_over_http(
    fetch_bundle: ModuleType, http_root: tuple[Path, str], tmp_path: Path, prefix: str
) -> None:
    root, base_url = http_root
    digest = make_tarball(root / "bundle.tgz", bundle_members(prefix))
    dest = tmp_path / "bundles" / "recall"
    status = fetch_bundle.main(
        ["--url", f"{base_url}/bundle.tgz", "--sha256", digest.upper(), "--dest", str(dest)]
    )
    assert status == 0
    assert sorted(p.name for p in dest.iterdir()) == ["items.npy", "manifest.json"]
    assert json.loads((dest / "manifest.json").read_text()) == MANIFEST


def test_a_checksum_mismatch_leaves_no_bundle(fetch_bundle: ModuleType, tmp_path: Path) -> None:
    archive = tmp_path / "bundle.tgz"
    make_tarball(archive, bundle_members())
    dest = tmp_path / "dest"
    status = fetch_bundle.main(["--url", archive.as_uri(), "--sha256", "f" * 64, "--dest", str(dest)])
    assert status == 1
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize(
    "members",
    [
        {"items.npy": b"no manifest"},
        {"manifest.json": b"{}", "../escape.txt": b"outside the bundle"},
    ],
    ids=["no-manifest", "path-traversal"],
)
def test_unsafe_or_incomplete_archives_are_refused(
    fetch_bundle: ModuleType, tmp_path: Path, members: dict[str, bytes]
) -> None:
    archive = tmp_path / "bundle.tgz"
    digest = make_tarball(archive, members)
    dest = tmp_path / "bundles" / "recall"
    status = fetch_bundle.main(["--url", archive.as_uri(), "--sha256", digest, "--dest", str(dest)])
    assert status == 1
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "bundles" / "escape.txt").exists()


def test_an_existing_bundle_is_kept(fetch_bundle: ModuleType, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "manifest.json").write_text(json.dumps(MANIFEST))
    missing = (tmp_path / "nowhere.tgz").as_uri()
    assert fetch_bundle.main(["--url", missing, "--sha256", "0" * 64, "--dest", str(dest)]) == 0
