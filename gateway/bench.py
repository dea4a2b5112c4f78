"""Gateway latency under concurrency: end-to-end Recommend calls against a running stack, as JSON.

    python -m gateway.bench --gateway 127.0.0.1:50050 --concurrency 16 --requests 2000 --out FILE

Histories are sampled from items the gateway itself returns (so they are in the catalog) and sent
with each request (stateless), so the benchmark needs no user data and leaves no events behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import grpc

from gateway.query import DEFAULT_GATEWAY, TokenError, add_token_argument, token_from_args
from recsys.scenario.config import DEFAULT_SCENARIOS_FILE, load_scenarios
from recsys.serving.auth import BearerTokenInterceptor
from recsys.timing import latency_summary, machine_info
from recsys.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway bench", description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", default=DEFAULT_GATEWAY, help="gateway HOST:PORT")
    add_token_argument(parser)
    parser.add_argument("--scenarios", default="home,item_detail,cart", help="comma-separated scenarios")
    parser.add_argument("--category", default="", help="also bench the category scenario with this category")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    parser.add_argument("--requests", type=int, default=2000, help="measured calls (after warm-up)")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured calls first")
    parser.add_argument("--num-items", type=int, default=20)
    parser.add_argument("--history-length", type=int, default=20, help="max items per sampled history")
    parser.add_argument("--timeout", type=float, default=2.0, help="per-call deadline, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument(
        "--scenarios-file", type=Path, default=DEFAULT_SCENARIOS_FILE, help="the gateway's scenario file"
    )
    return parser


async def _catalog_sample(stub: gateway_pb2_grpc.GatewayStub, timeout: float) -> list[str]:
    response = await stub.Recommend(
        gateway_pb2.RecommendRequest(user_id="bench-cold-start", scenario="home", num_items=500),
        timeout=timeout,
    )
    return [item.item_id for item in response.items]


def _request(
    scenario: str, items: list[str], args: argparse.Namespace, rng: random.Random, with_context: set[str]
):
    length = rng.randint(1, args.history_length)
    history = [common_pb2.HistoryItem(item_id=rng.choice(items), type=common_pb2.VIEW) for _ in range(length)]
    context = gateway_pb2.RecommendContext(
        item_ids=[history[-1].item_id] if scenario in with_context else [],
        category=args.category if scenario == "category" else "",
    )
    return gateway_pb2.RecommendRequest(
        user_id=f"bench-{rng.randrange(10**6)}",
        scenario=scenario,
        num_items=args.num_items,
        context=context,
        history=history,
    )


async def run(args: argparse.Namespace) -> dict:
    scenarios = [s for s in args.scenarios.split(",") if s]
    if args.category:
        scenarios.append("category")
    rng = random.Random(args.seed)
    token = token_from_args(args)
    interceptors = [BearerTokenInterceptor(token)] if token is not None else None
    async with grpc.aio.insecure_channel(args.gateway, interceptors=interceptors) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        items = await _catalog_sample(stub, args.timeout)
        if not items:
            raise RuntimeError("the gateway returned no items to build histories from")
        compiled = load_scenarios(args.scenarios_file).scenarios
        with_context = {name for name in scenarios if name in compiled and compiled[name].takes_context_items}
        requests = [
            _request(scenarios[i % len(scenarios)], items, args, rng, with_context)
            for i in range(args.warmup + args.requests)
        ]
        latencies: dict[str, list[float]] = {s: [] for s in scenarios}
        outcomes: Counter[str] = Counter()
        queue: asyncio.Queue[tuple[int, gateway_pb2.RecommendRequest]] = asyncio.Queue()
        for numbered in enumerate(requests):
            queue.put_nowait(numbered)

        async def worker() -> None:
            while not queue.empty():
                index, request = queue.get_nowait()
                started = time.perf_counter()
                try:
                    response = await stub.Recommend(request, timeout=args.timeout)
                    outcome = "degraded" if response.degraded else "ok"
                except grpc.aio.AioRpcError as error:
                    outcome = error.code().name
                elapsed_ms = (time.perf_counter() - started) * 1000
                if index >= args.warmup:
                    latencies[request.scenario].append(elapsed_ms)
                    outcomes[outcome] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall_s = time.perf_counter() - started

    measured = [ms for values in latencies.values() for ms in values]
    return {
        "benchmark": "gateway Recommend end to end (gateway -> recall -> rank -> rerank)",
        "command": "python -m gateway.bench " + " ".join(sys.argv[1:]) if sys.argv else "",
        "machine": machine_info(),
        "settings": {
            "gateway": args.gateway,
            "concurrency": args.concurrency,
            "requests": args.requests,
            "warmup": args.warmup,
            "num_items": args.num_items,
            "history_length": args.history_length,
            "scenarios": scenarios,
        },
        "throughput_rps": round(len(measured) / wall_s, 1) if wall_s > 0 else 0.0,
        "outcomes": dict(outcomes),
        "latency": latency_summary(measured),
        "latency_by_scenario": {s: latency_summary(v) for s, v in latencies.items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = asyncio.run(run(args))
    except TokenError as error:
        print(error, file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
