"""`recsys train recall`: train the two-tower model on every prefix of every training sequence, then
export the recall bundle (ONNX user tower, item vectors, Faiss index, co-visitation and popularity
tables, id maps, manifest).

Loss: sampled softmax over the batch's own targets (in-batch negatives) plus uniformly sampled
extra negatives, each logit corrected by the log of its sampling probability (logQ). Training
never sees a user's validation or test item (``LeaveOneOutSplit.train_sequence``); early stopping
on validation HR@10 under the full-ranking protocol.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from recall_service.model import TwoTowerModel, TwoTowerShape
from recsys.data.dataset import Dataset, EventType
from recsys.data.split import LeaveOneOutSplit
from recsys.evaluation.protocol import evaluate_scorer

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
    # training
    epochs: int = 60
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    uniform_negatives: int = 2048  # >= the catalog size: every item is a negative (full softmax)
    logq_correction: bool = True
    # Loss weight 1 + boost * decay ** age for a user's training targets (age 0 = newest): the
    # latest behaviour is the closest to what the user will do next. 0 = uniform weights.
    recency_boost: float = 0.0
    recency_decay: float = 0.5
    # Evaluate and keep an exponential moving average of the weights (0 = the live weights).
    weight_average_decay: float = 0.0
    patience: int = 4
    eval_users: int = 0  # validation users for early stopping (0 = all)
    time_limit_s: float = 14 * 60.0
    # After early stopping picks the epoch count, retrain from scratch for that many epochs on the
    # training AND validation items (never test items). Off by default: the recall issue forbids
    # training on validation items; on Beauty it lifts test u2i HR@10 from 0.074 to 0.090.
    refit_with_validation: bool = False
    seed: int = 7
    threads: int = 1  # torch threads (<= 2); one is ~4x more CPU-efficient on a shared 2-core host
    # export
    index_factory: str = ""  # "" = chosen by catalog size (Flat, or IVF for large catalogs)
    nprobe: int = 32
    ef_search: int = 128
    # co-visitation: tuned on Beauty (window 5, backward 0.3, decay 0.6: test HR@10 0.093, HR@500 0.336)
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
            time_limit_s=60.0,
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
            time_limit_s=60.0,
        )

    @classmethod
    def default(cls) -> RecallTrainConfig:
        """Beauty-sized data: the SASRec recipe (post-LN, raw inner product, dropout 0.5, exact
        softmax over every item of a catalog up to 20k) with batch 64 for more optimizer steps, plus
        this project's relative-position attention bias, validated (and kept) on an exponential
        moving average of the weights. Measured on Beauty (docs/EXPERIMENTS.md, one thread): best
        epoch 12, early stop at 16 after 758 s, valid HR@10 0.1071, test u2i HR@10 0.0817 /
        NDCG@10 0.0487 / HR@500 0.4002 (the pre-LN cosine two-tower with 2,048 sampled negatives:
        valid 0.0956, test 0.0744 / 0.0418 / 0.3956)."""
        return cls(
            similarity="dot",
            post_norm=True,
            dropout=0.5,
            uniform_negatives=20_000,
            batch_size=64,
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
) -> TrainingWindows:
    """Cut every training sequence into windows of at most ``max_length + 1`` targets.

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
        for end in range(length, 0, -max_length):
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
            if start > 0:
                target_row[-(inputs + 1)] = 0  # this window has history the start token cannot see
            rows_items.append(item_row)
            rows_events.append(event_row)
            rows_targets.append(target_row)
            rows_scenarios.append(scenario_row)
            lengths.append(inputs)
            if start == 0:
                break
    return TrainingWindows(
        items=np.stack(rows_items),
        events=np.stack(rows_events),
        targets=np.stack(rows_targets),
        scenarios=np.stack(rows_scenarios),
        lengths=np.asarray(lengths, dtype=np.int64),
        weights=np.stack(rows_weights) if recency_boost > 0 else None,
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
    (full) softmax, which needs no correction.
    """

    def __init__(
        self,
        item_counts: np.ndarray,
        uniform_negatives: int,
        rng: np.random.Generator,
        logq_correction: bool = True,
    ):
        counts = item_counts.astype(np.float64) + 1.0
        self.popularity = counts / counts.sum()
        self.num_items = len(item_counts)
        self.uniform_negatives = uniform_negatives
        self.full_softmax = uniform_negatives >= self.num_items
        self.logq_correction = logq_correction and not self.full_softmax
        self.rng = rng

    def __call__(
        self,
        model: TwoTowerModel,
        users: torch.Tensor,
        positives: torch.Tensor,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``users`` [P, D] normalised; ``positives`` [P] item ids (+1); ``weights`` [P] or None."""
        if self.full_softmax:
            logits = model.item_logits(users, torch.arange(1, self.num_items + 1))
            return weighted_mean(F.cross_entropy(logits, positives - 1, reduction="none"), weights)
        in_batch = torch.unique(positives)
        extra = self.rng.integers(1, self.num_items + 1, size=self.uniform_negatives)
        extra = np.setdiff1d(extra, in_batch.numpy())
        candidates = torch.cat([in_batch, torch.as_tensor(extra, dtype=torch.long)])
        logits = model.item_logits(users, candidates)
        if self.logq_correction:
            # Probability that each candidate was drawn: expected in-batch occurrences + uniform draws.
            popularity = torch.as_tensor(self.popularity, dtype=torch.float32)[candidates - 1]
            sample_probability = len(positives) * popularity + self.uniform_negatives / self.num_items
            logits = logits - torch.log(sample_probability)
        labels = torch.searchsorted(in_batch, positives)
        return weighted_mean(F.cross_entropy(logits, labels, reduction="none"), weights)


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return losses.mean() if weights is None else (losses * weights).sum() / weights.sum()


@dataclass
class TrainResult:
    model: TwoTowerModel
    epochs_run: int
    best_epoch: int
    best_valid: dict[str, float]
    train_seconds: float
    history: list[dict[str, float]]
    refit_with_validation: bool = False


class UserVectorScorer:
    """Full-catalog scores (user vector . item vector) with the torch model, for early stopping."""

    def __init__(self, model: TwoTowerModel, dataset: Dataset, split: LeaveOneOutSplit, max_length: int):
        self.model = model
        self.dataset = dataset
        self.split = split
        self.max_length = max_length

    @torch.no_grad()
    def __call__(self, users: np.ndarray, phase: str) -> np.ndarray:
        rows = []
        scenario_rows = []
        for user in users:
            history = self.split.history(int(user), phase)  # type: ignore[arg-type]
            events = self.dataset.events_of(int(user))[: len(history)]
            rows.append(padded_history(history, events, self.max_length))
            position = len(history)
            scenario_rows.append(
                0 if self.dataset.scenarios is None else self.dataset.scenarios[user][position]
            )
        items = torch.as_tensor(np.stack([r[0] for r in rows]))
        events = torch.as_tensor(np.stack([r[1] for r in rows]))
        scenarios = torch.as_tensor(np.asarray(scenario_rows, dtype=np.int64))
        user_vectors = self.model(items, events, scenarios)
        return self.model.item_logits(user_vectors, torch.arange(1, self.model.shape.num_items + 1)).numpy()


def train_one_epoch(
    model: TwoTowerModel,
    optimizer: torch.optim.Optimizer,
    loss_fn: SampledSoftmaxLoss,
    windows: TrainingWindows,
    batch_size: int,
    rng: np.random.Generator,
    average: WeightAverage | None = None,
) -> float:
    """One pass over the windows in length-bucketed batches; returns the mean loss."""
    model.train()
    losses = []
    for batch in length_bucketed_batches(windows.lengths, batch_size, rng):
        width = max(int(windows.lengths[batch].max()), 1)
        items = torch.as_tensor(windows.items[batch, -width:])
        events = torch.as_tensor(windows.events[batch, -width:])
        targets = torch.as_tensor(windows.targets[batch, -(width + 1) :])
        scenarios = torch.as_tensor(windows.scenarios[batch, -(width + 1) :])
        hidden = model.encode(items, events)
        present = targets > 0
        users = model.user_head(hidden[present], scenarios[present])
        weights = None
        if windows.weights is not None:
            weights = torch.as_tensor(windows.weights[batch, -(width + 1) :])[present]
        loss = loss_fn(model, users, targets[present], weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if average is not None:
            average.update()
        losses.append(loss.item())
    model.eval()
    return float(np.mean(losses))


class WeightAverage:
    """Exponential moving average of a model's floating-point parameters and buffers."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        live = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        self.shadow = {k: v.detach().clone() for k, v in live.items()}
        # The optimizer and load_state_dict update these tensors in place: keep them, so that each
        # step is one fused lerp instead of rebuilding the state dict.
        self._live = list(live.values())
        self._averaged = list(self.shadow.values())

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average towards the model's current weights."""
        torch._foreach_lerp_(self._averaged, self._live, 1.0 - self.decay)

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s state with the averaged weights in place of the live ones."""
        return {k: self.shadow.get(k, v).clone() for k, v in model.state_dict().items()}


def training_item_counts(
    dataset: Dataset, split: LeaveOneOutSplit, include_validation: bool = False
) -> np.ndarray:
    """Interactions per item among the items training sees (the in-batch sampling law for logQ)."""
    counts = np.zeros(dataset.num_items, dtype=np.int64)
    for user, sequence in enumerate(dataset.sequences):
        length = split.train_length(user) + (1 if include_validation and len(sequence) >= 3 else 0)
        np.add.at(counts, sequence[:length], 1)
    return counts


def train_model(dataset: Dataset, config: RecallTrainConfig) -> TrainResult:
    """Train the two towers; returns the best model on validation HR@10."""
    torch.manual_seed(config.seed)
    torch.set_num_threads(max(1, min(config.threads, 2)))
    rng = np.random.default_rng(config.seed)
    split = LeaveOneOutSplit(dataset)
    windows = build_training_windows(
        dataset,
        split,
        config.max_length,
        recency_boost=config.recency_boost,
        recency_decay=config.recency_decay,
    )
    item_counts = training_item_counts(dataset, split)
    shape = TwoTowerShape(
        num_items=dataset.num_items,
        num_attributes=len(dataset.catalog.attribute_names),
        max_attributes=0,
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
    )
    attributes = item_attribute_matrix(dataset)
    if not config.use_attributes:
        attributes = np.zeros((dataset.num_items + 1, 1), dtype=np.int64)
    shape.max_attributes = attributes.shape[1]
    model = TwoTowerModel(shape, attributes)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    loss_fn = SampledSoftmaxLoss(item_counts, config.uniform_negatives, rng, config.logq_correction)
    eval_users = split.eval_users
    if config.eval_users and len(eval_users) > config.eval_users:
        eval_users = np.sort(rng.choice(eval_users, size=config.eval_users, replace=False))
    scorer = UserVectorScorer(model, dataset, split, config.max_length)

    best_state, best_valid, best_epoch = copy.deepcopy(model.state_dict()), {"HR@10": -1.0}, 0
    history: list[dict[str, float]] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    epoch = 0
    average = WeightAverage(model, config.weight_average_decay) if config.weight_average_decay > 0 else None
    for epoch in range(1, config.epochs + 1):
        mean_loss = train_one_epoch(model, optimizer, loss_fn, windows, config.batch_size, rng, average)
        live_state = None
        if average is not None:  # validate (and keep) the averaged weights
            live_state = copy.deepcopy(model.state_dict())
            model.load_state_dict(average.state_dict(model))
        valid = evaluate_scorer(scorer, split, "valid", ks=(10, 50), users=eval_users, batch_size=1024)
        elapsed = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
        record = {
            "epoch": epoch,
            "loss": mean_loss,
            "seconds": round(elapsed, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            **valid,
        }
        history.append(record)
        log.info(
            "epoch %d loss %.4f valid HR@10 %.4f NDCG@10 %.4f HR@50 %.4f scale %.1f (%.0f s, cpu %.0f s)",
            epoch,
            record["loss"],
            valid["HR@10"],
            valid["NDCG@10"],
            valid["HR@50"],
            model.scale().item(),
            elapsed,
            cpu_seconds,
        )
        if valid["HR@10"] > best_valid["HR@10"]:
            best_state, best_valid, best_epoch = copy.deepcopy(model.state_dict()), valid, epoch
        if live_state is not None:
            model.load_state_dict(live_state)
        if epoch - best_epoch >= config.patience:
            log.info("early stop: no validation gain for %d epochs", config.patience)
            break
        if elapsed > config.time_limit_s:
            log.info("time limit %.0f s reached", config.time_limit_s)
            break
    model.load_state_dict(best_state)
    model.eval()
    if config.refit_with_validation:
        model = _refit(dataset, split, config, shape, attributes, best_epoch)
    seconds = time.perf_counter() - started
    log.info(
        "trained %d epochs in %.0f s; best epoch %d valid HR@10 %.4f",
        epoch,
        seconds,
        best_epoch,
        best_valid["HR@10"],
    )
    return TrainResult(model, epoch, best_epoch, best_valid, seconds, history, config.refit_with_validation)


def _refit(
    dataset: Dataset,
    split: LeaveOneOutSplit,
    config: RecallTrainConfig,
    shape: TwoTowerShape,
    attributes: np.ndarray,
    epochs: int,
) -> TwoTowerModel:
    """Retrain from the same seed for ``epochs`` on training + validation items (not test)."""
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
    )
    model = TwoTowerModel(shape, attributes)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    counts = training_item_counts(dataset, split, include_validation=True)
    loss_fn = SampledSoftmaxLoss(counts, config.uniform_negatives, rng, config.logq_correction)
    for epoch in range(1, epochs + 1):
        loss = train_one_epoch(model, optimizer, loss_fn, windows, config.batch_size, rng)
        log.info("refit epoch %d/%d loss %.4f", epoch, epochs, loss)
    return model


def save_checkpoint(result: TrainResult, config: RecallTrainConfig, path: Path) -> None:
    """Training-side checkpoint (state dict + shape + config); serving never reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": result.model.state_dict(),
            "shape": asdict(result.model.shape),
            "config": asdict(config),
            "train": _train_info(result),
        },
        path,
    )


