"""`recsys serve rank` / `python -m rank_service`: parse config, serve until SIGTERM."""

from __future__ import annotations

from recsys.grpc_env import apply_serving_defaults

apply_serving_defaults()  # before anything below imports grpc

import sys

from rank_service.config import RankConfig
from rank_service.server import serve
from recsys.serving.bootstrap import run_event_loop, run_until_signal
from recsys.serving.config import ConfigError
from recsys.serving.logging import configure_logging


async def _serve(config: RankConfig) -> None:
    running = await serve(config)
    await run_until_signal(running)


def main(argv: list[str] | None = None) -> int:
    try:
        config = RankConfig.from_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as error:
        print(f"recsys serve rank: {error}", file=sys.stderr)
        return 2
    configure_logging("rank", config.serving.log_level)
    run_event_loop(_serve(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
