"""`recsys bench rank`: ranker latency at the serving shape, one run, JSON out.

Compares, on the same weights and inputs (one history of 50, 500 candidates by default):
torch eager on the model; torch eager on the folded model (:class:`~rank_service.folded.FoldedRanker`,
what the served CPU graph computes); ONNX Runtime on the unoptimised export of the model
(ORT_DISABLE_ALL); the model's own graph as the runtime served it before folding (the bundle's
explain graph); the served CPU graph (the folded graph) as the runtime loads it; the same with every
ORT fusion (SkipLayerNormalization included: the alternative the served choice is measured
against); the FP16 fused-attention GPU graph on the CPU provider; and ``RankRuntime.score`` end to
end (features, packing, session). With a CUDA provider available it also times the GPU graph on
it. Thread count: 1 by default, as served (``RankConfig.threads``).

Variants are timed interleaved (:func:`recsys.timing.time_interleaved`): in each round every variant
runs a block of calls, in a seeded shuffled order, so that a noisy shared machine slows all of them
alike. Reports median and p99 over all calls per variant, and each speed ratio per round (the
slower variant's block median over the faster's) as median, min and max over the rounds:
``folding_gain`` (torch eager / torch folded), ``runtime_gain`` (torch folded / served graph) and
their product ``served_vs_torch_eager``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from recsys.timing import machine_info, report_json, time_interleaved


def serving_queries(num_items: int, history: int, candidates: int, count: int, seed: int = 0) -> list:
    """``count`` random rank requests at the serving shape, recall features included."""
    from rank_service.features import SOURCES
    from rank_service.runtime import RankQuery

    rng = np.random.default_rng(seed)
    queries = []
    for _ in range(count):
        mask = rng.random((candidates, len(SOURCES))) < 0.4
        mask[:, 0] = True
        queries.append(
            RankQuery(
                history=rng.choice(num_items, size=history, replace=False).astype(np.int64),
                event_types=rng.integers(1, 5, size=history),
                scenario=0,
                candidates=rng.choice(num_items, size=candidates, replace=False).astype(np.int64),
                recall_scores=rng.random(candidates).astype(np.float32),
                source_scores=(rng.random((candidates, len(SOURCES))) * mask).astype(np.float32),
                source_mask=mask,
            )
        )
    return queries


def untrained_bundle(bundle_dir: Path, num_items: int) -> Path:
    """Export an untrained ranker of the default (Beauty) size, with its checkpoint."""
    from rank_service.export import checkpoint_path, export_bundle, save_checkpoint
    from rank_service.model import Ranker, RankerConfig
    from rank_service.train import RankTrainConfig
    from recsys.data.dataset import DEFAULT_SCENARIOS, IdMap

    train = RankTrainConfig.default()
    config = RankerConfig(
        num_items=num_items,
        num_attributes=600,
        num_scenarios=len(DEFAULT_SCENARIOS),
        max_history=train.max_history,
        max_attributes=train.max_attributes,
        dim=train.dim,
        heads=train.heads,
        layers=train.layers,
        mlp_width=train.mlp_width,
    )
    rng = np.random.default_rng(0)
    attributes = rng.integers(0, 601, size=(num_items + 1, 4))
    model = Ranker(config, attributes, rng.random(num_items + 1).astype(np.float32)).eval()
    items = IdMap(str(i) for i in range(num_items))
    bundle_dir.mkdir(parents=True)
    save_checkpoint(model, checkpoint_path(bundle_dir), items, list(DEFAULT_SCENARIOS))
    export_bundle(model, bundle_dir, items, list(DEFAULT_SCENARIOS), "untrained")
    return bundle_dir


def ratio_summary(round_p50_ms: dict[str, list[float]], slower: str, faster: str) -> dict[str, float]:
    """``slower``'s p50 over ``faster``'s, per round of an interleaved run: median, min, max."""
    ratios = np.asarray(round_p50_ms[slower]) / np.asarray(round_p50_ms[faster])
    return {
        "median": round(float(np.median(ratios)), 2),
        "min": round(float(ratios.min()), 2),
        "max": round(float(ratios.max()), 2),
    }


def main(argv: list[str] | None = None) -> int:
    """`recsys bench rank [--bundle DIR | --artifacts DIR --data NAME] [--out FILE]`."""
    import onnxruntime as ort
    import torch

    from rank_service.export import CPU_DISABLED_OPTIMIZERS, checkpoint_path, export_onnx, load_checkpoint
    from rank_service.folded import FoldedRanker
    from rank_service.runtime import RankRuntime, gpu_available, session_options

    parser = argparse.ArgumentParser(prog="recsys bench rank", description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--data", default="synthetic", help="dataset name under --artifacts")
    parser.add_argument("--bundle", type=Path, help="rank bundle (default ARTIFACTS/DATA/rank)")
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument(
        "--threads", type=int, default=1, help="ORT and torch intra-op threads (serving default: 1)"
    )
    parser.add_argument("--iterations", type=int, default=300, help="timed calls per variant")
    parser.add_argument("--calls-per-round", type=int, default=10, help="calls per variant per round")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls per variant first")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-round variant order")
    parser.add_argument(
        "--untrained-items",
        type=int,
        default=0,
        help="without a bundle: time an untrained default-size model over this many items",
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    rounds = max(1, math.ceil(args.iterations / args.calls_per_round))
    torch.set_num_threads(args.threads)

    bundle_dir = args.bundle or args.artifacts / Path(args.data).name.lower() / "rank"
    scratch = tempfile.TemporaryDirectory()
    weights = "trained"
    if not (bundle_dir / "manifest.json").is_file() or not checkpoint_path(bundle_dir).is_file():
        if not args.untrained_items:
            parser.error(f"no rank bundle + checkpoint at {bundle_dir}: train one or pass --untrained-items")
        # Latency does not depend on the weights: an untrained model of the default size will do.
        bundle_dir, weights = untrained_bundle(Path(scratch.name) / "rank", args.untrained_items), "untrained"
    model, _, _, _ = load_checkpoint(checkpoint_path(bundle_dir))
    model.freeze_item_table()
    folded = FoldedRanker(model).eval()  # as export_folded builds the served CPU graph's model
    runtime = RankRuntime.load(bundle_dir, device="cpu", threads=args.threads)

    [query] = serving_queries(model.config.num_items, args.history, args.candidates, 1)
    feeds = runtime.pack([query]).feeds()
    tensors = tuple(torch.from_numpy(value) for value in feeds.values())

    def session(path: Path, level: ort.GraphOptimizationLevel, disabled: tuple[str, ...] = ()):
        options = session_options(args.threads)
        options.graph_optimization_level = level
        return ort.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled)
        )

    graphs = runtime.manifest["graphs"]
    with scratch:
        plain = export_onnx(model, Path(scratch.name) / "plain.onnx", fused_attention=False)
        sessions = {
            "ort_unoptimised": session(plain, ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
            "ort_unfolded_graph": session(
                bundle_dir / graphs.get("explain", graphs["cpu"])["file"],
                ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                CPU_DISABLED_OPTIMIZERS,
            ),
            "ort_served_cpu_graph": runtime.session,
            "ort_all_fusions": session(
                bundle_dir / graphs["cpu"]["file"], ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            ),
            "ort_gpu_graph_fp16_on_cpu": session(
                bundle_dir / graphs["gpu"]["file"], ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            ),
        }
        # Loaded while the scratch folder (an untrained bundle's home) still exists.
        gpu_runtime = None
        if gpu_available():
            gpu_runtime = RankRuntime.load(bundle_dir, device="gpu", threads=args.threads)

    # Torch's thread count is process-wide: each torch block sets its own.
    bench_threads = partial(torch.set_num_threads, args.threads)
    functions: dict[str, Callable[[], object]] = {
        "torch_eager": lambda: model(*tensors),
        "torch_folded": lambda: folded(*tensors),
    }
    before_block = {"torch_eager": bench_threads, "torch_folded": bench_threads}
    if args.threads > 1:
        # On a busy machine torch's OpenMP pool can be far slower than one thread: time both
        # and compare ORT with the faster one.
        functions["torch_eager_1_thread"] = lambda: model(*tensors)
        before_block["torch_eager_1_thread"] = partial(torch.set_num_threads, 1)
    for name, variant in sessions.items():
        functions[name] = lambda variant=variant: variant.run(["scores"], feeds)
    functions["runtime_score_end_to_end"] = lambda: runtime.score([query])
    if gpu_runtime:
        functions["gpu_runtime_score_end_to_end"] = lambda: gpu_runtime.score([query])

    with torch.inference_mode():
        reference = model(*tensors)[0].numpy()
        max_abs_diff = {"torch_folded": float(np.abs(folded(*tensors).numpy() - reference).max())}
        timing = time_interleaved(
            functions, rounds, args.calls_per_round, args.warmup, args.seed, before_block
        )
    for name, variant in sessions.items():
        max_abs_diff[name] = float(np.abs(variant.run(["scores"], feeds)[0] - reference).max())
    results: dict[str, dict] = timing["results"]
    for name, difference in max_abs_diff.items():
        results[name]["max_abs_diff_vs_torch"] = difference
    if gpu_runtime:
        results["gpu_runtime_score_end_to_end"]["provider"] = gpu_runtime.provider

    round_p50 = timing["round_p50_ms"]
    served = results["ort_served_cpu_graph"]["p50_ms"]
    # The faster torch eager variant (overall p50) against the served graph, round by round.
    torch_best = min((k for k in results if k.startswith("torch_eager")), key=lambda k: results[k]["p50_ms"])
    speedup = ratio_summary(round_p50, torch_best, "ort_served_cpu_graph")["median"]
    report = {
        "benchmark": "rank",
        "command": " ".join(["recsys", "bench", "rank", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "threads": args.threads,
        "versions": {"onnxruntime": ort.__version__, "torch": torch.__version__, "numpy": np.__version__},
        "bundle": {
            "path": str(bundle_dir),
            "version": runtime.version,
            "weights": weights,
            "model": runtime.manifest["model"],
        },
        "shape": {"batch": 1, "history": args.history, "candidates": args.candidates},
        "served_cpu_graph": {
            "file": graphs["cpu"]["file"],
            "disabled_optimizers": list(CPU_DISABLED_OPTIMIZERS),
        },
        "interleaved": {
            "rounds": timing["rounds"],
            "calls_per_round": timing["calls_per_round"],
            "order_seed": timing["order_seed"],
            "warmup": timing["warmup"],
        },
        "results": results,
        # Each ratio is slower p50 / faster p50 within one round, summarised over the rounds:
        # folding_gain x runtime_gain = served_vs_torch_eager in every round.
        "ratios": {
            "folding_gain": ratio_summary(round_p50, "torch_eager", "torch_folded"),
            "runtime_gain": ratio_summary(round_p50, "torch_folded", "ort_served_cpu_graph"),
            "served_vs_torch_eager": ratio_summary(round_p50, "torch_eager", "ort_served_cpu_graph"),
        },
        "speedup_served_vs_torch_eager": speedup,
        "speedup_reference": torch_best,
        "bar": {"speedup_at_least": 3.0, "p50_ms_below": 5.0},
        "passes_bar": bool(speedup >= 3.0 and served < 5.0),
    }
    report_json(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
