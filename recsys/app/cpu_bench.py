"""`recsys bench cpu`: where a request's CPU goes, as JSON.

The cascade's own work, with no transport: the gateway with in-process recall and rank
(``recsys.app.inprocess``), each Recommend called on its servicer directly, one at a time, so
every CPU-second the process spends is one request's work. Per scenario it reports the CPU per
request (all threads, and per thread: the event loop vs the recall and rank batch threads) and,
from a second pass under cProfile (the event loop's thread only; the batch threads' work shows as
their share), the functions with the most own time. `recsys bench e2e` at the same scenario gives
the served CPU per request; the difference is what transport, event-loop wakeups and thread
hand-offs cost. Last, the floor of one gRPC hop on this host (``recsys.app.grpc_floor``: an echo
server in its own process, called open-loop at ``--hop-rate``): the CPU per call no work on the
services' side can remove.

    recsys bench cpu --artifacts artifacts --requests 2000 --out artifacts/bench/cpu.json
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from recsys import timing
from recsys.app import count_at_least
from recsys.app.grpc_floor import event_loop_name
from recsys.app.grpc_floor import measure as measure_hop
from recsys.serving.bootstrap import run_event_loop
from recsys.timing import machine_info, report_json

HISTORY_LENGTH = 50


class DirectContext:
    """The bits of a ``grpc.aio.ServicerContext`` the gateway's Recommend uses."""

    def time_remaining(self) -> float:
        return 1.0

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")

    def invocation_metadata(self) -> tuple:
        return ()


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) of each live thread of this process, by its Python name (by its
    kernel name for threads Python did not start: ONNX Runtime's, gRPC's)."""
    python_names = {thread.native_id: thread.name for thread in threading.enumerate() if thread.native_id}
    return timing.thread_cpu_seconds(os.getpid(), python_names)


def top_functions(profile: cProfile.Profile, count: int, requests: int) -> list[dict[str, Any]]:
    """The ``count`` functions with the most own time, in microseconds per request (cProfile's
    overhead inflates them all; read the shares, not the absolute values)."""
    stats = pstats.Stats(profile)
    total = sum(row[2] for row in stats.stats.values()) or 1.0  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)  # type: ignore[attr-defined]
    return [
        {
            "function": f"{Path(file).name}:{line} {name}",
            "own_share": round(own / total, 4),
            "own_us_per_request": round(own * 1e6 / requests, 1),
            "calls_per_request": round(calls / requests, 2),
        }
        for (file, line, name), (_, calls, own, _, _) in rows[:count]
    ]


async def measure(
    args: argparse.Namespace, recall_dir: Path, rank_dir: Path, dataset: Any, sqlite_path: Path
) -> dict[str, Any]:
    from gateway.config import GatewayConfig
    from recsys.app.inprocess import local_configs, serve_inprocess
    from recsys.serving.config import ServingConfig
    from recsys.v1 import gateway_pb2

    config = GatewayConfig(
        serving=ServingConfig(port=0, metrics_port=0),
        sqlite_path=sqlite_path,
        max_history_length=HISTORY_LENGTH,
        http_enabled=False,
        allow_unauthenticated=True,  # servicer called directly: no interceptor runs anyway
    )
    gateway = await serve_inprocess(config, *local_configs(recall_dir, rank_dir))
    try:
        scenarios = gateway.servicer.scenarios()
        users = dataset.users.ids[: args.users]
        items = dataset.items.ids
        rng = random.Random(args.seed)
        context = DirectContext()
        results: dict[str, Any] = {}
        for name in args.scenarios.split(","):
            scenario = scenarios.get(name)
            if scenario is None:
                raise SystemExit(f"recsys bench cpu: unknown scenario {name!r}")

            def request(number: int, name: str = name, scenario: Any = scenario) -> Any:
                message = gateway_pb2.RecommendRequest(
                    request_id=f"cpu-{name}-{number}",
                    user_id=rng.choice(users),
                    scenario=name,
                    num_items=10,
                )
                if scenario.takes_context_items:
                    message.context.item_ids.append(rng.choice(items))
                return message

            async def run(count: int) -> None:
                for number in range(count):
                    await gateway.servicer.Recommend(request(number), context)

            await run(args.warmup)
            threads_before = thread_cpu_seconds()
            cpu_started, wall_started = time.process_time(), time.perf_counter()
            await run(args.requests)
            cpu = time.process_time() - cpu_started
            wall = time.perf_counter() - wall_started
            threads_after = thread_cpu_seconds()
            per_thread = {
                thread: round(
                    (threads_after[thread] - threads_before.get(thread, 0.0)) * 1000 / args.requests, 3
                )
                for thread in threads_after
                if threads_after[thread] - threads_before.get(thread, 0.0) > 0
            }
            results[name] = {
                "cpu_ms_per_request": round(cpu * 1000 / args.requests, 3),
                "wall_ms_per_request": round(wall * 1000 / args.requests, 3),
                "cpu_ms_per_request_by_thread": dict(sorted(per_thread.items(), key=lambda kv: -kv[1])),
                "top_functions_event_loop": [],
            }
            if args.profile_requests:  # 0: no cProfile pass (e.g. under an outside profiler)
                profile = cProfile.Profile(time.thread_time)  # the loop thread's CPU, not its waits
                profile.enable()
                await run(args.profile_requests)
                profile.disable()
                results[name]["top_functions_event_loop"] = top_functions(
                    profile, args.top, args.profile_requests
                )
            print(
                f"{name}: {results[name]['cpu_ms_per_request']:.2f} ms CPU per request "
                f"({', '.join(f'{t} {v:.2f}' for t, v in per_thread.items())})",
                file=sys.stderr,
                flush=True,
            )
    finally:
        await gateway.stop()
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys bench cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic", help="'synthetic' or a dataset folder")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--scenarios", default="home,item_detail")
    parser.add_argument(
        "--requests", type=count_at_least(1), default=2000, help="measured requests per scenario"
    )
    parser.add_argument("--warmup", type=count_at_least(0), default=300)
    parser.add_argument(
        "--profile-requests",
        type=count_at_least(0),
        default=500,
        help="requests under cProfile (0 = none, e.g. under an outside profiler)",
    )
    parser.add_argument("--top", type=count_at_least(1), default=20, help="functions listed per scenario")
    parser.add_argument("--users", type=count_at_least(1), default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hop-rate", type=float, default=200.0, help="echo calls/s of the gRPC hop floor")
    parser.add_argument("--hop-seconds", type=float, default=5.0, help="measured seconds per hop size")
    parser.add_argument(
        "--hop-bytes", default="200,12000", help="message sizes of the hop floor ('' = skip it)"
    )
    parser.add_argument("--out", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from recsys.app.run import build_bundles, seed_history_store

    started = time.monotonic()
    recall_dir, rank_dir, dataset = build_bundles(args.data, args.artifacts, quick=True)
    with tempfile.TemporaryDirectory() as workdir:
        sqlite_path = Path(workdir) / "history.sqlite3"
        seed_history_store(dataset, sqlite_path, HISTORY_LENGTH)
        # The servers' own loop (uvloop when installed): its per-iteration cost is part of the work.
        results = run_event_loop(measure(args, recall_dir, rank_dir, dataset, sqlite_path))
    hops = [
        measure_hop(args.hop_rate, args.hop_seconds, int(size)) for size in args.hop_bytes.split(",") if size
    ]
    report_json(
        {
            "benchmark": "cpu: each Recommend's own work, in-process servicers called directly",
            "command": "recsys bench cpu " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine_info(),
            "settings": {
                "requests": args.requests,
                "warmup": args.warmup,
                "profile_requests": args.profile_requests,
                "users": args.users,
                "history_length": HISTORY_LENGTH,
                "calls": "sequential: one request at a time, so batches hold one request",
                "event_loop": event_loop_name(),
            },
            "scenarios": results,
            "grpc_hop_floor": hops,
            "wall_s": round(time.monotonic() - started, 1),
        },
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
