"""The serving bootstrap shared by recall, rank and gateway: typed config from env/flags, a
``grpc.aio`` server with health, reflection, RED metrics and ``/metrics``, optional (mutual) TLS,
JSON logs, graceful shutdown on SIGTERM, and request validation helpers.

Import the submodules directly (``recsys.serving.bootstrap``, ``.config``, ``.metrics``,
``.validation``, ``.logging``); the most used names are re-exported here.
"""

from recsys.serving.bootstrap import (
    RunningServer,
    client_channel_credentials,
    open_channel,
    run_until_signal,
    start_server,
)
from recsys.serving.config import (
    ConfigError,
    ServingConfig,
    add_serving_arguments,
    env_default,
    serving_config_from_args,
)
from recsys.serving.logging import configure_logging
from recsys.serving.metrics import bundle_info, new_registry
from recsys.serving.validation import (
    InvalidArgument,
    grpc_method,
    require,
    require_id,
    require_in_range,
)

__all__ = [
    "ConfigError",
    "InvalidArgument",
    "RunningServer",
    "ServingConfig",
    "add_serving_arguments",
    "bundle_info",
    "client_channel_credentials",
    "configure_logging",
    "env_default",
    "grpc_method",
    "new_registry",
    "open_channel",
    "require",
    "require_id",
    "require_in_range",
    "run_until_signal",
    "serving_config_from_args",
    "start_server",
]