def load_checkpoint(path: Path) -> tuple[TwoTowerModel, RecallTrainConfig, dict]:
    """Rebuild the model saved by :func:`save_checkpoint`."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    shape = TwoTowerShape(**checkpoint["shape"])
    attributes = checkpoint["state_dict"]["item_attributes"].numpy()
    model = TwoTowerModel(shape, attributes)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    return model, RecallTrainConfig(**checkpoint["config"]), checkpoint["train"]


def build_bundle(dataset: Dataset, bundle_dir: Path, config: RecallTrainConfig) -> Path:
    """Train and export a recall bundle into ``bundle_dir``; returns ``bundle_dir``."""
    from recall_service.export import export_bundle

    result = train_model(dataset, config)
    bundle_dir = Path(bundle_dir)
    export_bundle(result.model, dataset, bundle_dir, config, train_info=_train_info(result))
    return bundle_dir


def _train_info(result: TrainResult) -> dict:
    return {
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "best_valid": result.best_valid,
        "train_seconds": round(result.train_seconds, 1),
        "refit_with_validation": result.refit_with_validation,
    }


def quiet_exporter_logs() -> None:
    """The ONNX exporter logs every graph pass at INFO; keep the CLI output readable."""
    for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """`recsys train recall --data synthetic|DIR --artifacts DIR [--quick] [--epochs N]`."""
    from recall_service.export import export_bundle
    from recsys.data.prepare import dataset_artifacts, prepare_dataset

    parser = argparse.ArgumentParser(prog="recsys train recall", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic", help="'synthetic' or a dataset folder")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--quick", action="store_true", help="small model, few epochs (make run)")
    parser.add_argument("--epochs", type=int, help="override the number of epochs")
    parser.add_argument("--threads", type=int, help="torch threads (at most 2)")
    parser.add_argument("--index-factory", help="Faiss index_factory string ('' = by catalog size)")
    parser.add_argument(
        "--refit-with-validation",
        action="store_true",
        help="after early stopping, retrain on training + validation items (never test items)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_exporter_logs()

    config = RecallTrainConfig.quick() if args.quick else RecallTrainConfig.default()
    if args.epochs is not None:
        config.epochs = args.epochs
    if args.threads is not None:
        config.threads = args.threads
    if args.index_factory is not None:
        config.index_factory = args.index_factory
    config.refit_with_validation = args.refit_with_validation
    dataset = prepare_dataset(args.data, args.artifacts, args.quick)
    result = train_model(dataset, config)
    artifacts = dataset_artifacts(dataset, args.artifacts)
    save_checkpoint(result, config, artifacts / "checkpoints" / "recall.pt")
    bundle_dir = export_bundle(
        result.model, dataset, artifacts / "recall", config, train_info=_train_info(result)
    )
    print(
        f"recall bundle: {bundle_dir} (trained {result.train_seconds:.0f} s, {result.epochs_run} epochs, "
        f"valid HR@10 {result.best_valid['HR@10']:.4f})"
    )
    return 0
