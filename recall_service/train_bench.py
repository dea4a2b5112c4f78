"""`python -m recall_service.train_bench`: ms per training step and seconds per validation of the
recall trainer, against the pre-issue-14 code path kept here, interleaved on the same batches
(the default recipe's windows; with ``per_prefix_targets`` one per prefix, where the new step's
last block computes the newest position alone and the legacy step every position).

Variants (each its own copy of one initial model, AdamW and weight average):

- ``legacy``: the step as it was: every token's and every candidate's attributes gathered into an
  [items x attributes x dim] tensor and averaged, logits multiplied by the (always 1) dot-product
  scale, fp32 everywhere, ``nn.Dropout`` (the ``bernoulli_`` kernel), the unfused AdamW;
  validation encodes every user at the full 50-item width.
- ``new``: ``recall_service.train``: one item table per step (sparse attribute mean) shared by both
  towers, no scale for the inner product, the catalog logits in bf16 where the CPU has native bf16,
  the random-bit dropout mask (``recsys.torch_layers.keep_mask``), fused AdamW; validation on
  histories bucketed by length with inputs and masks built once. Both run under the trainers'
  OpenMP setting (a short spin, ``recsys.training.TRAINING_OPENMP_ENV``) unless the environment
  sets ``OMP_WAIT_POLICY``.
- ``new_autograd_loss``: ``new`` with the catalog softmax through autograd (matmul, cross-entropy
  and their backward) instead of ``recall_service.softmax_loss``'s one reused buffer: what that
  buffer is worth per step (``loss_in_one_buffer_step_speedup``).
- ``new_exact_candidate_count``: ``new`` without padding a sampled softmax's candidates to a
  multiple of 512 (a catalog above ``uniform_negatives`` items, e.g. Beauty tiled 3x; the same
  step as ``new`` on a full softmax): what one matmul shape for many steps is worth
  (``candidate_padding_step_speedup``; oneDNN compiles a bf16 product per shape).
- ``new_sorted_sampler``: ``new`` with the sampled softmax's distinct uniform draws taken by
  ``np.setdiff1d`` (a sort) instead of a mask over the catalog (``sampler_mask_step_speedup``);
  ``new_indexed_candidates``: ``new`` with the candidates' rows gathered by indexing (backward an
  accumulating ``index_put``) instead of ``index_select`` (``candidate_index_select_step_speedup``).
  Both are the same step as ``new`` on a full softmax.

Both run in one process after ``recsys.training.reuse_freed_memory`` (which the trainers call):
large freed buffers are reused instead of page-faulted in again, which speeds up both paths.

Rounds run each variant for ``--steps`` steps on the same batches, the order alternating (ABAB /
BABA) so that load from other processes falls on both. ``legacy`` runs twice: at the new default
thread count (the code's own gain) and at one thread (what the old default used). The JSON also
holds the bf16-vs-fp32 check of one step (loss and gradient) and the validation agreement.
"""

from __future__ import annotations

import os

# OpenMP waiting, read once when torch loads: a short spin, then sleep (recsys.training
# TRAINING_OPENMP_ENV, the same values); the environment's own OMP_WAIT_POLICY wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.update(OMP_WAIT_POLICY="PASSIVE", GOMP_SPINCOUNT="10000")

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from recall_service.model import TwoTowerModel
from recall_service.train import (
    RecallObjective,
    RecallTrainConfig,
    RecallValidator,
    SampledSoftmaxLoss,
    TrainingWindows,
    build_training_windows,
    length_bucketed_batches,
    model_attributes,
    model_shape,
    padded_history,
    training_item_counts,
)
from recsys.data.dataset import Dataset
from recsys.data.split import LeaveOneOutSplit
from recsys.evaluation.protocol import evaluate_scorer
from recsys.timing import machine_info, report_json
from recsys.torch_layers import Dropout
from recsys.training import (
    WeightAverage,
    adamw,
    available_cores,
    cpu_has_native_bf16,
    resolve_precision,
    reuse_freed_memory,
)

