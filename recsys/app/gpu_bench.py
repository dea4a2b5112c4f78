"""`recsys bench gpu`: the serving paths on a GPU host against their CPU paths, one run, JSON out.

rank: the FP16 fused-attention graph on ONNX Runtime's CUDA provider (IO binding, as served) vs
torch eager on the same GPU (fp32 and fp16) vs the served CPU graph and torch eager on the CPU, at
the serving shape (one history of 50, 500 candidates) and for a micro-batch of requests; plus the
GPU scores' largest difference from the CPU graph's.
recall: exact inner-product top-k by one CuPy matrix product on the GPU vs Faiss on the CPU (exact
and the default large-catalog IVF) over a clustered catalog, one query and a batch of queries.

Each part reports ``skipped`` with the reason when this host cannot run it (no CUDA provider in
this onnxruntime build, no torch CUDA, no CuPy), so the command is safe anywhere.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from recsys.timing import machine_info, report_json, time_calls


def bench_rank(args: argparse.Namespace) -> dict[str, Any]:
    """Rank: ORT CUDA (fp16 fused graph) vs torch eager GPU vs the CPU paths."""
    import onnxruntime as ort

    from rank_service.bench import serving_queries, untrained_bundle
    from rank_service.export import checkpoint_path, load_checkpoint
    from rank_service.runtime import RankRuntime, gpu_available

    if not gpu_available():
        return {"skipped": f"no CUDAExecutionProvider in onnxruntime {ort.__version__}"}
    import torch

    scratch = tempfile.TemporaryDirectory()
    bundle_dir = untrained_bundle(Path(scratch.name) / "rank", args.items)
    model, _, _, _ = load_checkpoint(checkpoint_path(bundle_dir))
    model.freeze_item_table()
    cpu = RankRuntime.load(bundle_dir, device="cpu", threads=args.threads)
    gpu = RankRuntime.load(bundle_dir, device="gpu", threads=args.threads)
    single = serving_queries(args.items, args.history, args.candidates, 1)
    batch = serving_queries(args.items, args.history, args.candidates, args.batch, seed=1)
    results: dict[str, Any] = {"provider": gpu.provider, "gpu_graph": gpu.manifest["graphs"]["gpu"]["file"]}

    for name, queries in (("single", single), (f"batch_{args.batch}", batch)):
        cpu_scores = cpu.score(queries)
        gpu_scores = gpu.score(queries)
        difference = max(float(np.abs(g - c).max()) for g, c in zip(gpu_scores, cpu_scores, strict=True))
        part: dict[str, Any] = {"max_abs_diff_gpu_fp16_vs_cpu_fp32": round(difference, 5)}
        part["ort_gpu_runtime_score"] = time_calls(lambda q=queries: gpu.score(q), args.iterations)
        part["ort_cpu_runtime_score"] = time_calls(lambda q=queries: cpu.score(q), args.iterations)
        feeds = cpu.pack(queries).feeds()
        part["ort_gpu_session_iobinding"] = time_calls(_bound_run(gpu.session, feeds, ort), args.iterations)
        with torch.inference_mode():
            torch.set_num_threads(args.threads)
            cpu_inputs = [torch.from_numpy(v) for v in feeds.values()]
            part["torch_eager_cpu"] = time_calls(lambda i=cpu_inputs: model(*i), args.iterations)
            gpu_model = model.to("cuda")
            gpu_inputs = [t.to("cuda") for t in cpu_inputs]
            part["torch_eager_gpu_fp32"] = time_calls(
                lambda i=gpu_inputs, m=gpu_model: m(*i), args.iterations, torch.cuda.synchronize
            )
            with torch.autocast("cuda", dtype=torch.float16):
                part["torch_eager_gpu_fp16_autocast"] = time_calls(
                    lambda i=gpu_inputs, m=gpu_model: m(*i), args.iterations, torch.cuda.synchronize
                )
            model.to("cpu")
        served = part["ort_gpu_runtime_score"]["p50_ms"]
        part["speedup_ort_gpu_vs_torch_gpu_fp32"] = round(part["torch_eager_gpu_fp32"]["p50_ms"] / served, 2)
        part["speedup_ort_gpu_vs_ort_cpu"] = round(part["ort_cpu_runtime_score"]["p50_ms"] / served, 2)
        results[name] = part
    scratch.cleanup()
    return results


def _bound_run(session: Any, feeds: dict[str, np.ndarray], ort: Any) -> Callable[[], object]:
    """A session run with inputs already on the GPU and outputs left there (the kernel floor)."""
    binding = session.io_binding()
    keep = []
    for name, value in feeds.items():
        device_value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", 0)
        keep.append(device_value)
        binding.bind_ortvalue_input(name, device_value)
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda")

    def run() -> object:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return keep

    return run


def clustered_catalog(count: int, dim: int, centres: int, seed: int = 0) -> np.ndarray:
    """Unit vectors drawn around ``centres`` random centres (ANN-realistic, not isotropic noise)."""
    rng = np.random.default_rng(seed)
    middle = rng.normal(size=(centres, dim)).astype(np.float32)
    vectors = middle[rng.integers(0, centres, size=count)] + 0.4 * rng.normal(size=(count, dim)).astype(
        np.float32
    )
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def bench_recall(args: argparse.Namespace) -> dict[str, Any]:
    """Recall: CuPy exact top-k on the GPU vs Faiss on the CPU."""
    import faiss

    from recall_service.index import ExactGpuSearcher, FaissSearcher, build_index, cupy_gpu_available

    if not cupy_gpu_available():
        return {"skipped": "no CuPy with a CUDA GPU here"}
    faiss.omp_set_num_threads(8)  # building the IVF index is not what is timed
    vectors = clustered_catalog(args.recall_items, args.dim, centres=max(10, args.recall_items // 100))
    rng = np.random.default_rng(1)
    queries = vectors[rng.integers(0, len(vectors), size=args.recall_batch)] + 0.05 * rng.normal(
        size=(args.recall_batch, args.dim)
    ).astype(np.float32)
    gpu = ExactGpuSearcher(vectors)
    exact = FaissSearcher(build_index(vectors, "Flat"))
    ivf_factory = f"IVF{int(4 * np.sqrt(len(vectors)))},Flat"
    ivf = FaissSearcher(build_index(vectors, ivf_factory), nprobe=32)
    faiss.omp_set_num_threads(args.threads)
    _, gpu_ids = gpu.search(queries, args.k)
    _, exact_ids = exact.search(queries, args.k)
    _, ivf_ids = ivf.search(queries, args.k)

    def overlap(found: np.ndarray) -> float:
        return float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found, exact_ids, strict=True)]))

    results: dict[str, Any] = {
        "items": len(vectors),
        "dim": args.dim,
        "k": args.k,
        "ivf_factory": ivf_factory,
        "recall_at_k_vs_exact": {
            "gpu_exact": round(overlap(gpu_ids), 4),
            "cpu_ivf": round(overlap(ivf_ids), 4),
        },
    }
    iterations = max(20, args.iterations // 3)
    for name, searcher in (("gpu_exact_cupy", gpu), ("cpu_faiss_flat", exact), ("cpu_faiss_ivf", ivf)):
        results[name] = {
            "single_query": time_calls(lambda s=searcher: s.search(queries[:1], args.k), iterations),
            f"batch_{args.recall_batch}": time_calls(
                lambda s=searcher: s.search(queries, args.k), iterations
            ),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    """`recsys bench gpu [--items N] [--recall-items N] [--out FILE]`."""
    parser = argparse.ArgumentParser(prog="recsys bench gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=12_101, help="rank catalog size (untrained model)")
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--batch", type=int, default=32, help="requests per rank micro-batch")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the CPU paths")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--recall-items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--recall-batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "benchmark": "gpu",
        "command": " ".join(["recsys", "bench", "gpu", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
    }
    for name, part in (("rank", bench_rank), ("recall", bench_recall)):
        try:
            report[name] = part(args)
        except Exception as error:  # report, keep the other part
            report[name] = {"error": repr(error)}
    try:
        import onnxruntime as ort

        report["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError:
        pass
    report_json(report, args.out)
    return 0 if all("error" not in report[k] for k in ("rank", "recall")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
