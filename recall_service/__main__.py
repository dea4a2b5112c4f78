"""`recsys serve recall` / `python -m recall_service`: parse config, serve until SIGTERM."""

from __future__ import annotations

from recsys.grpc_env import apply_serving_defaults

apply_serving_defaults()  # before anything below imports grpc

import sys

from recall_service.config import from_args
from recall_service.server import serve
from recsys.serving.bootstrap import run_event_loop, run_until_signal
from recsys.serving.config import ConfigError
from recsys.serving.logging import configure_logging


def main(argv: list[str] | None = None) -> int:
    try:
        config = from_args(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as error:
        print(f"recsys serve recall: {error}", file=sys.stderr)
        return 2
    configure_logging("recall", config.serving.log_level)

    async def run() -> None:
        await run_until_signal(await serve(config))

    run_event_loop(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