log = logging.getLogger(__name__)


# -- the pre-change code path ------------------------------------------------------------------
def legacy_model(model: TwoTowerModel) -> TwoTowerModel:
    """A copy of ``model`` whose dropout layers are plain ``nn.Dropout`` again."""
    legacy = copy.deepcopy(model)
    for module in legacy.modules():
        if isinstance(module, Dropout):
            module.__class__ = torch.nn.Dropout
    return legacy


def legacy_item_features(model: TwoTowerModel, items: torch.Tensor) -> torch.Tensor:
    """Item id embedding + attribute mean through an [..., attributes, dim] gather (as before)."""
    attributes = model.item_attributes[items]
    present = (attributes > 0).to(torch.float32)
    pooled = (model.attribute_embedding(attributes) * present.unsqueeze(-1)).sum(-2)
    pooled = pooled / present.sum(-1, keepdim=True).clamp(min=1.0)
    return model.item_embedding(items) + pooled


def legacy_loss(model: TwoTowerModel, windows: TrainingWindows, batch: np.ndarray) -> torch.Tensor:
    """The pre-change step's loss: per-token attribute gather in the user tower (``encode``
    without a table), the catalog's vectors gathered again, times ``scale()``, fp32."""
    width = max(int(windows.lengths[batch].max()), 1)
    items = torch.as_tensor(windows.items[batch, -width:])
    events = torch.as_tensor(windows.events[batch, -width:])
    targets = torch.as_tensor(windows.targets[batch, -(width + 1) :])
    scenarios = torch.as_tensor(windows.scenarios[batch, -(width + 1) :])
    hidden = model.encode(items, events)
    present = targets > 0
    users = model.user_head(hidden[present], scenarios[present])
    vectors = legacy_item_features(model, torch.arange(1, model.shape.num_items + 1))
    if model.normalised:
        vectors = F.normalize(vectors, dim=-1)
    scale = model.scale() if model.normalised else torch.ones(())
    logits = scale * (users @ vectors.T)
    return F.cross_entropy(logits, targets[present] - 1)


class LegacyScorer:
    """The pre-change validation scorer: every user padded to ``max_length``, rebuilt each call."""

    def __init__(self, model: TwoTowerModel, dataset: Dataset, split: LeaveOneOutSplit, max_length: int):
        self.model, self.dataset, self.split, self.max_length = model, dataset, split, max_length

    @torch.no_grad()
    def __call__(self, users: np.ndarray, phase: str) -> np.ndarray:
        rows, scenario_rows = [], []
        for user in users:
            history = self.split.history(int(user), phase)  # type: ignore[arg-type]
            rows.append(
                padded_history(history, self.dataset.events_of(int(user))[: len(history)], self.max_length)
            )
            scenario_rows.append(
                0 if self.dataset.scenarios is None else self.dataset.scenarios[user][len(history)]
            )
        items = torch.as_tensor(np.stack([r[0] for r in rows]))
        events = torch.as_tensor(np.stack([r[1] for r in rows]))
        scenarios = torch.as_tensor(np.asarray(scenario_rows, dtype=np.int64))
        # the full encoding, as before the last block computed the newest position alone
        user_vectors = self.model.user_head(self.model.encode(items, events)[:, -1], scenarios)
        vectors = legacy_item_features(self.model, torch.arange(1, self.model.shape.num_items + 1))
        scale = self.model.scale() if self.model.normalised else torch.ones(())
        return (scale * (user_vectors @ vectors.T)).numpy()


class SortedSampler(SampledSoftmaxLoss):
    """The sampled softmax with its distinct draws from ``np.setdiff1d`` (the earlier sampler)."""

    def uniform_draws(self, in_batch: np.ndarray) -> np.ndarray:
        extra = self.rng.integers(1, self.num_items + 1, size=self.uniform_negatives)
        if self.seen is not None:
            extra = extra[self.seen[extra - 1]]
        return np.setdiff1d(extra, in_batch)


