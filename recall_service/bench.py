"""Recall latency/throughput benchmark: the engine in-process and the gRPC service on loopback.

Prints (and optionally writes) JSON with the command, machine, thread count and, for each mode,
p50/p99 latency in milliseconds and queries per second. Histories are drawn from the bundle's
popularity table so that the query mix looks like real traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from recall_service.config import RecallConfig
from recall_service.engine import RecallEngine, RecallQuery
from recsys.serving.config import ServingConfig
from recsys.serving.wire import FLAGS, INDEX, catalog_fingerprint, pack
from recsys.timing import latency_summary, machine_info, report_json
from recsys.v1 import common_pb2, recall_pb2, recall_pb2_grpc


def _summary(latencies_s: list[float], wall_s: float, queries: int) -> dict[str, float]:
    return {
        "queries": queries,
        **latency_summary([latency * 1000.0 for latency in latencies_s]),
        "qps": round(queries / wall_s, 1),
    }


def sample_histories(engine: RecallEngine, count: int, length: int, seed: int) -> list[np.ndarray]:
    """Histories of ``length`` items drawn by popularity (without repeats within one history)."""
    rng = np.random.default_rng(seed)
    weights = engine.popularity.counts.astype(np.float64) + 1.0
    weights /= weights.sum()
    size = min(length, engine.num_items)
    return [rng.choice(engine.num_items, size=size, replace=False, p=weights) for _ in range(count)]


def bench_engine(engine: RecallEngine, histories: list[np.ndarray], k: int, batch: int) -> dict[str, dict]:
    queries = [RecallQuery(history=h, k=k) for h in histories]
    engine.recall(queries[:8])  # warm-up
    latencies, started = [], time.perf_counter()
    for query in queries:
        begin = time.perf_counter()
        engine.recall([query])
        latencies.append(time.perf_counter() - begin)
    single = _summary(latencies, time.perf_counter() - started, len(queries))
    latencies, started = [], time.perf_counter()
    for start in range(0, len(queries), batch):
        begin = time.perf_counter()
        chunk = queries[start : start + batch]
        engine.recall(chunk)
        latencies.extend([time.perf_counter() - begin] * len(chunk))
    batched = _summary(latencies, time.perf_counter() - started, len(queries))
    batched["batch"] = batch
    return {"engine_single": single, "engine_batched": batched}


async def bench_grpc(
    config: RecallConfig, engine: RecallEngine, histories: list[np.ndarray], k: int, concurrency: int
) -> dict[str, dict]:
    from recall_service.server import serve
    from recsys.serving.metrics import new_registry

    running = await serve(config, registry=new_registry(process_metrics=False))
    catalog = catalog_fingerprint(engine.items.ids)
    requests = [
        recall_pb2.RecallRequest(
            scenario="home",
            k=k,
            catalog=catalog,
            filters=recall_pb2.RecallFilters(exclude_history=True),
            history_items=pack(h, INDEX),
            history_types=pack(np.full(len(h), common_pb2.VIEW), FLAGS),
        )
        for h in histories
    ]
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = recall_pb2_grpc.RecallServiceStub(channel)
            for warm in requests[:8]:
                await stub.Recall(warm)
            latencies, started = [], time.perf_counter()
            for one in requests:
                begin = time.perf_counter()
                await stub.Recall(one)
                latencies.append(time.perf_counter() - begin)
            single = _summary(latencies, time.perf_counter() - started, len(requests))

            pending = iter(requests)
            concurrent_latencies: list[float] = []

            async def worker() -> None:
                for one in pending:
                    begin = time.perf_counter()
                    await stub.Recall(one)
                    concurrent_latencies.append(time.perf_counter() - begin)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            concurrent = _summary(concurrent_latencies, time.perf_counter() - started, len(requests))
            concurrent["concurrency"] = concurrency
    finally:
        await running.stop(grace=0)
    return {"grpc_single": single, "grpc_concurrent": concurrent}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recall_service.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--data", default="synthetic", help="dataset name under --artifacts")
    parser.add_argument("--bundle", type=Path, help="recall bundle folder (default ARTIFACTS/DATA/recall)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=200, help="candidates per query")
    parser.add_argument("--history-length", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="Faiss/ONNX Runtime threads")
    parser.add_argument("--batch", type=int, default=64, help="engine batch size (batched mode)")
    parser.add_argument("--concurrency", type=int, default=32, help="gRPC calls in flight")
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "gpu"))
    parser.add_argument("--no-grpc", action="store_true", help="engine only")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.bundle is None:
        args.bundle = args.artifacts / args.data / "recall"

    engine = RecallEngine.load(args.bundle, device=args.device, threads=args.threads)
    histories = sample_histories(engine, args.queries, args.history_length, seed=0)
    results = bench_engine(engine, histories, args.k, args.batch)
    if not args.no_grpc:
        config = RecallConfig(
            serving=ServingConfig(host="127.0.0.1", port=0, metrics_port=0, log_level="WARNING"),
            bundle=args.bundle,
            device=args.device,
            max_batch=args.batch,
            max_wait_ms=args.max_wait_ms,
            threads=args.threads,
        )
        results.update(asyncio.run(bench_grpc(config, engine, histories, args.k, args.concurrency)))
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_info(),
        "threads": args.threads,
        "bundle": {
            "version": engine.version,
            "items": engine.num_items,
            "index": engine.searcher.description,
            "user_tower": engine.user_tower.device,
        },
        "k": args.k,
        "history_length": args.history_length,
        "results": results,
    }
    report_json(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
