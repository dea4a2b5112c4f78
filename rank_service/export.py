"""Export a trained ranker to a serving bundle (`recsys export rank`).

Three graphs from one model, all with dynamic batch, history length and candidate count
(``torch.onnx.export(dynamo=True)`` with ``Dim``s; the legacy exporter bakes lengths in):

- ``ranker_cpu.onnx`` (served on CPU): :class:`~rank_service.folded.FoldedRanker`, the same scores
  with everything that depends only on the item or the scenario precomputed into tables, composed
  weights, and one ``com.microsoft.Attention`` node per encoder layer (scores only). Pre-optimised
  by ONNX Runtime at ORT_ENABLE_EXTENDED (portable; ENABLE_ALL files are hardware-specific) and
  loaded with SkipLayerNormFusion disabled (no gain here; a regression at large batches, see
  ../shared/TOOLING.md) — the benchmark measures the alternatives.
- ``ranker_cpu_explain.onnx``: the model as trained, plain-op attention, also outputting the
  target-attention weights (``RankRuntime.score(attention=True)``, debug only).
- ``ranker_gpu.onnx``: FP16 (float32 inputs/outputs), attention as the fused contrib op
  ``com.microsoft.MultiHeadAttention``, standard ``LayerNormalization`` and ``Gelu``. It also runs
  on the CPU provider (tested).

The bundle also holds the item id map and a manifest listing each graph's operator types.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch

from rank_service.features import NUM_CANDIDATE_FEATURES, SOURCES
from rank_service.folded import FOLDED_DESCRIPTION, ONNX_TRANSLATIONS, FoldedRanker
from rank_service.model import Ranker, RankerConfig, ScoresOnly, onnx_multi_head_attention
from recsys.bundle import new_version, write_manifest
from recsys.data.dataset import IdMap
from recsys.training import quiet_exporter_logs

log = logging.getLogger(__name__)

CPU_GRAPH = "ranker_cpu.onnx"
EXPLAIN_GRAPH = "ranker_cpu_explain.onnx"
GPU_GRAPH = "ranker_gpu.onnx"
ITEMS_FILE = "items.txt"
INPUT_NAMES = ("history", "history_events", "scenario", "candidates", "candidate_features")
FUSED_ATTENTION_OP = "com.microsoft.MultiHeadAttention"
# ONNX Runtime optimisers that slowed the CPU graph down on this machine (see bench.py).
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def checkpoint_path(bundle_dir: Path) -> Path:
    """Where training keeps the torch checkpoint: beside the bundle, never inside it."""
    bundle_dir = Path(bundle_dir)
    return bundle_dir.parent / f"{bundle_dir.name}-checkpoint.pt"


def save_checkpoint(model: Ranker, path: Path, items: IdMap, scenarios: list[str], **metadata: Any) -> None:
    """Weights + everything needed to rebuild the model and re-export (tensors and plain types)."""
    torch.save(
        {
            "config": model.config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "items": items.ids,
            "scenarios": list(scenarios),
            "metadata": metadata,
        },
        path,
    )


def load_checkpoint(path: Path) -> tuple[Ranker, IdMap, list[str], dict[str, Any]]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]
    model = Ranker(
        RankerConfig(**checkpoint["config"]),
        item_attributes=state["item_attributes"].numpy(),
        item_popularity=state["item_popularity"].numpy(),
    )
    model.load_state_dict(state)
    return model.eval(), IdMap(checkpoint["items"]), checkpoint["scenarios"], checkpoint["metadata"]


def example_inputs(model: Ranker, batch: int = 2, history: int = 5, candidates: int = 7) -> tuple:
    """Random model inputs (tracing, tests, benchmarks); history rows right-padded unevenly."""
    generator = torch.Generator().manual_seed(0)
    num_items = model.config.num_items
    history_ids = torch.randint(1, num_items + 1, (batch, history), generator=generator)
    history_ids[1:, history // 2 :] = 0
    return (
        history_ids,
        torch.randint(1, 5, (batch, history), generator=generator),
        torch.zeros(batch, dtype=torch.long),
        torch.randint(1, num_items + 1, (batch, candidates), generator=generator),
        torch.randn(batch, candidates, NUM_CANDIDATE_FEATURES, generator=generator),
    )


def _dynamic_shapes() -> dict[str, dict[int, Any]]:
    batch, history, candidates = (torch.export.Dim(n) for n in ("batch", "history", "candidates"))
    return {
        "history": {0: batch, 1: history},
        "history_events": {0: batch, 1: history},
        "scenario": {0: batch},
        "candidates": {0: batch, 1: candidates},
        "candidate_features": {0: batch, 1: candidates},
    }


def _export(
    module: torch.nn.Module, inputs: tuple, path: Path, outputs: list[str], translations: dict | None = None
) -> Path:
    """``torch.onnx.export(dynamo=True)`` with dynamic batch/history/candidates, saved to ``path``."""
    quiet_exporter_logs()
    # One Dim shared by several inputs makes the exporter warn about axis names: expected here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="# The axis name")
        program = torch.onnx.export(
            module,
            inputs,
            dynamo=True,
            dynamic_shapes=_dynamic_shapes(),
            input_names=list(INPUT_NAMES),
            output_names=outputs,
            custom_translation_table=translations,
            optimize=True,
            verbose=False,
        )
    program.save(str(path))
    return path


def export_onnx(model: Ranker, path: Path, fused_attention: bool) -> Path:
    """Export the ranker (item table frozen) to ONNX with dynamic batch/history/candidates."""
    model = model.eval()
    model.freeze_item_table()
    model.set_fused_attention(fused_attention)
    wrapper = ScoresOnly(model, with_attention=not fused_attention).eval()
    translations = (
        {torch.ops.recsys.multi_head_attention.default: onnx_multi_head_attention}
        if fused_attention
        else None
    )
    outputs = ["scores"] if fused_attention else ["scores", "attention"]
    try:
        return _export(wrapper, example_inputs(model), path, outputs, translations)
    finally:
        model.set_fused_attention(False)


def export_folded(model: Ranker, path: Path) -> Path:
    """Export :class:`FoldedRanker` (the served CPU graph: scores only) to ONNX."""
    model = model.eval()
    model.freeze_item_table()
    folded = FoldedRanker(model).eval()
    return _export(folded, example_inputs(model), path, ["scores"], ONNX_TRANSLATIONS)


def optimize_for_cpu(
    source: Path, target: Path, disabled_optimizers: tuple[str, ...] = CPU_DISABLED_OPTIMIZERS
) -> Path:
    """Save ONNX Runtime's ORT_ENABLE_EXTENDED optimisation of ``source`` (portable across CPUs),
    without the fusions that were slower here."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    ort.InferenceSession(
        str(source),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=list(disabled_optimizers),
    )
    return target