class IndexedCandidates(TwoTowerModel):
    """The model with candidate rows gathered by indexing (the earlier gather)."""

    def candidate_rows(self, table: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        rows = table[items]
        return F.normalize(rows, dim=-1) if self.normalised else rows


def indexed_candidates_model(model: TwoTowerModel) -> TwoTowerModel:
    """A copy of ``model`` whose candidate rows are gathered by indexing."""
    copied = copy.deepcopy(model)
    copied.__class__ = IndexedCandidates
    return copied


# -- the bench ---------------------------------------------------------------------------------
class Variant:
    """One training setup: its own model copy, optimizer and weight average, and a step."""

    def __init__(self, name: str, model: TwoTowerModel, config: RecallTrainConfig, threads: int, step):
        self.name, self.threads, self.step_fn = name, threads, step
        self.legacy = name.startswith("legacy")
        self.model = (legacy_model(model) if self.legacy else copy.deepcopy(model)).train()
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = (
            torch.optim.AdamW(parameters, lr=config.learning_rate)
            if self.legacy
            else adamw(parameters, config.learning_rate, config.weight_decay)
        )
        self.average = WeightAverage(self.model, config.weight_average_decay)
        self.times_ms: list[float] = []
        self.cpu_ms: list[float] = []
        self.losses: list[float] = []

    def run(self, batches: list[np.ndarray]) -> None:
        torch.set_num_threads(self.threads)
        started, cpu_started = time.perf_counter(), time.process_time()
        for batch in batches:
            loss = self.step_fn(self.model, batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.average.update()
            self.losses.append(float(loss.detach()))
        self.times_ms.append((time.perf_counter() - started) * 1000.0 / len(batches))
        self.cpu_ms.append((time.process_time() - cpu_started) * 1000.0 / len(batches))


def bf16_check(
    model: TwoTowerModel, windows: TrainingWindows, batch: np.ndarray, loss_fns
) -> dict[str, float]:
    """Loss and gradients of one step in fp32 and with the bf16 catalog logits, same weights."""
    results = []
    for loss_fn in loss_fns:
        probe = copy.deepcopy(model).train()
        torch.manual_seed(0)  # the same dropout masks for both
        loss = new_step_loss(probe, windows, batch, loss_fn)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in probe.parameters() if p.grad is not None])
        results.append((float(loss), grads))
    (loss32, grad32), (loss16, grad16) = results
    return {
        "loss_fp32": round(loss32, 6),
        "loss_bf16": round(loss16, 6),
        "loss_relative_difference": abs(loss16 - loss32) / abs(loss32),
        "gradient_cosine": float(F.cosine_similarity(grad32, grad16, dim=0)),
        "gradient_norm_ratio": float(grad16.norm() / grad32.norm()),
    }


def new_step_loss(
    model: TwoTowerModel, windows: TrainingWindows, batch: np.ndarray, loss_fn: SampledSoftmaxLoss
) -> torch.Tensor:
    width = max(int(windows.lengths[batch].max()), 1)
    weights = None if windows.weights is None else torch.as_tensor(windows.weights[batch, -(width + 1) :])
    return RecallObjective(model, loss_fn, windows.per_prefix)(
        torch.as_tensor(windows.items[batch, -width:]),
        torch.as_tensor(windows.events[batch, -width:]),
        torch.as_tensor(windows.targets[batch, -(width + 1) :]),
        torch.as_tensor(windows.scenarios[batch, -(width + 1) :]),
        weights,
    )


