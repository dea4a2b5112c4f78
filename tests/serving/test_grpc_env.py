"""The serving processes start with gRPC's serving settings (recsys/grpc_env.py) in force."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from recsys import grpc_env

ENTRY_POINTS = [
    "gateway.__main__",
    "rank_service.__main__",
    "recall_service.__main__",
    "recsys.app.inprocess",
]


def fresh_python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``code`` (with ``args``) in a new interpreter whose environment has no GRPC_EXPERIMENTS
    unless given."""
    environment = {k: v for k, v in os.environ.items() if k != grpc_env.GRPC_EXPERIMENTS_VARIABLE}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=environment, timeout=120
    )


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_each_entry_point_sets_the_serving_default_before_grpc_loads(module):
    # Set after grpc loaded, the variable would read as unset here (apply_serving_defaults -> None).
    done = fresh_python(
        "import importlib, os\n"
        f"importlib.import_module({module!r})\n"
        "print(os.environ.get('GRPC_EXPERIMENTS'))"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == grpc_env.SERVING_GRPC_EXPERIMENTS


def test_the_cli_serve_path_resolves_the_entry_point_before_grpc_loads():
    done = fresh_python(
        "import os\n"
        "from recsys.app.cli import _resolve\n"
        "_resolve('rank_service.__main__:main')\n"
        "print(os.environ.get('GRPC_EXPERIMENTS'))"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == grpc_env.SERVING_GRPC_EXPERIMENTS


def test_an_operators_own_setting_is_kept_even_empty():
    for value in ("", "-event_engine_client"):
        done = fresh_python(
            "import os, rank_service.__main__\nprint(repr(os.environ['GRPC_EXPERIMENTS']))",
            GRPC_EXPERIMENTS=value,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip().splitlines()[-1] == repr(value)


def test_too_late_is_reported_not_pretended(monkeypatch):
    monkeypatch.delenv(grpc_env.GRPC_EXPERIMENTS_VARIABLE, raising=False)
    import grpc  # noqa: F401 - loaded: the C-core has read its settings already

    assert grpc_env.apply_serving_defaults() is None
    assert grpc_env.GRPC_EXPERIMENTS_VARIABLE not in os.environ


def test_grpc_honours_the_default_its_calls_use_the_iomgr_tcp_endpoints():
    # A guard for gRPC upgrades: the experiments named must still switch the I/O path. With the
    # default, the `tcp` trace shows iomgr's endpoint ("notify_on_read"); with EventEngine's it
    # shows "Endpoint[...]" lines instead.
    code = (
        "from recsys.grpc_env import apply_serving_defaults\n"
        "apply_serving_defaults()\n"
        "import asyncio, grpc\n"
        "async def main():\n"
        "    server = grpc.aio.server()\n"
        "    port = server.add_insecure_port('127.0.0.1:0')\n"
        "    await server.start()\n"
        "    async with grpc.aio.insecure_channel(f'127.0.0.1:{port}') as channel:\n"
        "        try:\n"
        "            await channel.unary_unary('/x.Y/Z')(b'', timeout=5)\n"
        "        except grpc.aio.AioRpcError as error:\n"
        "            assert error.code() == grpc.StatusCode.UNIMPLEMENTED\n"
        "    await server.stop(None)\n"
        "asyncio.run(main())\n"
    )
    served = fresh_python(code, GRPC_TRACE="tcp", GRPC_VERBOSITY="debug")
    assert served.returncode == 0, served.stderr[-2000:]
    assert "notify_on_read" in served.stderr
    engine = fresh_python(code, GRPC_TRACE="tcp", GRPC_VERBOSITY="debug", GRPC_EXPERIMENTS="")
    assert engine.returncode == 0, engine.stderr[-2000:]
    assert "notify_on_read" not in engine.stderr


def test_mutual_tls_works_on_the_serving_io_path(certificates):
    # TLS is tested in-process elsewhere, where pytest's grpc runs gRPC's default I/O path; the
    # services run the serving default, so the handshake is checked on it too.
    code = (
        "from recsys.grpc_env import apply_serving_defaults\n"
        "apply_serving_defaults()\n"
        "import asyncio, grpc, sys\n"
        "ca, cert, key, client_cert, client_key = (open(p, 'rb').read() for p in sys.argv[1:6])\n"
        "async def main():\n"
        "    server = grpc.aio.server()\n"
        "    credentials = grpc.ssl_server_credentials([(key, cert)], ca, require_client_auth=True)\n"
        "    port = server.add_secure_port('127.0.0.1:0', credentials)\n"
        "    await server.start()\n"
        "    client = grpc.ssl_channel_credentials(ca, client_key, client_cert)\n"
        "    async with grpc.aio.secure_channel(f'127.0.0.1:{port}', client) as channel:\n"
        "        try:\n"
        "            await channel.unary_unary('/x.Y/Z')(b'', timeout=10)\n"
        "        except grpc.aio.AioRpcError as error:\n"
        "            print(error.code().name)\n"
        "    await server.stop(None)\n"
        "asyncio.run(main())\n"
    )
    paths = [
        certificates.ca_cert,
        certificates.server_cert,
        certificates.server_key,
        certificates.client_cert,
        certificates.client_key,
    ]
    done = fresh_python(code, *map(str, paths), GRPC_TRACE="tcp", GRPC_VERBOSITY="debug")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "UNIMPLEMENTED"  # handshake done, method unknown
    assert "notify_on_read" in done.stderr
