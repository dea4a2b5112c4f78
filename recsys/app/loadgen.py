"""An open-loop load generator for the gateway: Poisson arrivals at a fixed rate, latency counted
from each request's SCHEDULED send time (so queueing in the client or the server is never hidden).

Runs in its own process (``python -m recsys.app.loadgen ...``) so its CPU is not the server's; prints
one JSON object: outcomes, degraded share, latency percentiles, achieved rate and its own CPU.

    python -m recsys.app.loadgen --gateway 127.0.0.1:50050 --token-file artifacts/dev-token \\
        --rate 200 --duration 15 --scenario home --users users.txt --items items.txt
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import sys
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from recsys.scenario.config import DEFAULT_SCENARIOS_FILE, load_scenarios
from recsys.serving.auth import bearer_metadata, read_token
from recsys.serving.bootstrap import run_event_loop
from recsys.v1 import gateway_pb2, gateway_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recsys.app.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gateway",
        required=True,
        help="gateway HOST:PORT, or a gRPC target such as ipv4:HOST:PORT,HOST:PORT (called round-robin)",
    )
    parser.add_argument("--token-file", type=Path, help="bearer token file (default: $RECSYS_TOKEN)")
    parser.add_argument("--rate", type=float, required=True, help="arrivals per second (Poisson)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of arrivals")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured arrivals first")
    parser.add_argument("--scenario", default="home", help="scenario of every request")
    parser.add_argument("--users", type=Path, required=True, help="file of user ids (one per line)")
    parser.add_argument("--items", type=Path, required=True, help="file of item ids, for context items")
    parser.add_argument("--num-items", type=int, default=20)
    parser.add_argument("--deadline-ms", type=float, default=500.0, help="client deadline per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--samples", action="store_true", help="also print every measured latency (latency_samples_ms)"
    )
    parser.add_argument(
        "--scenarios-file", type=Path, default=DEFAULT_SCENARIOS_FILE, help="the gateway's scenario file"
    )
    return parser


def gateway_target(addresses: list[str]) -> str:
    """The gRPC target for gateways at ``addresses`` (IPv4 HOST:PORT each): the address itself for
    one, an ``ipv4:`` list (gRPC's static resolver) for several."""
    return addresses[0] if len(addresses) == 1 else "ipv4:" + ",".join(addresses)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def build_requests(args: argparse.Namespace, count: int) -> list[gateway_pb2.RecommendRequest]:
    """Every request of the run, built before the clock starts (no client work on the schedule)."""
    rng = random.Random(args.seed)
    users = [line for line in args.users.read_text().splitlines() if line]
    items = [line for line in args.items.read_text().splitlines() if line]
    scenario = load_scenarios(args.scenarios_file).get(args.scenario)
    with_context = scenario is not None and scenario.takes_context_items
    requests = []
    for number in range(count):
        context = gateway_pb2.RecommendContext()
        if with_context:
            context.item_ids.append(rng.choice(items))
        requests.append(
            gateway_pb2.RecommendRequest(
                request_id=f"load-{number}",
                user_id=rng.choice(users),
                scenario=args.scenario,
                num_items=args.num_items,
                context=context,
            )
        )
    return requests


async def run(args: argparse.Namespace) -> dict:
    token = read_token(args.token_file) if args.token_file else os.environ.get("RECSYS_TOKEN", "")
    metadata = bearer_metadata(token) if token else None
    rng = np.random.default_rng(args.seed)
    total_s = args.warmup + args.duration
    gaps = rng.exponential(1.0 / args.rate, size=int(args.rate * total_s * 1.5) + 10)
    offsets = np.cumsum(gaps)
    offsets = offsets[offsets < total_s]
    requests = build_requests(args, len(offsets))
    deadline_s = args.deadline_ms / 1000
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()

    # round_robin: a target that resolves to several gateways spreads the calls over all of them.
    options = [("grpc.lb_policy_name", "round_robin")]
    async with grpc.aio.insecure_channel(args.gateway, options=options) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        await stub.Recommend(requests[0], timeout=10, metadata=metadata)  # connected and warm
        loop = asyncio.get_running_loop()

        async def call(request: gateway_pb2.RecommendRequest, scheduled: float, measured: bool) -> None:
            try:
                response = await stub.Recommend(request, timeout=deadline_s, metadata=metadata)
                outcome = "degraded" if response.degraded else "ok"
                if measured:
                    reasons.update(response.degraded_reasons)
            except grpc.aio.AioRpcError as error:
                outcome = error.code().name
            if measured:
                latencies.append(loop.time() - scheduled)
                outcomes[outcome] += 1

        pending: list[asyncio.Task[None]] = []
        cpu_before = cpu_seconds()
        start = loop.time() + 0.05
        measured_from = start + args.warmup
        for offset, request in zip(offsets.tolist(), requests, strict=True):
            scheduled = start + offset
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.ensure_future(call(request, scheduled, scheduled >= measured_from)))
        await asyncio.gather(*pending)
        wall_s = loop.time() - measured_from
        cpu_used = cpu_seconds() - cpu_before

    measured = sum(outcomes.values())
    values = np.asarray(latencies, dtype=np.float64) * 1000
    errors = measured - outcomes["ok"] - outcomes["degraded"]
    result = {
        "scenario": args.scenario,
        "rate": args.rate,
        "duration_s": args.duration,
        "requests": measured,
        "sent": len(offsets),  # warm-up included: what the servers' CPU time covers
        "achieved_rps": round(measured / max(wall_s, 1e-9), 1),
        "outcomes": dict(outcomes),
        "errors": errors,
        "error_share": round(errors / measured, 4) if measured else 0.0,
        "degraded_share": round(outcomes["degraded"] / measured, 4) if measured else 0.0,
        "degraded_reasons": dict(reasons),
        "latency_ms": latency_summary(values),
        "loadgen_cpu_ms_per_request": round(cpu_used * 1000 / max(len(offsets), 1), 3),
    }
    if args.samples:
        result["latency_samples_ms"] = np.round(values, 3).tolist()
    return result


def latency_summary(values_ms: np.ndarray) -> dict[str, float]:
    """p50/p95/p99/max/mean of latencies in milliseconds (zeros when there are none)."""
    if not len(values_ms):
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    p50, p95, p99 = np.percentile(values_ms, (50, 95, 99))
    return {
        "p50": round(float(p50), 3),
        "p95": round(float(p95), 3),
        "p99": round(float(p99), 3),
        "max": round(float(np.max(values_ms)), 3),
        "mean": round(float(np.mean(values_ms)), 3),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.rate <= 0 or args.duration <= 0:
        print("recsys.app.loadgen: --rate and --duration must be > 0", file=sys.stderr)
        return 2
    # The services' own loop (uvloop when installed): the generator takes less of the shared cores.
    print(json.dumps(run_event_loop(run(args))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