def run_bench(data: Path, rounds: int, steps: int, threads: int, validation_rounds: int) -> dict[str, Any]:
    from recsys.data.loaders import load_dataset

    reuse_freed_memory()
    dataset = load_dataset(data)
    config = RecallTrainConfig.default()
    split = LeaveOneOutSplit(dataset)
    windows = build_training_windows(dataset, split, config.max_length, per_prefix=config.per_prefix_targets)
    attributes = model_attributes(dataset, config)
    torch.manual_seed(config.seed)
    model = TwoTowerModel(model_shape(dataset, config, attributes.shape[1]), attributes)
    rng = np.random.default_rng(config.seed)
    batches = length_bucketed_batches(windows.lengths, config.batch_size, rng)
    counts = training_item_counts(dataset, split)
    precision = resolve_precision(config.precision, "cpu")
    new_loss = SampledSoftmaxLoss(counts, config.uniform_negatives, rng, low_precision=precision == "bf16")
    fp32_loss = SampledSoftmaxLoss(counts, config.uniform_negatives, rng, low_precision=False)
    autograd_loss = SampledSoftmaxLoss(
        counts, config.uniform_negatives, rng, low_precision=precision == "bf16", fused_on_cpu=False
    )
    exact_count_loss = SampledSoftmaxLoss(
        counts, config.uniform_negatives, rng, low_precision=precision == "bf16", candidate_multiple=1
    )
    sorted_sampler_loss = SortedSampler(
        counts, config.uniform_negatives, rng, low_precision=precision == "bf16"
    )

    variants = [
        Variant("legacy", model, config, threads, lambda m, b: legacy_loss(m, windows, b)),
        Variant("new", model, config, threads, lambda m, b: new_step_loss(m, windows, b, new_loss)),
        Variant("legacy_1_thread", model, config, 1, lambda m, b: legacy_loss(m, windows, b)),
        Variant(
            "new_autograd_loss",
            model,
            config,
            threads,
            lambda m, b: new_step_loss(m, windows, b, autograd_loss),
        ),
        Variant(
            "new_exact_candidate_count",
            model,
            config,
            threads,
            lambda m, b: new_step_loss(m, windows, b, exact_count_loss),
        ),
        Variant(
            "new_sorted_sampler",
            model,
            config,
            threads,
            lambda m, b: new_step_loss(m, windows, b, sorted_sampler_loss),
        ),
        Variant(
            "new_indexed_candidates",
            indexed_candidates_model(model),
            config,
            threads,
            lambda m, b: new_step_loss(m, windows, b, new_loss),
        ),
    ]
    warmup = batches[:3]
    for variant in variants:
        variant.run(warmup)
        variant.times_ms.clear()
        variant.cpu_ms.clear()
    for round_index in range(rounds):
        block = batches[3 + round_index * steps : 3 + (round_index + 1) * steps]
        order = variants if round_index % 2 == 0 else variants[::-1]
        for variant in order:
            variant.run(block)
        log.info(
            "round %d: %s",
            round_index + 1,
            ", ".join(f"{v.name} {v.times_ms[-1]:.1f} ms/step" for v in variants),
        )

    # Validation, interleaved the same way, on the new variant's trained weights; the two must agree.
    trained = variants[1].model.eval()
    users = split.eval_users
    validator = RecallValidator(dataset, split, users, config.max_length)
    legacy_scorer = LegacyScorer(trained, dataset, split, config.max_length)
    names = ("legacy", "new", "legacy_1_thread")
    validation_seconds: dict[str, list[float]] = {name: [] for name in names}
    metrics: dict[str, dict[str, float]] = {}
    for round_index in range(validation_rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            torch.set_num_threads(1 if name == "legacy_1_thread" else threads)
            started = time.perf_counter()
            if name.startswith("legacy"):
                metrics[name] = evaluate_scorer(legacy_scorer, split, "valid", ks=(10, 50), batch_size=1024)
            else:
                metrics[name] = validator(trained)
            validation_seconds[name].append(time.perf_counter() - started)
    torch.set_num_threads(threads)
    steps_per_epoch = len(batches)

    def summary(variant: Variant) -> dict[str, Any]:
        return {
            "threads": variant.threads,
            "ms_per_step_median": round(statistics.median(variant.times_ms), 2),
            "ms_per_step_rounds": [round(t, 2) for t in variant.times_ms],
            "cpu_ms_per_step_median": round(statistics.median(variant.cpu_ms), 2),
        }

    step_ms = {v.name: statistics.median(v.times_ms) for v in variants}
    cpu_ms = {v.name: statistics.median(v.cpu_ms) for v in variants}
    valid_s = {name: statistics.median(seconds) for name, seconds in validation_seconds.items()}
    # One epoch = its steps + one validation (the old default validated on its 1 thread too).
    epoch_s = {
        "legacy": steps_per_epoch * step_ms["legacy"] / 1000 + valid_s["legacy"],
        "new": steps_per_epoch * step_ms["new"] / 1000 + valid_s["new"],
        "legacy_1_thread": steps_per_epoch * step_ms["legacy_1_thread"] / 1000 + valid_s["legacy_1_thread"],
    }
    return {
        "bench": "recall training step and validation, old (pre-issue-14) vs new code, interleaved",
        "command": "python -m recall_service.train_bench " + " ".join(sys.argv[1:]),
        "machine": {
            **machine_info(),
            "cores": available_cores(),
            "native_bf16": cpu_has_native_bf16(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "torch": torch.__version__,
        },
        "data": {"name": dataset.name, "windows": len(windows.lengths), "items": dataset.num_items},
        "setup": {
            "batch_size": config.batch_size,
            "steps_per_round": steps,
            "rounds": rounds,
            "steps_per_epoch": steps_per_epoch,
            "precision": precision,
            "validation_users": len(users),
        },
        "step": {v.name: summary(v) for v in variants},
        "step_speedup_same_threads": round(step_ms["legacy"] / step_ms["new"], 2),
        "step_speedup_vs_old_default_1_thread": round(step_ms["legacy_1_thread"] / step_ms["new"], 2),
        "step_cpu_time_ratio_same_threads": round(cpu_ms["legacy"] / cpu_ms["new"], 2),
        "loss_in_one_buffer_step_speedup": round(step_ms["new_autograd_loss"] / step_ms["new"], 2),
        "candidate_padding_step_speedup": round(step_ms["new_exact_candidate_count"] / step_ms["new"], 2),
        "sampler_mask_step_speedup": round(step_ms["new_sorted_sampler"] / step_ms["new"], 2),
        "candidate_index_select_step_speedup": round(step_ms["new_indexed_candidates"] / step_ms["new"], 2),
        "sampled_softmax": not new_loss.full_softmax,
        "validation_seconds": {
            name: [round(s, 2) for s in seconds] for name, seconds in validation_seconds.items()
        },
        "validation_agreement": {
            name: {k: round(v, 4) for k, v in m.items() if k in ("HR@10", "NDCG@10", "HR@50", "users")}
            for name, m in metrics.items()
        },
        "epoch_seconds_estimate": {name: round(s, 1) for name, s in epoch_s.items()},
        "epoch_speedup_same_threads": round(epoch_s["legacy"] / epoch_s["new"], 2),
        "epoch_speedup_vs_old_default_1_thread": round(epoch_s["legacy_1_thread"] / epoch_s["new"], 2),
        "bf16_check": bf16_check(model, windows, batches[0], (fp32_loss, new_loss))
        if precision == "bf16"
        else None,
        "mean_loss_last_round": {v.name: round(float(np.mean(v.losses[-steps:])), 4) for v in variants},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recall_service.train_bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="dataset folder (e.g. ../shared/data/amazon-beauty)"
    )
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds per variant")
    parser.add_argument("--steps", type=int, default=20, help="training steps per round")
    parser.add_argument(
        "--threads", type=int, default=0, help="threads of the same-thread comparison (0 = all cores)"
    )
    parser.add_argument("--validation-rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench/train-speed.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    threads = args.threads or available_cores()
    result = run_bench(args.data, args.rounds, args.steps, threads, args.validation_rounds)
    report_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
