"""The CPU floor of one gRPC hop on this host: an echo server and an open-loop client, no work.

`recsys bench cpu` reports it beside the cascade's own work: the served CPU per request is about
(own work) + (public call's server side) + (each internal hop's client and server side), so the
floor says how much of a request no Python-level optimisation of the services can remove.

    python -m recsys.app.grpc_floor --rate 200 --seconds 5 --bytes 12000

starts ``python -m recsys.app.grpc_floor --serve`` (a ``grpc.aio`` server whose one unary method
returns its request) in its own process, with the services' gRPC settings (``recsys.grpc_env``;
the client has them when run through ``recsys bench``), sends ``rate`` calls a second on the
schedule (latency is not the point here, CPU is), and prints JSON: CPU-milliseconds per call of
the server process (from /proc) and of the client (``time.process_time``), with the gRPC version,
the server's ``GRPC_EXPERIMENTS`` and the event loop the services use
(``recsys.serving.bootstrap.run_event_loop``: uvloop when installed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import grpc

from recsys.grpc_env import GRPC_EXPERIMENTS_VARIABLE, serving_setting
from recsys.serving.bootstrap import run_event_loop
from recsys.timing import process_cpu_seconds

SERVICE, METHOD = "recsys.bench.Echo", "Echo"


async def serve() -> None:
    """Echo server on a free loopback port; prints the port, serves until killed."""

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(echo)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def send(port: int, rate: float, seconds: float, size: int, warmup: int = 50) -> tuple[int, float]:
    """``rate`` calls a second for ``seconds`` (after ``warmup`` calls); returns (calls, client CPU s)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(f"/{SERVICE}/{METHOD}")
        payload = b"x" * size
        for _ in range(warmup):
            await call(payload, timeout=5)
        calls = int(rate * seconds)
        cpu_started, started = time.process_time(), time.perf_counter()
        pending = []
        for number in range(calls):
            delay = started + number / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.ensure_future(call(payload, timeout=5)))
        await asyncio.gather(*pending)
        return calls, time.process_time() - cpu_started


def measure(rate: float, seconds: float, size: int) -> dict[str, Any]:
    """One echo hop's CPU per call at ``rate`` calls/s with ``size``-byte requests and responses."""
    # the server runs with the services' gRPC settings
    environment = {**os.environ, GRPC_EXPERIMENTS_VARIABLE: serving_setting(os.environ)}
    server = subprocess.Popen(
        [sys.executable, "-m", "recsys.app.grpc_floor", "--serve"],
        stdout=subprocess.PIPE,
        text=True,
        env=environment,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        run_event_loop(send(port, rate, 1.0, size))  # warm both ends before counting
        server_before = process_cpu_seconds(server.pid)
        calls, client_cpu = run_event_loop(send(port, rate, seconds, size, warmup=0))
        server_cpu = process_cpu_seconds(server.pid) - server_before
    finally:
        server.terminate()
        server.wait(timeout=10)
    return {
        "rate": rate,
        "seconds": seconds,
        "bytes": size,
        "calls": calls,
        "server_cpu_ms_per_call": round(server_cpu * 1000 / calls, 3),
        "client_cpu_ms_per_call": round(client_cpu * 1000 / calls, 3),
        "grpc": grpc.__version__,
        "grpc_experiments": environment[GRPC_EXPERIMENTS_VARIABLE],
        "event_loop": event_loop_name(),
    }


def event_loop_name() -> str:
    """The loop ``run_event_loop`` runs on here: ``uvloop`` or ``asyncio``."""

    async def name() -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    return run_event_loop(name())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recsys.app.grpc_floor", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--serve", action="store_true", help="run the echo server (prints its port)")
    parser.add_argument("--rate", type=float, default=200.0, help="calls per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--bytes", type=int, default=12000, help="request (and response) size")
    args = parser.parse_args(argv)
    if args.serve:
        run_event_loop(serve())
        return 0
    print(json.dumps(measure(args.rate, args.seconds, args.bytes)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
