"""`recsys bench rank`: ranker latency at the serving shape, one run, JSON out.

Compares, on the same weights and inputs (one history of 50, 500 candidates by default):
torch eager; ONNX Runtime on the unoptimised export of the model (ORT_DISABLE_ALL); the model's
own graph as the runtime served it before folding (the bundle's explain graph); the served CPU
graph (the folded graph, see rank_service/folded.py) as the runtime loads it; the same with every
ORT fusion (SkipLayerNormalization included: the alternative the served choice is measured
against); the FP16 fused-attention GPU graph on the CPU provider; and ``RankRuntime.score`` end to
end (features, packing, session). With a CUDA provider available it also times the GPU graph on
it. Reports median and p99 in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from recsys.bench import machine_info, time_calls


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


def main(argv: list[str] | None = None) -> int:
    """`recsys bench rank [--bundle DIR | --artifacts DIR --data NAME] [--out FILE]`."""
    import onnxruntime as ort
    import torch

    from rank_service.export import CPU_DISABLED_OPTIMIZERS, checkpoint_path, export_onnx, load_checkpoint
    from rank_service.runtime import RankRuntime, gpu_available, session_options

    parser = argparse.ArgumentParser(prog="recsys bench rank", description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--data", default="synthetic", help="dataset name under --artifacts")
    parser.add_argument("--bundle", type=Path, help="rank bundle (default ARTIFACTS/DATA/rank)")
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument(
        "--untrained-items",
        type=int,
        default=0,
        help="without a bundle: time an untrained default-size model over this many items",
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
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
    runtime = RankRuntime.load(bundle_dir, device="cpu", threads=args.threads)

    [query] = serving_queries(model.config.num_items, args.history, args.candidates, 1)
    feeds = runtime.pack([query]).feeds()
    tensors = tuple(torch.from_numpy(value) for value in feeds.values())

    results: dict[str, dict] = {}
    with torch.inference_mode():
        reference = model(*tensors)[0].numpy()
        results["torch_eager"] = time_calls(lambda: model(*tensors), args.iterations)
        if args.threads > 1:
            # On a busy machine torch's OpenMP pool can be far slower than one thread: time both
            # and compare ORT with the faster one.
            torch.set_num_threads(1)
            results["torch_eager_1_thread"] = time_calls(lambda: model(*tensors), args.iterations)
            torch.set_num_threads(args.threads)

    def session(path: Path, level: ort.GraphOptimizationLevel, disabled: tuple[str, ...] = ()):
        options = session_options(args.threads)
        options.graph_optimization_level = level
        return ort.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled)
        )

    graphs = runtime.manifest["graphs"]
    with scratch:
        plain = export_onnx(model, Path(scratch.name) / "plain.onnx", fused_attention=False)
        variants = {
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
        for name, variant in variants.items():
            scores = variant.run(["scores"], feeds)[0]
            results[name] = time_calls(
                lambda variant=variant: variant.run(["scores"], feeds), args.iterations
            )
            results[name]["max_abs_diff_vs_torch"] = float(np.abs(scores - reference).max())
    results["runtime_score_end_to_end"] = time_calls(lambda: runtime.score([query]), args.iterations)
    if gpu_available():
        gpu_runtime = RankRuntime.load(bundle_dir, device="gpu", threads=args.threads)
        results["gpu_runtime_score_end_to_end"] = time_calls(
            lambda: gpu_runtime.score([query]), args.iterations
        )
        results["gpu_runtime_score_end_to_end"]["provider"] = gpu_runtime.provider

    served = results["ort_served_cpu_graph"]["p50_ms"]
    torch_best = min(v["p50_ms"] for k, v in results.items() if k.startswith("torch_eager"))
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
        "results": results,
        "speedup_served_vs_torch_eager": round(torch_best / served, 2),
        "bar": {"speedup_at_least": 3.0, "p50_ms_below": 5.0},
        "passes_bar": bool(torch_best / served >= 3.0 and served < 5.0),
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
