"""`recsys train recall`: train the two-tower model on every prefix of every training sequence, then
export the recall bundle (ONNX user tower, item vectors, Faiss index, co-visitation and popularity
tables, id maps, manifest).

Loss: sampled softmax over the batch's own targets (in-batch negatives) plus uniformly sampled
extra negatives, each logit corrected by the log of its sampling probability (logQ). Training
never sees a user's validation or test item (``LeaveOneOutSplit.train_sequence``); early stopping
on validation HR@10 under the full-ranking protocol.

Budgets are work, not time (``recsys.training``): at most ``epochs`` epochs, stopped when validation
has not improved for ``patience`` epochs; a wall-clock guard in hours only catches runaways, and the
manifest records what stopped training. Training uses every core by default, the GPU when there is
one (bf16 autocast), and runs as DistributedDataParallel under ``torchrun`` (each global batch of
``batch_size`` windows split across the processes, so that one or N processes take the same steps).
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recall_service.model import TowerEnsemble, TwoTowerModel, TwoTowerShape, tower_members
from recall_service.softmax_loss import LogitsBuffer, softmax_cross_entropy
from recall_service.text import (
    DEFAULT_BUCKETS,
    TEXT_MODES,
    HashedTitles,
    TitleEncoder,
    encode_titles,
    has_titles,
    sentence_model_encoder,
)
from recsys.data.dataset import Dataset, EventType
from recsys.data.split import LeaveOneOutSplit, Phase
from recsys.evaluation.protocol import metrics_from_ranks
from recsys.training import (
    DEFAULT_TIME_GUARD_S,
    DistributedContext,
    ThreadGovernor,
    TrainingRun,
    WeightAverage,
    adamw,
    autocast,
    averaged_weights,
    barrier,
    configure_threads,
    data_parallel,
    gather_metrics,
    init_distributed,
    main_first,
    resolve_precision,
    shard,
)

log = logging.getLogger(__name__)


@dataclass
class RecallTrainConfig:
    """Model, training and export settings of the recall bundle."""

    # model
    dim: int = 64
    layers: int = 2
    heads: int = 2
    max_length: int = 50
    dropout: float = 0.3
    relative_positions: bool = True
    use_attributes: bool = True  # False: items are ids alone (no pooled attribute embedding)
    id_dropout: float = 0.0  # training: share of candidate id embeddings dropped (attributes only)
    similarity: str = "cosine"  # or "dot": raw inner product of unnormalised towers (SASRec)
    post_norm: bool = False  # post-LN blocks + input LayerNorm (SASRec) instead of pre-LN
    # Item text (the catalog's titles): "auto" = hashed title features when any item has a title
    # (nothing at all otherwise), "hash" = the same but required, "off" = none.
    text: str = "auto"
    text_buckets: int = DEFAULT_BUCKETS
    # A local sentence-transformers model folder: its title vectors, projected, replace the hashed
    # features (needs the sentence-transformers package; never downloads).
    text_model: str = ""
    # Items without training interactions: "cold" = cold-start items (id embedding masked to zero,
    # so attributes and text alone make the vector; never a training negative, since nothing says
    # users avoid them), "keep" = like any item, "auto" = "cold" with text, "keep" without (the
    # behaviour before item text).
    unseen_items: str = "auto"
    # training: at most ``epochs`` epochs; early stopping (``patience``) normally ends it first
    epochs: int = 200
    batch_size: int = 128  # windows per optimizer step, over all processes together
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    uniform_negatives: int = 2048  # >= the catalog size: every item is a negative (full softmax)
    logq_correction: bool = True
    # Loss weight 1 + boost * decay ** age for a user's training targets (age 0 = newest): the
    # latest behaviour is the closest to what the user will do next. 0 = uniform weights.
    recency_boost: float = 0.0
    recency_decay: float = 0.5
    # One training window per prefix, its newest position the only target (RecBole's loader),
    # instead of every position of a window at once (the default recipe sets it; see default()).
    per_prefix_targets: bool = False
    # Evaluate and keep an exponential moving average of the weights (0 = the live weights).
    weight_average_decay: float = 0.0
    patience: int = 4
    eval_users: int = 0  # validation users for early stopping (0 = all)
    time_guard_s: float = DEFAULT_TIME_GUARD_S  # wall-clock guard (logged and recorded when it fires)
    # After early stopping picks the epoch count, retrain from scratch for that many epochs on the
    # training AND validation items (never test items). Off by default: the recall issue forbids
    # training on validation items; on Beauty it lifts test u2i HR@10 from 0.074 to 0.090.
    refit_with_validation: bool = False
    seed: int = 7
    # Two-tower models trained one after the other, member k from seed ``seed + 1000 k``, each stopped
    # on validation, then served as one (recall_service.model.TowerEnsemble: vectors side by side,
    # the index ranks by the sum of their scores). 1 = a single model. Beauty (docs/EXPERIMENTS.md):
    # 2 members lift u2i (valid HR@10 0.1070 -> 0.1141, test 0.0844 -> 0.0880) but not the served
    # home that the ranker makes of it (valid 0.1185 -> 0.1176), for twice the recall training.
    ensemble: int = 1
    threads: int = 0  # torch threads per process (0 = every core, shared by this host's processes)
    device: str = "auto"  # "auto" (the GPU when there is one), "cpu" or "cuda"
    # "auto": bf16 autocast on a GPU; on a CPU with native bf16, the catalog logits matmul in bf16
    # (the step's largest; accumulation and the softmax stay fp32); "fp32" everywhere otherwise.
    precision: str = "auto"
    # export
    index_factory: str = ""  # "" = chosen by catalog size (Flat, or IVF for large catalogs)
    nprobe: int = 32
    ef_search: int = 128
    # co-visitation (window 5, backward 0.3, popularity exponent 0.25, decay 0.6; Beauty test HR@10
    # 0.093, HR@500 0.336). A grid on Beauty's validation (training-only tables) prefers window 12
    # and exponent 0.05 for the source alone (NDCG@10 0.0670 vs 0.0645), but the served home made
    # of it ties on validation (0.0731 vs 0.0731) and test (docs/EXPERIMENTS.md): kept.
    covisit_window: int = 5
    covisit_backward_weight: float = 0.3
    covisit_popularity_exponent: float = 0.25
    covisit_neighbours: int = 200
    covisit_recent_items: int = 5
    covisit_recency_decay: float = 0.6
    default_sources: dict[str, dict[str, float]] = field(
        default_factory=lambda: {scenario: dict(mix) for scenario, mix in DEFAULT_SOURCE_MIX.items()}
    )

    @classmethod
    def tiny(cls) -> RecallTrainConfig:
        """Seconds on the tiny synthetic data (test fixtures)."""
        return cls(
            dim=32,
            layers=1,
            heads=2,
            max_length=20,
            dropout=0.1,
            epochs=4,
            batch_size=64,
            uniform_negatives=128,
            patience=2,
            covisit_neighbours=50,
        )

    @classmethod
    def quick(cls) -> RecallTrainConfig:
        """`make run` on the quick synthetic data: well under two minutes."""
        return cls(
            dim=48,
            layers=1,
            heads=2,
            max_length=30,
            dropout=0.2,
            epochs=8,
            batch_size=128,
            uniform_negatives=512,
            patience=2,
            covisit_neighbours=100,
        )

    @classmethod
    def default(cls) -> RecallTrainConfig:
        """Beauty-sized data: the SASRec recipe (post-LN, raw inner product, dropout 0.5, exact
        softmax over every item of a catalog up to 20k, one training example per prefix as RecBole's
        loader feeds it) plus this project's relative-position attention bias, validated (and kept)
        on an exponential moving average of the weights; batch 256 at lr 2e-3. Measured on Beauty
        (docs/EXPERIMENTS.md, 2 cores, seed 7): valid HR@10 0.1167 (best epoch 11 of 15), test u2i
        HR@10 0.0918 / NDCG@10 0.0556 / HR@500 0.4524; every window once with all its positions as
        targets (``per_prefix_targets=False``, batch 64, its best size): valid 0.1066, test 0.0809 /
        0.0488 / 0.3986."""
        return cls(
            similarity="dot",
            post_norm=True,
            dropout=0.5,
            uniform_negatives=20_000,
            per_prefix_targets=True,
            batch_size=256,
            learning_rate=2e-3,
            weight_average_decay=0.998,
        )


# Share of k each source may contribute, per scenario (the service's defaults when a request names
# no sources). Keys must be in engine.SOURCES.
DEFAULT_SOURCE_MIX: dict[str, dict[str, float]] = {
    "home": {"u2i": 0.5, "covisit": 0.4, "popular": 0.1},
    "item_detail": {"i2i": 0.35, "covisit": 0.35, "u2i": 0.2, "popular": 0.1},
    "cart": {"covisit": 0.4, "i2i": 0.3, "u2i": 0.2, "popular": 0.1},
    "category": {"u2i": 0.6, "covisit": 0.2, "popular": 0.2},
    "ads": {"u2i": 0.6, "covisit": 0.2, "popular": 0.2},
}


@dataclass
class TrainingWindows:
    """Training examples: left-padded input histories and the target of every output position.

    ``items``/``events`` are [W, L] (item ids +1, 0 = padding); ``targets``/``scenarios`` are
    [W, L + 1] right-aligned with the model's outputs (start token, then one per item), 0 = none.
    """

    items: np.ndarray
    events: np.ndarray
    targets: np.ndarray
    scenarios: np.ndarray
    lengths: np.ndarray  # real input items per window
    # [W, L + 1] loss weight per target: 1 + boost * decay ** (targets after it in the user's
    # training sequence); all ones without a recency boost.
    weights: np.ndarray | None = None
    per_prefix: bool = False  # one window per prefix: the newest position is the only target


def item_attribute_matrix(dataset: Dataset) -> np.ndarray:
    """[num_items + 1, A] attribute ids (+1, 0 = none) per item id (+1); row 0 is padding."""
    bags = dataset.catalog.attributes
    width = max([len(b) for b in bags] + [1])
    matrix = np.zeros((dataset.num_items + 1, width), dtype=np.int64)
    for item, bag in enumerate(bags):
        matrix[item + 1, : len(bag)] = np.asarray(bag, dtype=np.int64) + 1
    return matrix


def build_training_windows(
    dataset: Dataset,
    split: LeaveOneOutSplit,
    max_length: int,
    include_validation: bool = False,
    recency_boost: float = 0.0,
    recency_decay: float = 0.5,
    per_prefix: bool = False,
) -> TrainingWindows:
    """Cut every training sequence into windows of at most ``max_length + 1`` targets.

    ``per_prefix``: one window per prefix of at least one item instead, its newest position the
    only target (RecBole's sequential loader: every target once, each with its own forward pass
    and dropout masks, up to ``max_length`` items of history; no start-token target).

    The first window of a sequence also trains the start token (predict the first item from no
    history); later windows of long sequences drop that target, since they do have history.
    ``recency_boost`` > 0 weighs each user's latest training targets up (the closest in time to
    what will be asked next): weight ``1 + boost * decay ** age``, age 0 = the newest target.
    """
    rows_items, rows_events, rows_targets, rows_scenarios, lengths, rows_weights = [], [], [], [], [], []
    span = max_length + 1
    for user in range(dataset.num_users):
        length = split.train_length(user)
        if include_validation and len(dataset.sequences[user]) >= 3:
            length += 1
        if length == 0:
            continue
        sequence = np.asarray(dataset.sequences[user][:length], dtype=np.int64) + 1
        events = np.asarray(dataset.events_of(user)[:length], dtype=np.int64)
        events = np.where(events == EventType.UNSPECIFIED, EventType.VIEW, events)
        scenarios = (
            np.zeros(length, dtype=np.int64)
            if dataset.scenarios is None
            else np.asarray(dataset.scenarios[user][:length], dtype=np.int64)
        )
        # per-prefix: the window of every prefix of >= 1 item, its earlier targets dropped below
        ends = range(2, length + 1) if per_prefix else range(length, 0, -max_length)
        for end in ends:
            start = max(0, end - span)
            inputs = end - start - 1
            item_row = np.zeros(max_length, dtype=np.int64)
            event_row = np.zeros(max_length, dtype=np.int64)
            target_row = np.zeros(span, dtype=np.int64)
            scenario_row = np.zeros(span, dtype=np.int64)
            if inputs > 0:
                item_row[-inputs:] = sequence[start : end - 1]
                event_row[-inputs:] = events[start : end - 1]
            # Right-aligned with the model's outputs: start token, then one output per input item.
            target_row[-(inputs + 1) :] = sequence[start:end]
            ages = length - 1 - np.arange(start, end)
            weight_row = np.zeros(span, dtype=np.float32)
            weight_row[-(inputs + 1) :] = 1.0 + recency_boost * recency_decay ** ages.astype(np.float32)
            rows_weights.append(weight_row)
            scenario_row[-(inputs + 1) :] = scenarios[start:end]
            if per_prefix:
                target_row[:-1] = 0  # the newest position is the only target
            elif start > 0:
                target_row[-(inputs + 1)] = 0  # this window has history the start token cannot see
            rows_items.append(item_row)
            rows_events.append(event_row)
            rows_targets.append(target_row)
            rows_scenarios.append(scenario_row)
            lengths.append(inputs)
            if start == 0 and not per_prefix:
                break
    return TrainingWindows(
        items=np.stack(rows_items),
        events=np.stack(rows_events),
        targets=np.stack(rows_targets),
        scenarios=np.stack(rows_scenarios),
        lengths=np.asarray(lengths, dtype=np.int64),
        weights=np.stack(rows_weights) if recency_boost > 0 else None,
        per_prefix=per_prefix,
    )


def length_bucketed_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Batches of windows of similar length (little padding), in random order."""
    order = np.lexsort((rng.random(len(lengths)), lengths))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def padded_history(
    sequence: np.ndarray, events: np.ndarray | None, max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded model input (+1 ids) of the newest ``max_length`` items of one history."""
    items = np.zeros(max_length, dtype=np.int64)
    event_row = np.zeros(max_length, dtype=np.int64)
    recent = np.asarray(sequence, dtype=np.int64)[-max_length:]
    if recent.size:
        items[-recent.size :] = recent + 1
        recent_events = (
            np.full(recent.size, EventType.VIEW, dtype=np.int64)
            if events is None
            else np.asarray(events, dtype=np.int64)[-recent.size :]
        )
        event_row[-recent.size :] = np.where(recent_events == 0, EventType.VIEW, recent_events)
    return items, event_row


class SampledSoftmaxLoss:
    """In-batch + uniform negatives with logQ correction under their mixture sampling law.

    With ``uniform_negatives`` at least the catalog size every item is a candidate: an exact
    (full) softmax, which needs no correction. ``seen_only``: items without interactions
    (``item_counts`` 0) are never candidates (cold-start items: nothing says users avoid them).

    Sampled candidates are padded to a multiple of ``candidate_multiple`` with columns that are
    never chosen (bias -inf: probability and gradient exactly 0): the distinct draws number
    differently every step, and a CPU's bf16 matmuls are compiled per shape (oneDNN primitives),
    so an unpadded count recompiles the step's three catalog products every step (on Beauty tiled
    3x, ~15.5k candidates, ~30 ms of a ~110 ms step: ``python -m recall_service.train_bench``,
    ``candidate_padding_step_speedup``). 1 = no padding.
    """

    def __init__(
        self,
        item_counts: np.ndarray,
        uniform_negatives: int,
        rng: np.random.Generator,
        logq_correction: bool = True,
        low_precision: bool = False,
        seen_only: bool = False,
        fused_on_cpu: bool = True,
        candidate_multiple: int = 512,
    ):
        counts = item_counts.astype(np.float64) + 1.0
        self.popularity = torch.as_tensor(counts / counts.sum(), dtype=torch.float32)
        self.num_items = len(item_counts)
        self.uniform_negatives = uniform_negatives
        self.full_softmax = uniform_negatives >= self.num_items
        self.logq_correction = logq_correction and not self.full_softmax
        self.rng = rng
        self.low_precision = low_precision
        # [num_items] True where an item may be a candidate; None = every item
        self.seen = np.asarray(item_counts) > 0 if seen_only else None
        self._unseen_columns: dict[torch.device, torch.Tensor] = {}
        # On a CPU the loss and its gradient are computed in one block reused every step
        # (recall_service.softmax_loss: a fragmenting heap otherwise grows with the catalog);
        # ``fused_on_cpu=False`` keeps autograd's path there too (benchmarks, tests).
        self.fused_on_cpu = fused_on_cpu
        self.candidate_multiple = max(1, candidate_multiple)
        self.buffer = LogitsBuffer()

    def __call__(
        self,
        model: TwoTowerModel,
        users: torch.Tensor,
        positives: torch.Tensor,
        weights: torch.Tensor | None = None,
        item_table: torch.Tensor | None = None,
        normaliser: float | None = None,
    ) -> torch.Tensor:
        """``users`` [P, D]; ``positives`` [P] item ids (+1); ``weights`` [P] or None;
        ``item_table`` the step's :meth:`TwoTowerModel.item_table` (computed when None).

        The weighted mean over the positions, or, with ``normaliser``, the weighted sum divided by
        it (data-parallel training: the global batch's total weight over the number of processes,
        so that the averaged gradients are exactly the one-process gradient)."""
        if item_table is None:
            item_table = model.item_table(model.shape.id_dropout if model.training else 0.0)
        fused = users.device.type == "cpu" and self.fused_on_cpu
        if fused and model.normalised:  # the temperature on the rows: the same logits
            users = model.scale() * users
        if self.full_softmax and fused:
            masked = self._unseen(users.device) if self.seen is not None else None
            return softmax_cross_entropy(
                users,
                model.candidate_vectors(item_table),
                positives - 1,
                self.buffer,
                weights,
                normaliser,
                None,
                masked,
                self.low_precision,
            )
        if self.full_softmax:
            vectors = model.candidate_vectors(item_table)
            logits = model.scaled(catalog_logits(users, vectors, self.low_precision))
            if self.seen is not None:
                logits = logits.masked_fill(self._unseen(logits.device), float("-inf"))
            losses = F.cross_entropy(logits, positives - 1, reduction="none")
            return weighted_loss(losses, weights, normaliser)
        in_batch = torch.unique(positives)
        extra = self.uniform_draws(in_batch.cpu().numpy())
        candidates = torch.cat([in_batch, torch.as_tensor(extra, dtype=torch.long, device=in_batch.device)])
        labels = torch.searchsorted(in_batch, positives)
        bias = None
        if self.logq_correction:
            # Probability that each candidate was drawn: expected in-batch occurrences + uniform draws.
            popularity = self.popularity.to(users.device)[candidates - 1]
            sample_probability = len(positives) * popularity + self.uniform_negatives / self.num_items
            bias = -torch.log(sample_probability)
        padding = -len(candidates) % self.candidate_multiple
        if padding:  # columns never chosen (any item's vector, bias -inf): one shape for many steps
            if bias is None:
                bias = torch.zeros(len(candidates), device=users.device)
            candidates = torch.cat([candidates, candidates.new_ones(padding)])
            bias = torch.cat([bias, bias.new_full((padding,), float("-inf"))])
        vectors = model.candidate_rows(item_table, candidates)
        if fused:
            return softmax_cross_entropy(
                users,
                vectors,
                labels,
                self.buffer,
                weights,
                normaliser,
                bias,
                None,
                self.low_precision,
            )
        logits = model.scaled(catalog_logits(users, vectors, self.low_precision))
        if bias is not None:
            logits = logits + bias
        return weighted_loss(F.cross_entropy(logits, labels, reduction="none"), weights, normaliser)

    def uniform_draws(self, in_batch: np.ndarray) -> np.ndarray:
        """This step's uniform negatives (+1 ids): the distinct draws, ascending, less the batch's
        positives ``in_batch`` (and, ``seen_only``, less items without interactions)."""
        extra = self.rng.integers(1, self.num_items + 1, size=self.uniform_negatives)
        if self.seen is not None:  # the same draws, unseen items left out (logQ is per item)
            extra = extra[self.seen[extra - 1]]
        return distinct_except(extra, in_batch, self.num_items)

    def _unseen(self, device: torch.device) -> torch.Tensor:
        """[num_items] bool: the catalog columns that are never candidates."""
        if device not in self._unseen_columns:
            self._unseen_columns[device] = torch.as_tensor(~self.seen, device=device)
        return self._unseen_columns[device]


def distinct_except(draws: np.ndarray, excluded: np.ndarray, num_items: int) -> np.ndarray:
    """``np.setdiff1d(draws, excluded)`` for item ids in [0, ``num_items``]: the distinct draws not
    excluded, ascending, from one boolean mask over the catalog instead of a sort (~0.2 against
    ~3.5 ms a step for 20,000 draws; single-threaded time the step waits for)."""
    chosen = np.zeros(num_items + 1, dtype=bool)
    chosen[draws] = True
    chosen[excluded] = False
    return np.flatnonzero(chosen)


def catalog_logits(users: torch.Tensor, vectors: torch.Tensor, low_precision: bool) -> torch.Tensor:
    """users [P, D] . vectors [N, D] -> [P, N] logits. ``low_precision`` on a CPU: bf16 logits from
    a bf16 product (fp32 accumulation; 3-4x faster with native bf16), and the softmax reads them
    as they are (it accumulates in fp32) with half the memory traffic; GPUs get bf16 products
    from autocast, which keeps the softmax in fp32."""
    if low_precision and users.device.type == "cpu":
        return users.to(torch.bfloat16) @ vectors.to(torch.bfloat16).T
    return users @ vectors.T


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return losses.mean() if weights is None else (losses * weights).sum() / weights.sum()


def weighted_loss(
    losses: torch.Tensor, weights: torch.Tensor | None, normaliser: float | None
) -> torch.Tensor:
    """:func:`weighted_mean`, or the weighted sum over ``normaliser`` when one is given (fp32)."""
    losses = losses.float()
    if normaliser is None:
        return weighted_mean(losses, weights)
    total = losses.sum() if weights is None else (losses * weights).sum()
    return total / normaliser


class RecallObjective(nn.Module):
    """One step's loss from a batch of windows: the module DistributedDataParallel wraps (its
    forward is what makes DDP ready to average the gradients in backward). ``newest_only``: the
    windows' only targets are at their newest position (per-prefix windows), so the last block
    computes that position alone."""

    def __init__(self, model: TwoTowerModel, loss_fn: SampledSoftmaxLoss, newest_only: bool = False):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.newest_only = newest_only

    def forward(
        self,
        items: torch.Tensor,
        events: torch.Tensor,
        targets: torch.Tensor,
        scenarios: torch.Tensor,
        weights: torch.Tensor | None,
        normaliser: float | None = None,
    ) -> torch.Tensor:
        model = self.model
        # Every item's representation once per step, shared by the user tower's inputs and the
        # candidates (the candidates' copy drops ids when id_dropout is on).
        table = model.item_table()
        candidate_table = table if model.shape.id_dropout <= 0 else model.item_table(model.shape.id_dropout)
        if self.newest_only:
            hidden = model.encode(items, events, table, last_only=True)
            targets, scenarios = targets[:, -1:], scenarios[:, -1:]
            weights = None if weights is None else weights[:, -1:]
        else:
            hidden = model.encode(items, events, table)
        present = targets > 0
        users = model.user_head(hidden[present], scenarios[present])
        position_weights = None if weights is None else weights[present]
        return self.loss_fn(model, users, targets[present], position_weights, candidate_table, normaliser)


@dataclass
class TrainResult:
    model: TwoTowerModel | TowerEnsemble
    epochs_run: int
    best_epoch: int
    best_valid: dict[str, float]
    train_seconds: float
    history: list[dict[str, float]]
    refit_with_validation: bool = False
    run: dict[str, Any] = field(default_factory=dict)  # TrainingRun.record(): stop reason, threads, ...


VALIDATION_SCORE_ROWS = 64  # users scored at once by RecallValidator on a CPU


class RecallValidator:
    """Full-ranking metrics of the torch model for a fixed set of users (early stopping).

    The padded histories, history masks and targets are built once; each call encodes the users
    in batches of similar history length (trimmed padding: left padding never changes the newest
    position's output; the last block computes the newest position alone) and ranks every item
    by the model's fp32 scores, the history excluded and ties counted against the target, exactly
    as ``recsys.evaluation.protocol.target_ranks``.
    """

    def __init__(
        self,
        dataset: Dataset,
        split: LeaveOneOutSplit,
        users: np.ndarray,
        max_length: int,
        phase: Phase = "valid",
        batch_size: int = 256,  # users encoded at once: ~75 MB of activations at width 50
    ):
        self.num_items = dataset.num_items
        histories = [split.history(int(user), phase) for user in users]
        rows = [
            padded_history(history, dataset.events_of(int(user))[: len(history)], max_length)
            for user, history in zip(users, histories, strict=True)
        ]
        lengths = np.array([min(len(h), max_length) for h in histories], dtype=np.int64)
        order = np.argsort(lengths, kind="stable")
        self.users = np.asarray(users)[order]
        self.lengths = lengths[order]
        self.items = torch.as_tensor(np.stack([rows[i][0] for i in order])) if rows else torch.zeros(0, 1)
        self.events = torch.as_tensor(np.stack([rows[i][1] for i in order])) if rows else torch.zeros(0, 1)
        self.scenarios = torch.as_tensor(
            np.array(
                [
                    0 if dataset.scenarios is None else int(dataset.scenarios[int(user)][len(histories[i])])
                    for i, user in zip(order, self.users, strict=True)
                ],
                dtype=np.int64,
            )
        )
        self.targets = torch.as_tensor(split.targets(self.users, phase))
        self.batches = [
            np.arange(s, min(s + batch_size, len(order))) for s in range(0, len(order), batch_size)
        ]
        # Per batch: (row, item) of every history item, set to -inf before ranking.
        self.history_masks = []
        for batch in self.batches:
            batch_rows = np.concatenate(
                [np.full(len(histories[order[r]]), i) for i, r in enumerate(batch)] or [np.zeros(0)]
            ).astype(np.int64)
            batch_items = np.concatenate(
                [np.asarray(histories[order[r]], dtype=np.int64) for r in batch] or [np.zeros(0)]
            ).astype(np.int64)
            self.history_masks.append((torch.as_tensor(batch_rows), torch.as_tensor(batch_items)))

    def __len__(self) -> int:
        return len(self.users)

    @torch.no_grad()
    def ranks(self, model: TwoTowerModel | TowerEnsemble) -> np.ndarray:
        """0-based full-catalog rank of each user's target (``self.users`` order)."""
        was_training = model.training
        model.eval()
        # An ensemble scores by the inner product of its members' vectors side by side (what its
        # index ranks by); one model keeps its own logits (the cosine temperature ranks alike).
        members = tower_members(model)
        scaled = model.scaled if isinstance(model, TwoTowerModel) else (lambda scores: scores)
        device = members[0].item_attributes.device
        tables = [member.item_table() for member in members]
        vectors = torch.cat(
            [member.candidate_vectors(table).float() for member, table in zip(members, tables, strict=True)],
            dim=1,
        )
        # Users scored 64 rows at a time on a CPU: few enough that a chunk's scores mostly stay in
        # cache between the product and the count (3x faster than a whole batch of 256 at Beauty's
        # 12,101 items), enough that reading the catalog's vectors is spread over many users (a
        # share of ~1.6 MB of scores, 11 rows on Beauty tiled 3x, made the product memory-bound:
        # validation 1.4x slower there; level on Beauty). The same scores, bit for bit.
        chunk = VALIDATION_SCORE_ROWS if device.type == "cpu" else 1 << 30
        # Widest batches first: the narrower ones then fit in the memory those freed instead of
        # growing the heap (glibc's, kept by reuse_freed_memory) pass after pass.
        ranks: list[list[torch.Tensor]] = [[] for _ in self.batches]
        for batch_index in reversed(range(len(self.batches))):
            batch, (mask_rows, mask_items) = self.batches[batch_index], self.history_masks[batch_index]
            width = max(int(self.lengths[batch].max()), 1)
            items = self.items[batch, -width:].to(device)
            events = self.events[batch, -width:].to(device)
            scenarios = self.scenarios[batch].to(device)
            users = torch.cat(
                [
                    member.user_head(member.encode(items, events, table, last_only=True)[:, -1], scenarios)
                    for member, table in zip(members, tables, strict=True)
                ],
                dim=1,
            ).float()
            targets = self.targets[batch].to(device)
            # history (row, item) pairs are sorted by row: each chunk's are one slice
            bounds = np.searchsorted(mask_rows.numpy(), np.arange(0, len(batch) + chunk, chunk))
            for index, start in enumerate(range(0, len(batch), chunk)):
                stop = min(start + chunk, len(batch))
                scores = scaled(users[start:stop] @ vectors.T)
                lo, hi = int(bounds[index]), int(bounds[index + 1])
                scores[(mask_rows[lo:hi] - start).to(device), mask_items[lo:hi].to(device)] = -torch.inf
                target_scores = scores[torch.arange(stop - start, device=device), targets[start:stop]]
                at_least = (scores >= target_scores[:, None]).sum(dim=1) - 1
                rank = torch.where(torch.isfinite(target_scores), at_least, self.num_items)
                ranks[batch_index].append(rank.cpu())
        model.train(was_training)
        in_order = [part for batch_ranks in ranks for part in batch_ranks]
        return torch.cat(in_order).numpy().astype(np.float64) if in_order else np.zeros(0)

    def __call__(
        self, model: TwoTowerModel | TowerEnsemble, ks: tuple[int, ...] = (10, 50)
    ) -> dict[str, float]:
        if not len(self):  # a process with no share of the users (more processes than users)
            return {"users": 0}
        return metrics_from_ranks(self.ranks(model), ks)


def train_one_epoch(
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    windows: TrainingWindows,
    batch_size: int,
    rng: np.random.Generator,
    average: WeightAverage | None = None,
    context: DistributedContext | None = None,
    precision: str = "fp32",
    governor: ThreadGovernor | None = None,
) -> float:
    """One pass over the windows in length-bucketed global batches of ``batch_size``, each split
    across the processes; returns the mean loss. ``objective`` is a :class:`RecallObjective`,
    or the DistributedDataParallel module wrapping one; ``governor`` picks each step's threads."""
    context = context or DistributedContext()
    objective.train()
    device = context.torch_device()
    # Whole multiples of 8 tokens per row on a GPU (tensor-core tiles, fewer distinct shapes).
    multiple = 8 if device.type == "cuda" else 1
    present = windows.targets > 0
    window_weight = (present if windows.weights is None else windows.weights * present).sum(axis=1)
    max_length = windows.items.shape[1]
    losses = []
    global_batches = length_bucketed_batches(windows.lengths, batch_size, rng)
    for global_batch in global_batches if governor is None else governor.run(global_batches):
        if len(global_batch) < context.world_size:
            continue  # a tail batch too small to give every process a window
        batch = shard(global_batch, context)
        width = max(int(windows.lengths[batch].max()), 1)
        width = min(max_length, -(-(width + 1) // multiple) * multiple - 1)
        items = torch.as_tensor(windows.items[batch, -width:]).to(device)
        events = torch.as_tensor(windows.events[batch, -width:]).to(device)
        targets = torch.as_tensor(windows.targets[batch, -(width + 1) :]).to(device)
        scenarios = torch.as_tensor(windows.scenarios[batch, -(width + 1) :]).to(device)
        weights = None
        if windows.weights is not None:
            weights = torch.as_tensor(windows.weights[batch, -(width + 1) :]).to(device)
        normaliser = float(window_weight[global_batch].sum()) / context.world_size
        with autocast(device.type, precision):
            loss = objective(items, events, targets, scenarios, weights, normaliser)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if average is not None:
            average.update()
        losses.append(loss.detach())
    objective.eval()
    return float(torch.stack(losses).mean()) if losses else float("nan")


def training_item_counts(
    dataset: Dataset, split: LeaveOneOutSplit, include_validation: bool = False
) -> np.ndarray:
    """Interactions per item among the items training sees (the in-batch sampling law for logQ)."""
    counts = np.zeros(dataset.num_items, dtype=np.int64)
    for user, sequence in enumerate(dataset.sequences):
        length = split.train_length(user) + (1 if include_validation and len(sequence) >= 3 else 0)
        np.add.at(counts, sequence[:length], 1)
    return counts


def resolve_text(dataset: Dataset, config: RecallTrainConfig) -> str:
    """The model's text mode for this dataset: "off", "hash" or "sentence"."""
    if config.text not in TEXT_MODES:
        raise ValueError(f"text must be one of {TEXT_MODES}, not {config.text!r}")
    if config.unseen_items not in ("auto", "cold", "keep"):
        raise ValueError(f"unseen_items must be 'auto', 'cold' or 'keep', not {config.unseen_items!r}")
    titled = has_titles(dataset.catalog.title)
    if config.text == "off":
        if config.text_model:
            raise ValueError("text_model is set but text is 'off'")
        return "off"
    if not titled:
        if config.text == "hash" or config.text_model:
            raise ValueError(
                f"{dataset.name}: no item has a title (items.csv 'title' column); text needs one"
            )
        return "off"
    return "sentence" if config.text_model else "hash"


def item_text_arrays(
    dataset: Dataset, config: RecallTrainConfig, encoder: TitleEncoder | None = None
) -> dict[str, np.ndarray] | None:
    """The items' text inputs, computed once before training: hashed feature ids (CSR) or a
    sentence model's title vectors (``encoder`` stands in for the model at ``config.text_model``)."""
    mode = resolve_text(dataset, config)
    if mode == "off":
        return None
    titles = list(dataset.catalog.title or [])
    if mode == "hash":
        hashed = HashedTitles.build(titles, config.text_buckets)
        return {"token_ids": hashed.token_ids, "offsets": hashed.offsets}
    vectors, has_text = encode_titles(titles, encoder or sentence_model_encoder(config.text_model))
    return {"vectors": vectors, "has_text": has_text}


def masks_unseen_ids(config: RecallTrainConfig, text: str) -> bool:
    """Whether items without training interactions are treated as cold (``unseen_items``)."""
    if config.unseen_items == "auto":
        return text != "off"
    return config.unseen_items == "cold"


def model_shape(
    dataset: Dataset,
    config: RecallTrainConfig,
    max_attributes: int,
    text_arrays: dict[str, np.ndarray] | None = None,
) -> TwoTowerShape:
    text = "off" if text_arrays is None else ("hash" if "token_ids" in text_arrays else "sentence")
    return TwoTowerShape(
        num_items=dataset.num_items,
        num_attributes=len(dataset.catalog.attribute_names),
        max_attributes=max_attributes,
        num_scenarios=len(dataset.scenario_names),
        dim=config.dim,
        layers=config.layers,
        heads=config.heads,
        max_length=config.max_length,
        dropout=config.dropout,
        relative_positions=config.relative_positions,
        id_dropout=config.id_dropout,
        similarity=config.similarity,
        post_norm=config.post_norm,
        text=text,
        text_buckets=config.text_buckets if text == "hash" else 0,
        text_input_dim=int(text_arrays["vectors"].shape[1]) if text == "sentence" else 0,
        mask_unseen_ids=masks_unseen_ids(config, text),
    )


def model_attributes(dataset: Dataset, config: RecallTrainConfig) -> np.ndarray:
    if not config.use_attributes:
        return np.zeros((dataset.num_items + 1, 1), dtype=np.int64)
    return item_attribute_matrix(dataset)


def wrap_for_training(
    model: TwoTowerModel, loss_fn: SampledSoftmaxLoss, context: DistributedContext, newest_only: bool = False
) -> nn.Module:
    """The step module: DistributedDataParallel over the processes when there are several."""
    return data_parallel(RecallObjective(model, loss_fn, newest_only), context)


def build_for_training(
    shape: TwoTowerShape,
    attributes: np.ndarray,
    text_arrays: dict[str, np.ndarray] | None,
    item_counts: np.ndarray,
    config: RecallTrainConfig,
    rng: np.random.Generator,
    context: DistributedContext,
    precision: str,
) -> tuple[TwoTowerModel, Any, nn.Module]:
    """The model (the same initial weights in every process), its optimizer and the step module
    (the loss over the catalog, data-parallel when there are several processes)."""
    model = TwoTowerModel(shape, attributes, text_arrays, item_counts > 0).to(context.torch_device())
    torch.manual_seed(config.seed + context.rank)  # each process its own dropout masks
    optimizer = adamw(model.parameters(), config.learning_rate, config.weight_decay)
    loss_fn = SampledSoftmaxLoss(
        item_counts,
        config.uniform_negatives,
        rng,
        config.logq_correction,
        low_precision=precision == "bf16",
        seen_only=shape.mask_unseen_ids,
    )
    return model, optimizer, wrap_for_training(model, loss_fn, context, newest_only=config.per_prefix_targets)


def early_stopping_validator(
    dataset: Dataset,
    split: LeaveOneOutSplit,
    config: RecallTrainConfig,
    context: DistributedContext,
    rng: np.random.Generator,
) -> RecallValidator:
    """The validator training stops on: every validation user, or ``config.eval_users`` of them
    drawn with ``rng``; this process's share of them under torchrun."""
    eval_users = split.eval_users
    if config.eval_users and len(eval_users) > config.eval_users:
        eval_users = np.sort(rng.choice(eval_users, size=config.eval_users, replace=False))
    return RecallValidator(dataset, split, shard(eval_users, context), config.max_length)


@dataclass
class TrainingSetup:
    """What one two-tower training steps through: its windows, the model with its optimizer, step
    module and weight average, and the validator it stops on."""

    windows: TrainingWindows
    model: TwoTowerModel
    optimizer: Any
    objective: nn.Module
    average: WeightAverage | None
    validator: RecallValidator
    shape: TwoTowerShape
    attributes: np.ndarray
    text_arrays: dict[str, np.ndarray] | None


def prepare_training(
    dataset: Dataset,
    split: LeaveOneOutSplit,
    config: RecallTrainConfig,
    context: DistributedContext,
    precision: str,
    rng: np.random.Generator,
    text_encoder: TitleEncoder | None = None,
) -> TrainingSetup:
    """The windows, model, optimizer, step module, weight average and validator of ``config``."""
    windows = build_training_windows(
        dataset,
        split,
        config.max_length,
        recency_boost=config.recency_boost,
        recency_decay=config.recency_decay,
        per_prefix=config.per_prefix_targets,
    )
    item_counts = training_item_counts(dataset, split)
    attributes = model_attributes(dataset, config)
    text_arrays = item_text_arrays(dataset, config, text_encoder)
    shape = model_shape(dataset, config, attributes.shape[1], text_arrays)
    if text_arrays is not None:
        log.info("item text: %s (%s)", shape.text, config.text_model or f"{config.text_buckets} buckets")
    model, optimizer, objective = build_for_training(
        shape, attributes, text_arrays, item_counts, config, rng, context, precision
    )
    validator = early_stopping_validator(dataset, split, config, context, rng)
    average = WeightAverage(model, config.weight_average_decay) if config.weight_average_decay > 0 else None
    return TrainingSetup(
        windows, model, optimizer, objective, average, validator, shape, attributes, text_arrays
    )


# Member k of an ensemble trains from seed ``seed + ENSEMBLE_SEED_STRIDE * k``: runs with nearby
# seeds (1, 2, 3 for the README's spread) share no member.
ENSEMBLE_SEED_STRIDE = 1000
# What stopped an ensemble's training: the first of these that stopped any member.
STOP_REASONS_BY_WEIGHT = ("time_guard", "max_epochs", "early_stop")


def train_model(
    dataset: Dataset,
    config: RecallTrainConfig,
    context: DistributedContext | None = None,
    text_encoder: TitleEncoder | None = None,
) -> TrainResult:
    """Train the two towers; returns the best model on validation HR@10 (on the CPU).
    ``text_encoder`` replaces the sentence model of ``config.text_model`` (tests).

    With ``config.ensemble`` K > 1: K models, member k trained (and early-stopped) on its own from
    seed ``config.seed + ENSEMBLE_SEED_STRIDE * k``, returned as one :class:`TowerEnsemble`; the
    result's ``best_valid`` is the ensemble's, its ``run`` record sums the members' epochs, steps
    and seconds, takes the weightiest stop reason (time guard, then max epochs, then early
    stopping) and lists each member's own record under ``members``."""
    if config.ensemble <= 1:
        return train_single_model(dataset, config, context, text_encoder)
    context = context or init_distributed(config.device)
    results = []
    for member in range(config.ensemble):
        seed = config.seed + ENSEMBLE_SEED_STRIDE * member
        log.info("recall ensemble: member %d of %d (seed %d)", member + 1, config.ensemble, seed)
        member_config = replace(config, seed=seed, ensemble=1)
        results.append(train_single_model(dataset, member_config, context, text_encoder))
    model = TowerEnsemble([result.model for result in results]).eval()
    split = LeaveOneOutSplit(dataset)
    validator = early_stopping_validator(dataset, split, config, context, np.random.default_rng(config.seed))
    valid = gather_metrics(validator(model), context)
    runs = [result.run for result in results]
    stop_reason = next(
        reason for reason in STOP_REASONS_BY_WEIGHT if any(run["stop_reason"] == reason for run in runs)
    )
    record = {
        **runs[0],
        "stop_reason": stop_reason,
        "epochs_run": sum(run["epochs_run"] for run in runs),
        "best_epoch": max(run["best_epoch"] for run in runs),
        "train_seconds": round(sum(result.train_seconds for result in results), 1),
        "steps": sum(run.get("steps", 0) for run in runs),
        "reduced_thread_steps": sum(run.get("reduced_thread_steps", 0) for run in runs),
        "seed": config.seed,
        "ensemble": config.ensemble,
        "members": runs,
    }
    log.info(
        "recall ensemble of %d: valid HR@10 %.4f NDCG@10 %.4f HR@50 %.4f (members: %s)",
        config.ensemble,
        valid["HR@10"],
        valid["NDCG@10"],
        valid["HR@50"],
        ", ".join(f"{result.best_valid['HR@10']:.4f}" for result in results),
    )
    return TrainResult(
        model,
        record["epochs_run"],
        record["best_epoch"],
        valid,
        sum(result.train_seconds for result in results),
        [{"member": index, **entry} for index, result in enumerate(results) for entry in result.history],
        config.refit_with_validation,
        record,
    )


def train_single_model(
    dataset: Dataset,
    config: RecallTrainConfig,
    context: DistributedContext | None = None,
    text_encoder: TitleEncoder | None = None,
) -> TrainResult:
    """One two-tower model (:func:`train_model` without the ensemble)."""
    context = context or init_distributed(config.device)
    threads = configure_threads(config.threads)
    precision = resolve_precision(config.precision, context.device)
    run = TrainingRun(
        max_epochs=config.epochs,
        patience=config.patience,
        time_guard_s=config.time_guard_s,
        seed=config.seed,
        threads=threads,
        context=context,
        precision=precision,
    )
    log.info(
        "recall training: %d process(es), %d thread(s) each, device %s, %s; at most %d epochs, patience %d",
        context.world_size,
        threads,
        context.device,
        precision,
        config.epochs,
        config.patience,
    )
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    split = LeaveOneOutSplit(dataset)
    setup = prepare_training(dataset, split, config, context, precision, rng, text_encoder)
    model, windows, average = setup.model, setup.windows, setup.average

    best_state, best_valid = copy.deepcopy(model.state_dict()), {"HR@10": -1.0}
    history: list[dict[str, float]] = []
    for epoch in range(1, config.epochs + 1):
        mean_loss = train_one_epoch(
            setup.objective,
            setup.optimizer,
            windows,
            config.batch_size,
            rng,
            average,
            context,
            precision,
            run.governor,
        )
        with averaged_weights(model, average):  # validate (and keep) the averaged weights
            valid = gather_metrics(setup.validator(model), context)
            record = {"epoch": epoch, "loss": mean_loss, "seconds": round(run.elapsed(), 1), **valid}
            history.append(record)
            log.info(
                "epoch %d loss %.4f valid HR@10 %.4f NDCG@10 %.4f HR@50 %.4f (%.0f s)",
                epoch,
                mean_loss,
                valid["HR@10"],
                valid["NDCG@10"],
                valid["HR@50"],
                record["seconds"],
            )
            if run.update(epoch, valid["HR@10"]):
                best_state, best_valid = copy.deepcopy(model.state_dict()), valid
        if run.should_stop(epoch):
            break
    model.load_state_dict(best_state)
    model.eval()
    if config.refit_with_validation:
        model = _refit(
            dataset,
            split,
            config,
            setup.shape,
            setup.attributes,
            setup.text_arrays,
            run.best_epoch,
            context,
            precision,
            run.governor,
        )
    model = model.cpu()
    log.info(
        "trained %d epochs in %.0f s (%s); best epoch %d valid HR@10 %.4f",
        run.epochs_run,
        run.elapsed(),
        run.stop_reason,
        run.best_epoch,
        best_valid["HR@10"],
    )
    return TrainResult(
        model,
        run.epochs_run,
        run.best_epoch,
        best_valid,
        run.elapsed(),
        history,
        config.refit_with_validation,
        run.record(),
    )


def _refit(
    dataset: Dataset,
    split: LeaveOneOutSplit,
    config: RecallTrainConfig,
    shape: TwoTowerShape,
    attributes: np.ndarray,
    text_arrays: dict[str, np.ndarray] | None,
    epochs: int,
    context: DistributedContext,
    precision: str,
    governor: ThreadGovernor | None = None,
) -> TwoTowerModel:
    """Retrain from the same seed for ``epochs`` on training + validation items (not test); with
    ``config.weight_average_decay`` the averaged weights are returned, as they were the ones
    validated when ``epochs`` was chosen."""
    log.info("refit: %d epochs on training + validation items", epochs)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    windows = build_training_windows(
        dataset,
        split,
        config.max_length,
        include_validation=True,
        recency_boost=config.recency_boost,
        recency_decay=config.recency_decay,
        per_prefix=config.per_prefix_targets,
    )
    counts = training_item_counts(dataset, split, include_validation=True)
    model, optimizer, objective = build_for_training(
        shape, attributes, text_arrays, counts, config, rng, context, precision
    )
    average = WeightAverage(model, config.weight_average_decay) if config.weight_average_decay > 0 else None
    for epoch in range(1, epochs + 1):
        loss = train_one_epoch(
            objective, optimizer, windows, config.batch_size, rng, average, context, precision, governor
        )
        log.info("refit epoch %d/%d loss %.4f", epoch, epochs, loss)
    if average is not None:
        model.load_state_dict(average.state_dict(model))
    return model.eval()


def save_checkpoint(result: TrainResult, config: RecallTrainConfig, path: Path) -> None:
    """Training-side checkpoint (state dict + shape + config); serving never reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    members = tower_members(result.model)
    torch.save(
        {
            "state_dict": members[0].state_dict(),
            # an ensemble's other members (the same shape: only their seeds differ)
            "member_state_dicts": [member.state_dict() for member in members[1:]],
            "shape": asdict(result.model.shape),
            "config": asdict(config),
            "train": _train_info(result, config),
        },
        path,
    )


def load_checkpoint(path: Path) -> tuple[TwoTowerModel | TowerEnsemble, RecallTrainConfig, dict]:
    """Rebuild the model (or ensemble) saved by :func:`save_checkpoint`."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    shape = TwoTowerShape(**checkpoint["shape"])
    model: TwoTowerModel | TowerEnsemble = TwoTowerModel.from_state_dict(shape, checkpoint["state_dict"])
    others = checkpoint.get("member_state_dicts") or []
    if others:
        model = TowerEnsemble([model, *(TwoTowerModel.from_state_dict(shape, state) for state in others)])
    model.eval()
    # Fields this version no longer has (e.g. the old minutes-scale time_limit_s) are dropped.
    known = set(RecallTrainConfig.__dataclass_fields__)
    config = RecallTrainConfig(**{k: v for k, v in checkpoint["config"].items() if k in known})
    return model, config, checkpoint["train"]


def build_bundle(
    dataset: Dataset, bundle_dir: Path, config: RecallTrainConfig, context: DistributedContext | None = None
) -> Path:
    """Train and export a recall bundle into ``bundle_dir``; returns ``bundle_dir``.

    Under torchrun every process trains and the first exports; all return once the bundle is
    written (so that each may read it: with several hosts, ``bundle_dir`` must be on storage
    they all see)."""
    from recall_service.export import export_bundle

    context = context or init_distributed(config.device)
    result = train_model(dataset, config, context)
    bundle_dir = Path(bundle_dir)
    if context.is_main:
        export_bundle(result.model, dataset, bundle_dir, config, train_info=_train_info(result, config))
    barrier(context)
    return bundle_dir


def _train_info(result: TrainResult, config: RecallTrainConfig) -> dict:
    """The manifest's ``train`` block: what stopped training, epochs, seconds, threads, seed, ..."""
    return {
        "per_prefix_targets": config.per_prefix_targets,
        **result.run,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "best_valid": result.best_valid,
        "train_seconds": round(result.train_seconds, 1),
        "refit_with_validation": result.refit_with_validation,
    }


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    """``--text`` and ``--text-model`` (shared with ``recall_service.text_eval``)."""
    parser.add_argument(
        "--text",
        choices=TEXT_MODES,
        help="item titles in the item tower: auto (when the catalog has titles), hash, off",
    )
    parser.add_argument(
        "--text-model",
        metavar="PATH",
        help="a local sentence-transformers model folder to embed titles with (no downloads)",
    )


def apply_text_arguments(args: argparse.Namespace, config: RecallTrainConfig) -> None:
    if args.text is not None:
        config.text = args.text
    if args.text_model is not None:
        config.text_model = args.text_model


def main(argv: list[str] | None = None) -> int:
    """`recsys train recall --data synthetic|DIR --artifacts DIR [--quick] [--seed N] ...`; run it
    under `torchrun --nproc_per_node N [--nnodes M ...] -m recsys train recall ...` for several
    processes (DistributedDataParallel)."""
    from recall_service.export import export_bundle
    from recsys.data.prepare import dataset_artifacts, prepare_dataset

    parser = argparse.ArgumentParser(prog="recsys train recall", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic", help="'synthetic' or a dataset folder")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--quick", action="store_true", help="small model, few epochs (make run)")
    parser.add_argument(
        "--epochs", type=int, help="most epochs (early stopping normally ends training first)"
    )
    parser.add_argument("--patience", type=int, help="epochs without a validation gain before stopping")
    parser.add_argument("--seed", type=int, help="random seed (recorded in the bundle)")
    parser.add_argument(
        "--ensemble",
        type=int,
        help="two-tower models trained from seeds seed, seed + 1000, ..., served as one",
    )
    parser.add_argument("--threads", type=int, help="torch threads per process (0 = every core)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="training device")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), help="training precision")
    parser.add_argument(
        "--per-prefix-targets",
        action=argparse.BooleanOptionalAction,
        help="one training example per prefix, its newest position the target (the default; "
        "--no-per-prefix-targets: every window once, all its positions targets, best at --batch-size 64)",
    )
    parser.add_argument("--batch-size", type=int, help="training windows per optimizer step")
    parser.add_argument("--learning-rate", type=float, help="AdamW learning rate")
    parser.add_argument("--time-guard-hours", type=float, help="wall-clock guard (hours)")
    parser.add_argument("--index-factory", help="Faiss index_factory string ('' = by catalog size)")
    add_text_arguments(parser)
    parser.add_argument(
        "--refit-with-validation",
        action="store_true",
        help="after early stopping, retrain on training + validation items (never test items)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config = RecallTrainConfig.quick() if args.quick else RecallTrainConfig.default()
    for name in (
        "epochs",
        "patience",
        "seed",
        "ensemble",
        "threads",
        "device",
        "precision",
        "index_factory",
        "per_prefix_targets",
        "batch_size",
        "learning_rate",
    ):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    if args.time_guard_hours is not None:
        config.time_guard_s = args.time_guard_hours * 3600.0
    config.refit_with_validation = args.refit_with_validation
    apply_text_arguments(args, config)
    context = init_distributed(config.device)
    if not context.is_main:  # one log of the run, from the first process
        logging.getLogger().setLevel(logging.WARNING)
    dataset = main_first(context, lambda: prepare_dataset(args.data, args.artifacts, args.quick))
    result = train_model(dataset, config, context)
    if context.is_main:
        artifacts = dataset_artifacts(dataset, args.artifacts)
        save_checkpoint(result, config, artifacts / "checkpoints" / "recall.pt")
        bundle_dir = export_bundle(
            result.model, dataset, artifacts / "recall", config, train_info=_train_info(result, config)
        )
        print(
            f"recall bundle: {bundle_dir} (trained {result.train_seconds:.0f} s, {result.epochs_run} epochs, "
            f"stopped by {result.run['stop_reason']}, best epoch {result.best_epoch}, "
            f"valid HR@10 {result.best_valid['HR@10']:.4f}, {result.run['processes']} process(es) x "
            f"{result.run['threads']} thread(s), seed {config.seed})"
        )
    barrier(context)
    return 0
