"""The chart's exec probe (files/grpc_health_probe.py, used when `internalTLS` is on) against a real
mutual-TLS server started by the serving bootstrap, with certificates made the way the chart's
README asks for them (one CA; `server auth` + `client auth` usages)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from recsys.serving.bootstrap import start_server
from recsys.serving.config import ServingConfig
from tests.deploy.chart import CHART_DIR

PROBE = CHART_DIR / "files" / "grpc_health_probe.py"
SERVICE = "recsys.v1.RecallService"


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def issue(directory: Path, ca: str, name: str, dns: str, usages: str) -> None:
    """``name``.crt/.key for ``dns``, signed by ``ca``.crt/.key, with extended key ``usages``."""
    key, csr, ext = (directory / f"{name}.{suffix}" for suffix in ("key", "csr", "ext"))
    ext.write_text(f"subjectAltName=DNS:{dns}\nextendedKeyUsage={usages}\nbasicConstraints=CA:FALSE\n")
    openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr),
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(directory / f"{ca}.crt"),
        "-CAkey", str(directory / f"{ca}.key"), "-CAcreateserial", "-days", "1",
        "-extfile", str(ext), "-out", str(directory / f"{name}.crt"),
    )  # fmt: skip


def new_ca(directory: Path, name: str) -> None:
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-days", "1", "-subj", f"/CN={name}",
        "-keyout", str(directory / f"{name}.key"), "-out", str(directory / f"{name}.crt"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("tls")
    new_ca(directory, "ca")
    new_ca(directory, "other-ca")
    both = "serverAuth,clientAuth"
    issue(directory, "ca", "recall", "shop-recsys-recall-headless.shop.svc.cluster.local", both)
    issue(directory, "ca", "wildcard", "*.shop.svc.cluster.local", both)
    issue(directory, "ca", "server-only", "shop-recsys-rank-headless.shop.svc.cluster.local", "serverAuth")
    issue(directory, "other-ca", "stranger", "shop-recsys-recall-headless.shop.svc.cluster.local", both)
    return directory


async def probe(port: int, directory: Path, name: str, service: str = "") -> tuple[int, str]:
    """Run the probe as kubelet would (a separate process) with ``name``'s certificate."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(PROBE), "--port", str(port), "--service", service,
        "--cert", str(directory / f"{name}.crt"), "--key", str(directory / f"{name}.key"),
        "--ca", str(directory / "ca.crt"), "--timeout", "5",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, (stdout + stderr).decode()


async def serve(directory: Path, name: str, warmup: asyncio.Event) -> object:
    config = ServingConfig(
        host="127.0.0.1",
        tls_cert=directory / f"{name}.crt",
        tls_key=directory / f"{name}.key",
        tls_client_ca=directory / "ca.crt",
    )
    return await start_server(config, "recall", lambda server: [SERVICE], warmup.wait, wait_for_warmup=False)


async def test_probe_follows_health_over_mutual_tls(certificates: Path) -> None:
    warmed = asyncio.Event()
    running = await serve(certificates, "recall", warmed)
    try:
        code, output = await probe(running.port, certificates, "recall")
        assert code == 1 and "NOT_SERVING" in output  # still warming up: not ready
        warmed.set()
        await running.wait_until_serving()
        assert await probe(running.port, certificates, "recall") == (0, "SERVING\n")
        assert (await probe(running.port, certificates, "recall", SERVICE))[0] == 0
        await running.health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert (await probe(running.port, certificates, "recall", SERVICE))[0] == 1
        # A client certificate from another CA is refused: recall really requires the CA's.
        code, output = await probe(running.port, certificates, "stranger")
        assert code == 1 and "health check failed" in output
    finally:
        await running.stop(grace=0)


async def test_probe_handles_wildcards_and_explains_a_missing_client_usage(certificates: Path) -> None:
    warmed = asyncio.Event()
    warmed.set()
    running = await serve(certificates, "wildcard", warmed)
    try:
        await running.wait_until_serving()
        assert await probe(running.port, certificates, "wildcard") == (0, "SERVING\n")
    finally:
        await running.stop(grace=0)
    # Why the README asks for `client auth` too: a server-only certificate cannot be the probe's.
    running = await serve(certificates, "server-only", warmed)
    try:
        await running.wait_until_serving()
        code, _ = await probe(running.port, certificates, "server-only")
        assert code == 1
    finally:
        await running.stop(grace=0)
