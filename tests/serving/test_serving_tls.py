"""TLS and mutual TLS round trips on a real server, with certificates generated for the test."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
import pytest

from recsys.serving.bootstrap import RunningServer, client_channel_credentials, open_channel
from recsys.serving.config import ServingConfig
from recsys.v1 import recall_pb2, recall_pb2_grpc
from tests.serving.conftest import candidate_count

pytestmark = pytest.mark.integration

ServeFactory = Callable[..., Awaitable[RunningServer]]  # the `serve` fixture (conftest.py)


async def call_recall(running: RunningServer, credentials: grpc.ChannelCredentials | None) -> int:
    """Number of candidates from one Recall over ``localhost`` (the name in the server cert)."""
    async with open_channel(f"localhost:{running.port}", credentials=credentials) as channel:
        response = await recall_pb2_grpc.RecallServiceStub(channel).Recall(
            recall_pb2.RecallRequest(k=2), timeout=5
        )
    return candidate_count(response)


async def test_tls_round_trip_and_plaintext_is_refused(serve: ServeFactory, certificates) -> None:
    config = ServingConfig(
        host="127.0.0.1", tls_cert=certificates.server_cert, tls_key=certificates.server_key
    )
    running = await serve(config)

    assert await call_recall(running, client_channel_credentials(certificates.ca_cert)) == 2
    with pytest.raises(grpc.aio.AioRpcError) as plaintext:
        await call_recall(running, None)
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as untrusted:
        await call_recall(running, client_channel_credentials(certificates.other_ca_cert))
    assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_needs_a_client_certificate(serve: ServeFactory, certificates) -> None:
    config = ServingConfig(
        host="127.0.0.1",
        tls_cert=certificates.server_cert,
        tls_key=certificates.server_key,
        tls_client_ca=certificates.ca_cert,
    )
    running = await serve(config)

    with_client_cert = client_channel_credentials(
        certificates.ca_cert, client_cert=certificates.client_cert, client_key=certificates.client_key
    )
    assert await call_recall(running, with_client_cert) == 2
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await call_recall(running, client_channel_credentials(certificates.ca_cert))
    assert anonymous.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_credentials_need_cert_and_key_together(certificates) -> None:
    with pytest.raises(ValueError, match="client_cert, client_key"):
        client_channel_credentials(certificates.ca_cert, client_cert=certificates.client_cert)
