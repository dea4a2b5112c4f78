"""A recall server run as a subprocess by test_serving_shutdown.py (not a test module).

Usage: ``python tests/serving/sigterm_server.py GRACE_SECONDS``. Prints ``{"port": N}`` on stdout
once SERVING, then serves until SIGTERM/SIGINT via run_until_signal and exits 0. Each Recall call
prints ``in-flight`` and then answers only once shutdown has begun (so it is provably in flight
during the grace period); ``scenario == "hang"`` never answers. Logging is left unconfigured, as
in a bare process, so the bootstrap's default JSON logs go to stderr.
"""

from __future__ import annotations

import asyncio
import json
import sys

import grpc

from recsys.serving.bootstrap import RunningServer, run_until_signal, start_server
from recsys.serving.config import ServingConfig
from recsys.serving.validation import grpc_method
from recsys.v1 import recall_pb2, recall_pb2_grpc


class DrainingRecall(recall_pb2_grpc.RecallServiceServicer):
    def __init__(self) -> None:
        self.running: RunningServer | None = None

    @grpc_method
    async def Recall(
        self, request: recall_pb2.RecallRequest, context: grpc.aio.ServicerContext
    ) -> recall_pb2.RecallResponse:
        print("in-flight", flush=True)
        if request.scenario == "hang":
            await asyncio.Event().wait()
        while self.running is None or not self.running.stopping:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # answer after NOT_SERVING went out, inside the grace period
        return recall_pb2.RecallResponse(model_version="drained")


async def main(grace_seconds: float) -> int:
    servicer = DrainingRecall()

    def register(server: grpc.aio.Server) -> list[str]:
        recall_pb2_grpc.add_RecallServiceServicer_to_server(servicer, server)
        return ["recsys.v1.RecallService"]

    config = ServingConfig(host="127.0.0.1", grace_seconds=grace_seconds)
    servicer.running = await start_server(config, "recall", register)
    print(json.dumps({"port": servicer.running.port}), flush=True)
    await run_until_signal(servicer.running)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(float(sys.argv[1]))))