def to_fp16(source: Path, target: Path) -> Path:
    """FP16 weights and compute; inputs/outputs stay float32/int64 (the runtime feeds float32)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(target))
    return target


def operator_types(path: Path) -> list[str]:
    """Sorted operator types of a graph, contrib ops as ``domain.Op``."""
    model = onnx.load(str(path), load_external_data=False)
    return sorted(
        {f"{node.domain}.{node.op_type}" if node.domain else node.op_type for node in model.graph.node}
    )


def export_bundle(
    model: Ranker,
    bundle_dir: Path,
    items: IdMap,
    scenarios: list[str],
    data_fingerprint: str,
    **metadata: Any,
) -> dict[str, Any]:
    """Write both graphs, the id map and the manifest into ``bundle_dir``; returns the manifest."""
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    for stale in bundle_dir.glob("*.onnx*"):
        stale.unlink()
    with tempfile.TemporaryDirectory() as scratch:
        folded = export_folded(model, Path(scratch) / "folded.onnx")
        plain = export_onnx(model, Path(scratch) / "plain.onnx", fused_attention=False)
        fused = export_onnx(model, Path(scratch) / "fused.onnx", fused_attention=True)
        optimize_for_cpu(folded, bundle_dir / CPU_GRAPH)
        optimize_for_cpu(plain, bundle_dir / EXPLAIN_GRAPH)
        to_fp16(fused, bundle_dir / GPU_GRAPH)
    items.save(bundle_dir / ITEMS_FILE)
    config = model.config
    graphs = {
        "cpu": {
            "file": CPU_GRAPH,
            "precision": "fp32",
            "optimization": "ORT_ENABLE_EXTENDED (saved)",
            "disabled_optimizers": list(CPU_DISABLED_OPTIMIZERS),
            "folded": FOLDED_DESCRIPTION,
            "outputs": ["scores"],
            "operators": operator_types(bundle_dir / CPU_GRAPH),
        },
        "explain": {
            "file": EXPLAIN_GRAPH,
            "precision": "fp32",
            "optimization": "ORT_ENABLE_EXTENDED (saved)",
            "disabled_optimizers": list(CPU_DISABLED_OPTIMIZERS),
            "outputs": ["scores", "attention"],
            "operators": operator_types(bundle_dir / EXPLAIN_GRAPH),
        },
        "gpu": {
            "file": GPU_GRAPH,
            "precision": "fp16 (float32 inputs/outputs)",
            "fused_attention": FUSED_ATTENTION_OP,
            "outputs": ["scores"],
            "operators": operator_types(bundle_dir / GPU_GRAPH),
        },
    }
    return write_manifest(
        bundle_dir,
        kind="rank",
        version=metadata.pop("version", None) or new_version("rank"),
        data_fingerprint=data_fingerprint,
        graphs=graphs,
        inputs=list(INPUT_NAMES),
        sources=list(SOURCES),
        scenarios=list(scenarios),
        max_history=config.max_history,
        num_candidate_features=NUM_CANDIDATE_FEATURES,
        num_items=config.num_items,
        model=config.to_dict(),
        **metadata,
    )


def main(argv: list[str] | None = None) -> int:
    """`recsys export rank --checkpoint FILE --bundle DIR`: re-export a trained checkpoint."""
    parser = argparse.ArgumentParser(prog="recsys export rank", description=main.__doc__)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--data", default="synthetic", help="dataset name under --artifacts")
    parser.add_argument("--bundle", type=Path, help="bundle dir (default ARTIFACTS/DATA/rank)")
    parser.add_argument("--checkpoint", type=Path, help="default: the bundle's training checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    bundle_dir = args.bundle or args.artifacts / Path(args.data).name.lower() / "rank"
    checkpoint = args.checkpoint or checkpoint_path(bundle_dir)
    if not checkpoint.is_file():
        parser.error(f"no checkpoint at {checkpoint}: train first with `recsys train rank`")
    model, items, scenarios, metadata = load_checkpoint(checkpoint)
    fingerprint = metadata.pop("data_fingerprint", "unknown")
    metadata.pop("version", None)
    manifest = export_bundle(model, bundle_dir, items, scenarios, fingerprint, **metadata)
    print(f"exported {bundle_dir} ({manifest['version']})")
    return 0
