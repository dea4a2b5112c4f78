"""A stand-in service process for tests of recsys.app.run.Service: prints one environment
variable (named by RECSYS_PROBE_VARIABLE) and exits; the service flags are ignored."""

import os

name = os.environ["RECSYS_PROBE_VARIABLE"]
print(f"{name}={os.environ.get(name, '<unset>')!r}", flush=True)
