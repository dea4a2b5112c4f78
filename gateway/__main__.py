"""`recsys serve gateway` / `python -m gateway`: parse config, serve until SIGTERM/SIGINT."""

from __future__ import annotations

from recsys.grpc_env import apply_serving_defaults

apply_serving_defaults()  # before anything below imports grpc

import asyncio
import signal
import sys

from gateway.config import GatewayConfig
from gateway.server import serve
from recsys.scenario.spec import ScenarioConfigError
from recsys.serving.bootstrap import run_event_loop, run_until_signal
from recsys.serving.logging import configure_logging


async def _serve(config: GatewayConfig) -> None:
    gateway = await serve(config)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, gateway.reload_scenarios)  # reload scenarios without restart
    try:
        await run_until_signal(gateway)  # type: ignore[arg-type]  # GatewayServer wraps RunningServer
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        await gateway.stop()


def main(argv: list[str] | None = None) -> int:
    config = GatewayConfig.from_args(sys.argv[1:] if argv is None else argv)
    configure_logging("gateway", config.serving.log_level)
    try:
        run_event_loop(_serve(config))
    except ScenarioConfigError as error:
        print(f"recsys serve gateway: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
