"""Recall and rank training as DistributedDataParallel: `torchrun --nproc_per_node 2` on the CPU
(gloo) against one process, on a small synthetic log.

Two checks per trainer, from ONE torchrun launch (this file is also the workers' script):

- exact: one epoch with no dropout and fp32 (and the recall's exact softmax, whose candidates do
  not depend on how a batch is split) must give the one-process model: each process takes half
  of every global batch and DDP averages the gradients, so only float summation order differs.
  Compared on outputs (user and item vectors, candidate scores), not weights: Adam turns the
  rounding noise of a gradient that is zero in exact arithmetic (attention key biases, the
  ranker's output bias: softmax ignores them) into visible weight changes that change no output.
- quality: the default tiny recipe (dropout, sampled negatives) trained to its end on 2
  processes must validate as well as on 1 within noise. A validation metric is a mean over N
  users of a per-user value in [0, 1] (variance at most p(1 - p)), so two models of equal quality
  differ by sd <= sqrt(2 p (1 - p) / N); the bar is three of those.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Enough users for a validation mean with a useful noise bar; trains in seconds.
DATA_USERS, DATA_ITEMS = 1200, 240


def recall_configs():
    from recall_service.train import RecallTrainConfig

    quality = dataclasses.replace(RecallTrainConfig.tiny(), threads=1, device="cpu", precision="fp32")
    exact = dataclasses.replace(quality, epochs=1, dropout=0.0, uniform_negatives=DATA_ITEMS + 1)
    return exact, quality


def rank_configs():
    from rank_service.train import RankTrainConfig

    quality = dataclasses.replace(
        RankTrainConfig.tiny(), threads=1, eval_users=0, device="cpu", precision="fp32"
    )
    exact = dataclasses.replace(quality, epochs=1, dropout=0.0)
    return exact, quality


def stub_candidates(dataset):
    """The rank tests' deterministic candidate source (tests/rank/rank_stubs.py): no recall bundle."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rank_stubs", ROOT / "tests" / "rank" / "rank_stubs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.StubCandidates(dataset)


def run_all(data_dir: Path) -> dict:
    """Train every configuration (in this process, or in each torchrun process); the weights of
    the exact runs and the validation of the quality runs."""
    from rank_service.train import train_model as train_rank
    from recall_service.train import train_model as train_recall
    from recsys.data.loaders import load_dataset

    dataset = load_dataset(data_dir)
    results: dict = {}
    recall_exact, recall_quality = recall_configs()
    rank_exact, rank_quality = rank_configs()
    results["recall_exact"] = train_recall(dataset, recall_exact).model
    result = train_recall(dataset, recall_quality)
    results["recall_quality"] = {**result.best_valid, **result.run}
    source = stub_candidates(dataset)
    results["rank_exact"] = train_rank(dataset, source, rank_exact).model
    result = train_rank(dataset, source, rank_quality)
    results["rank_quality"] = {**result.best_valid, **result.run}
    return results


def save(results: dict, out: Path) -> None:
    weights = {
        f"{name}/{key}": value.numpy()
        for name in ("recall_exact", "rank_exact")
        for key, value in results[name].state_dict().items()
    }
    np.savez(out / "weights.npz", **weights)
    quality = {name: results[name] for name in ("recall_quality", "rank_quality")}
    (out / "quality.json").write_text(json.dumps(quality))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recsys.data.synthetic import SyntheticConfig, generate

    config = dataclasses.replace(SyntheticConfig.tiny(), num_users=DATA_USERS, num_items=DATA_ITEMS)
    return generate(tmp_path_factory.mktemp("ddp-data"), config)


@pytest.fixture(scope="module")
def two_processes(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same trainings under `torchrun --standalone --nproc_per_node 2` (gloo on the CPU)."""
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("ddp-out")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CUDA_VISIBLE_DEVICES": "",  # gloo on the CPU even on a GPU host
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        str(data_dir),
        str(out),
    ]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def one_process(data_dir: Path, monkeypatch_module) -> dict:
    pytest.importorskip("torch")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch_module.delenv(name, raising=False)
    monkeypatch_module.setenv("CUDA_VISIBLE_DEVICES", "")
    return run_all(data_dir)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def loaded(model, weights: np.lib.npyio.NpzFile, prefix: str):
    """A copy of ``model`` with the two-process weights."""
    import copy

    import torch

    other = copy.deepcopy(model)
    state = {key: torch.from_numpy(weights[f"{prefix}/{key}"]) for key in model.state_dict()}
    other.load_state_dict(state)
    return other.eval()


def recall_outputs(model, dataset) -> list[np.ndarray]:
    """Item vectors and the user vectors of 256 validation users."""
    import torch

    from recall_service.train import RecallValidator
    from recsys.data.split import LeaveOneOutSplit

    split = LeaveOneOutSplit(dataset)
    validator = RecallValidator(dataset, split, split.eval_users[:256], model.shape.max_length)
    with torch.no_grad():
        users = model(validator.items, validator.events, validator.scenarios)
        return [model.all_item_vectors().numpy(), users.numpy()]


def rank_outputs(model, dataset) -> list[np.ndarray]:
    """Scores of 128 validation users' candidate lists, each less its mean: the listwise softmax
    is blind to a list-wide shift, so the output bias is one of those zero-gradient weights."""
    from rank_service.train import TorchScorer, eval_lists, event_scenario
    from recsys.data.split import LeaveOneOutSplit

    split = LeaveOneOutSplit(dataset)
    users = split.eval_users[:128]
    lists = eval_lists(dataset, split, stub_candidates(dataset), "valid", users, 50)
    histories = [split.history(int(u), "valid") for u in users]
    events = [dataset.events_of(int(u))[: len(h)] for u, h in zip(users, histories, strict=True)]
    scenarios = [event_scenario(dataset, int(u), len(h)) for u, h in zip(users, histories, strict=True)]
    return [
        scores - scores.mean() for scores in TorchScorer(model).score(histories, events, scenarios, lists)
    ]


@pytest.mark.parametrize("trainer", ["recall", "rank"])
def test_two_processes_train_the_one_process_model(
    trainer: str, one_process: dict, two_processes: Path, data_dir: Path
):
    from recsys.data.loaders import load_dataset

    dataset = load_dataset(data_dir)
    model = one_process[f"{trainer}_exact"].eval()
    other = loaded(model, np.load(two_processes / "weights.npz"), f"{trainer}_exact")
    outputs = recall_outputs if trainer == "recall" else rank_outputs
    for expected, actual in zip(outputs(model, dataset), outputs(other, dataset), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("trainer", "metric"), [("recall", "HR@10"), ("rank", "NDCG@10")])
def test_two_processes_validate_as_well_as_one(
    trainer: str, metric: str, one_process: dict, two_processes: Path
):
    two = json.loads((two_processes / "quality.json").read_text())[f"{trainer}_quality"]
    one = one_process[f"{trainer}_quality"]
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["users"] == one["users"]  # every validation user, split across the processes
    assert two["stop_reason"] in ("early_stop", "max_epochs")
    p = (one[metric] + two[metric]) / 2
    bar = 3 * math.sqrt(2 * p * (1 - p) / one["users"])
    assert abs(two[metric] - one[metric]) <= bar, (one[metric], two[metric], bar)
    assert one[metric] > 0.05  # the models learned something: the comparison is not of noise


if __name__ == "__main__":  # a torchrun worker: train, and let the first process write the results
    from recsys.training import init_distributed

    context = init_distributed("cpu")
    outcome = run_all(Path(sys.argv[1]))
    if context.is_main:
        save(outcome, Path(sys.argv[2]))
