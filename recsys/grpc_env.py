"""gRPC's C-core settings for the serving processes, applied before ``grpc`` is imported.

gRPC reads ``GRPC_EXPERIMENTS`` once, when the ``grpc`` module loads its C-core; setting it later
changes nothing. Each service's ``__main__`` (and the in-process stack's) therefore calls
:func:`apply_serving_defaults` before its first import that reaches ``grpc``. This module imports
nothing that imports ``grpc``.

The default turns the EventEngine I/O paths off (gRPC's older iomgr TCP endpoints): on a 2-core
host with the three services and the load generator, `recsys bench e2e --stacks
grpc,grpc_event_engine --rates 200,300 --scenarios home` measured 0.97x the CPU per request at
200 req/s (4.62-4.65 vs 4.73-4.85 ms) and 0.98x at 300, p50 0.90x / 0.89x (grpcio 1.85.3;
docs/EXPERIMENTS.md); an AVX2-only host earlier showed no change of the stack's CPU. An
operator's own ``GRPC_EXPERIMENTS`` (even empty: gRPC's defaults) is kept as it is.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

GRPC_EXPERIMENTS_VARIABLE = "GRPC_EXPERIMENTS"
SERVING_GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints"


def serving_setting(environment: Mapping[str, str]) -> str:
    """The ``GRPC_EXPERIMENTS`` a serving process started with ``environment`` runs with."""
    return environment.get(GRPC_EXPERIMENTS_VARIABLE, SERVING_GRPC_EXPERIMENTS)


def apply_serving_defaults() -> str | None:
    """Set ``GRPC_EXPERIMENTS`` to the serving default unless the environment sets it; returns the
    value in force, or None when ``grpc`` was already imported without it (too late: gRPC's own
    defaults stay; the process was not started through a service entry point, e.g. a test that
    imports one). tests/serving/test_grpc_env.py starts each entry point fresh and checks that the
    default is in force before ``grpc`` loads."""
    if GRPC_EXPERIMENTS_VARIABLE not in os.environ and "grpc" in sys.modules:
        return None
    os.environ[GRPC_EXPERIMENTS_VARIABLE] = serving_setting(os.environ)
    return os.environ[GRPC_EXPERIMENTS_VARIABLE]
