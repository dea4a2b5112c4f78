"""Fixtures for the serving bootstrap tests: a small RecallService servicer built on the real
generated stubs, a factory that starts real servers on port 0 (stopped after each test), and
test certificates (a CA, a server cert for localhost, a client cert) made with the openssl CLI."""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from recsys.serving.bootstrap import RunningServer, start_server
from recsys.serving.config import ServingConfig
from recsys.serving.validation import grpc_method, require_id, require_in_range
from recsys.serving.wire import INDEX, SCORE, pack
from recsys.v1 import recall_pb2, recall_pb2_grpc

RECALL_SERVICE = "recsys.v1.RecallService"


class RecallForTest(recall_pb2_grpc.RecallServiceServicer):
    """Validates like a real servicer; ``scenario == "explode"`` raises an unexpected error."""

    @grpc_method
    async def Recall(
        self, request: recall_pb2.RecallRequest, context: grpc.aio.ServicerContext
    ) -> recall_pb2.RecallResponse:
        require_in_range(request.k, "k", 1, 10000)
        require_id(request.user_id, "user_id", allow_empty=True)
        for position, quota in enumerate(request.sources):
            require_id(quota.source, f"sources[{position}].source")
        if request.scenario == "explode":
            raise RuntimeError("index corrupted")
        count = min(request.k, 5)
        return recall_pb2.RecallResponse(
            items=pack(range(count), INDEX),
            scores=pack([1.0 / (rank + 1) for rank in range(count)], SCORE),
            model_version="test",
        )


def candidate_count(response: recall_pb2.RecallResponse) -> int:
    """Candidates in a packed RecallResponse."""
    return len(response.items) // INDEX.itemsize


def register_recall(server: grpc.aio.Server) -> list[str]:
    recall_pb2_grpc.add_RecallServiceServicer_to_server(RecallForTest(), server)
    return [RECALL_SERVICE]


ServeFactory = Callable[..., Awaitable[RunningServer]]


@pytest.fixture(autouse=True)
def restore_root_logging() -> Any:
    """start_server installs JSON logging on the root logger; undo it so other tests see none."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
async def serve() -> AsyncIterator[ServeFactory]:
    """``await serve(config=None, warmup=None, **start_server_kwargs)`` -> a RunningServer on
    127.0.0.1 with any free ports, serving RecallForTest; stopped at teardown."""
    started: list[RunningServer] = []

    async def start(config: ServingConfig | None = None, **kwargs: Any) -> RunningServer:
        config = config or ServingConfig(host="127.0.0.1", port=0, metrics_port=0, grace_seconds=1.0)
        running = await start_server(config, "recall", register_recall, **kwargs)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.stop(grace=0)


@dataclass(frozen=True)
class CertificateSet:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path  # a CA that signed nothing here: clients trusting only it must fail


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(name: str, folder: Path) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip


def _make_leaf(name: str, ca: str, extensions: str, folder: Path) -> None:
    (folder / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=folder,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext",
        cwd=folder,
    )  # fmt: skip


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> CertificateSet:
    """A test CA with a server certificate for localhost/127.0.0.1 and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to generate test certificates")
    folder = tmp_path_factory.mktemp("certs")
    _make_ca("test-ca", folder)
    _make_ca("other-ca", folder)
    _make_leaf(
        "server",
        "test-ca",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        folder,
    )
    _make_leaf("client", "test-ca", "extendedKeyUsage=clientAuth\n", folder)
    return CertificateSet(
        ca_cert=folder / "test-ca.crt",
        server_cert=folder / "server.crt",
        server_key=folder / "server.key",
        client_cert=folder / "client.crt",
        client_key=folder / "client.key",
        other_ca_cert=folder / "other-ca.crt",
    )
