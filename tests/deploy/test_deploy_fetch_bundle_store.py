"""`recsys bundle publish --store` and the chart's fetch init container against object stores:
an S3 emulator (moto in server mode, on loopback) and a plain HTTP server, end to end with the
URL the chart builds, the sha256 publish prints and a version check."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from recsys.bundle import BundleError, pack_bundle, publish_to_store, store_object_url, write_manifest
from tests.deploy.chart import CHART_DIR

SCRIPT = CHART_DIR / "files" / "fetch_bundle.py"
VERSION = "rank-20261201T060000"


def make_bundle(root: Path, version: str = VERSION) -> Path:
    root.mkdir(parents=True)
    (root / "items.npy").write_bytes(b"\x93NUMPY fake array")
    (root / "graph").mkdir()
    (root / "graph" / "model.onnx").write_bytes(b"onnx bytes")
    write_manifest(root, "rank", version, "data-fingerprint")
    return root


def fetch(url: str, sha256: str, dest: Path, env: dict[str, str] | None = None, version: str = VERSION):
    """Run the init container's script as the pod does: a separate process."""
    command = [sys.executable, str(SCRIPT), "--url", url, "--version", version, "--sha256", sha256]
    return subprocess.run(
        [*command, "--dest", str(dest)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_packing_is_deterministic_and_the_manifest_comes_last(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    first = pack_bundle(bundle, tmp_path / "a.tar")
    os.utime(bundle / "items.npy", (1, 1))
    assert pack_bundle(bundle, tmp_path / "b.tar") == first
    with tarfile.open(tmp_path / "a.tar") as tar:
        names = tar.getnames()
    assert names[-1] == "manifest.json" and sorted(names) == [
        "graph/model.onnx",
        "items.npy",
        "manifest.json",
    ]
    assert store_object_url("s3://b/p/", "rank", VERSION) == f"s3://b/p/rank/{VERSION}.tar"
    with pytest.raises(BundleError, match="without '/'"):
        store_object_url("s3://b", "rank", "../latest")


def test_publish_to_a_path_store_is_immutable_and_fetchable(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundle")
    store = tmp_path / "store"
    url, digest = publish_to_store(bundle, store.as_uri())
    assert url == f"{store.as_uri()}/rank/{VERSION}.tar"
    archive = store / "rank" / f"{VERSION}.tar"
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == digest
    assert (store / "rank" / f"{VERSION}.tar.sha256").read_text().split()[0] == digest
    with pytest.raises(BundleError, match="never replaced"):
        publish_to_store(bundle, store.as_uri())
    with pytest.raises(BundleError, match="differs from the manifest"):
        publish_to_store(bundle, store.as_uri(), version="rank-other")

    dest = tmp_path / "pod" / "bundles" / "rank"
    result = fetch(url, digest, dest)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["version"] == VERSION
    assert (dest / "graph" / "model.onnx").read_bytes() == b"onnx bytes"
    # Another version than the chart asked for is refused, even with the right checksum.
    other = fetch(url, digest, tmp_path / "pod2", version="rank-20261202T060000")
    assert other.returncode == 1 and "expected 'rank-20261202T060000'" in other.stderr
    assert not (tmp_path / "pod2" / "manifest.json").exists()


def test_a_corrupt_file_inside_a_matching_archive_is_refused(tmp_path: Path) -> None:
    """The archive's sha256 proves the upload; the manifest's digests prove the bundle."""
    bundle = make_bundle(tmp_path / "bundle")
    (bundle / "items.npy").write_bytes(b"\x93NUMPY other array")  # after the manifest was written
    archive = tmp_path / "bundle.tar"
    digest = pack_bundle(bundle, archive)
    result = fetch(archive.as_uri(), digest, tmp_path / "dest")
    assert result.returncode == 1 and "items.npy: size or sha256 differs" in result.stderr
    assert not (tmp_path / "dest" / "manifest.json").exists()


@pytest.fixture
def s3_emulator() -> Iterator[dict[str, str]]:
    """moto's S3 in server mode on a free loopback port, with a bucket; yields the environment a
    client needs (endpoint and dummy credentials, as a pod would get from its config)."""
    server_module = pytest.importorskip(
        "moto.server", reason="moto is not installed (pip install -e '.[dev]')"
    )
    pytest.importorskip("s3fs", reason="s3fs is not installed (the `stores` extra)")
    pytest.importorskip("flask", reason="flask is not installed (moto's server mode)")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="models")
        yield env
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


def test_publish_and_fetch_through_an_s3_emulator(s3_emulator: dict[str, str], tmp_path: Path) -> None:
    import fsspec

    fsspec.config.conf.clear()
    bundle = make_bundle(tmp_path / "bundle")
    url, digest = publish_to_store(bundle, "s3://models/recsys")
    assert url == f"s3://models/recsys/rank/{VERSION}.tar"
    with pytest.raises(BundleError, match="never replaced"):
        publish_to_store(bundle, "s3://models/recsys")

    dest = tmp_path / "pod" / "bundles" / "rank"
    result = fetch(url, digest, dest, env=s3_emulator)
    assert result.returncode == 0, result.stderr
    assert json.loads((dest / "manifest.json").read_text())["version"] == VERSION
    missing = fetch(
        "s3://models/recsys/rank/rank-never-published.tar", digest, tmp_path / "x", env=s3_emulator
    )
    assert missing.returncode == 1 and "cannot download" in missing.stderr


def test_the_cli_prints_the_chart_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recsys.bundle import main

    bundle = make_bundle(tmp_path / "bundle")
    store = (tmp_path / "store").as_uri()
    assert main(["publish", str(bundle), "--store", store]) == 0
    out = capsys.readouterr().out
    digest = hashlib.sha256((tmp_path / "store" / "rank" / f"{VERSION}.tar").read_bytes()).hexdigest()
    assert f"--set rank.bundle.version={VERSION} --set rank.bundle.sha256={digest}" in out
    assert main(["publish", str(bundle), "--store", store]) == 1  # immutable
