"""The recall trainer's softmax cross-entropy in one reused buffer (recall_service.softmax_loss):
the same loss and gradients as autograd's cross-entropy over the product, its buffer reused, and
the trainer's loss the same through it as through autograd (full and sampled softmax, dot and
cosine towers)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from recall_service.softmax_loss import LogitsBuffer, softmax_cross_entropy  # noqa: E402


def reference_loss(users, vectors, labels, weights, normaliser, bias, masked, low_precision):
    """autograd: product, cross-entropy, the trainer's weighted sum."""
    if low_precision:
        logits = (users.to(torch.bfloat16) @ vectors.to(torch.bfloat16).T).float()
    else:
        logits = users @ vectors.T
    if bias is not None:
        logits = logits + bias
    if masked is not None:
        logits = logits.masked_fill(masked, float("-inf"))
    each = F.cross_entropy(logits, labels, reduction="none")
    total = each.sum() if weights is None else (each * weights).sum()
    if normaliser is not None:
        return total / normaliser
    return total / (len(labels) if weights is None else weights.sum())


def inputs(rows: int, columns: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    users = torch.randn(rows, 16, generator=generator, requires_grad=True)
    vectors = (torch.randn(columns, 16, generator=generator) * 0.5).requires_grad_()
    labels = torch.randint(0, columns, (rows,), generator=generator)
    weights = torch.rand(rows, generator=generator)
    bias = torch.randn(columns, generator=generator)
    masked = torch.rand(columns, generator=generator) < 0.2
    masked[labels] = False
    return users, vectors, labels, weights, bias, masked


@pytest.mark.parametrize("low_precision", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("weighted", "normaliser", "biased", "masking"),
    [
        (False, None, False, False),
        (True, None, True, False),
        (True, 3.0, False, True),
        (False, 2.0, True, True),
    ],
    ids=["mean", "weighted-mean+bias", "weighted-sum+mask", "sum+bias+mask"],
)
def test_loss_and_gradients_are_those_of_cross_entropy_over_the_product(
    low_precision: bool, weighted: bool, normaliser: float | None, biased: bool, masking: bool
) -> None:
    # 300 rows over 2,000 columns: several row chunks of the softmax
    users, vectors, labels, weights, bias, masked = inputs(300, 2_000)
    weights = weights if weighted else None
    bias = bias if biased else None
    masked = masked if masking else None
    loss = softmax_cross_entropy(
        users, vectors, labels, LogitsBuffer(), weights, normaliser, bias, masked, low_precision
    )
    got = torch.autograd.grad(loss, (users, vectors))
    exact = reference_loss(users, vectors, labels, weights, normaliser, bias, masked, False)
    want = torch.autograd.grad(exact, (users, vectors))
    if not low_precision:
        torch.testing.assert_close(loss, exact, rtol=1e-5, atol=1e-5)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        return
    # bf16 products: the loss as exact as the rounded logits allow, and the gradients no further
    # from the fp32 ones than autograd's own bf16 path
    rounded = reference_loss(users, vectors, labels, weights, normaliser, bias, masked, True)
    torch.testing.assert_close(loss, rounded, rtol=1e-5, atol=1e-5)
    autograd_bf16 = torch.autograd.grad(rounded, (users, vectors))
    for a, auto, b in zip(got, autograd_bf16, want, strict=True):
        assert float((a - b).norm() / b.norm()) <= 1.5 * float((auto - b).norm() / b.norm()) + 1e-4


def test_the_buffer_is_reused_for_smaller_steps_and_grown_for_larger_ones() -> None:
    buffer = LogitsBuffer()
    users, vectors, labels, *_ = inputs(200, 500)
    softmax_cross_entropy(users, vectors, labels, buffer).backward()
    first = buffer.take(1, 1, torch.float32, torch.device("cpu")).data_ptr()
    size = buffer.bytes
    small_users, _, small_labels, *_ = inputs(50, 500, seed=1)
    softmax_cross_entropy(small_users, vectors, small_labels, buffer).backward()
    assert buffer.take(1, 1, torch.float32, torch.device("cpu")).data_ptr() == first
    assert buffer.bytes == size
    big_users, _, big_labels, *_ = inputs(400, 500, seed=2)
    softmax_cross_entropy(big_users, vectors, big_labels, buffer).backward()
    assert buffer.bytes >= 400 * 500 * 4


def test_a_backward_after_its_buffer_served_another_step_is_refused() -> None:
    buffer = LogitsBuffer()
    users, vectors, labels, *_ = inputs(20, 50)
    first = softmax_cross_entropy(users, vectors, labels, buffer)
    softmax_cross_entropy(users, vectors, labels, buffer)  # overwrites the first step's gradient
    with pytest.raises(RuntimeError, match="reused"):
        first.backward()


def test_a_target_far_below_the_top_still_gets_its_exact_loss() -> None:
    # one row whose target sits 120 below the best column: its fp32 softmax underflows to 0
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    vectors = torch.tensor([[120.0, 0.0], [0.0, 0.0], [0.0, 3.0]], requires_grad=True)
    labels = torch.tensor([1, 2])
    loss = softmax_cross_entropy(users, vectors, labels, LogitsBuffer(), normaliser=1.0)
    exact = reference_loss(users, vectors, labels, None, 1.0, None, None, False)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, exact)


def test_no_rows_give_a_zero_loss_with_zero_gradients() -> None:
    users = torch.zeros(0, 4, requires_grad=True)
    vectors = torch.randn(6, 4, requires_grad=True)
    loss = softmax_cross_entropy(users, vectors, torch.zeros(0, dtype=torch.long), LogitsBuffer())
    loss.backward()
    assert float(loss) == 0.0 and float(vectors.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("uniform_negatives", [40, 10], ids=["full-softmax", "sampled-logq"])
@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_the_trainers_loss_is_the_same_through_the_buffer_as_through_autograd(
    uniform_negatives: int, similarity: str
) -> None:
    from recall_service.model import TwoTowerModel, TwoTowerShape
    from recall_service.train import SampledSoftmaxLoss

    torch.manual_seed(0)
    shape = TwoTowerShape(
        num_items=40,
        num_attributes=3,
        max_attributes=1,
        num_scenarios=1,
        dim=8,
        layers=1,
        similarity=similarity,
    )
    model = TwoTowerModel(shape, np.zeros((41, 1), dtype=np.int64)).eval()
    counts = np.arange(40) % 7  # some items never seen: masked in the full softmax
    positives = torch.tensor([2, 4, 4, 9, 30, 40])  # all seen in training
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0, 0.0, 1.0])
    results = []
    for fused in (True, False):
        users = torch.randn(6, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        loss_fn = SampledSoftmaxLoss(
            counts, uniform_negatives, np.random.default_rng(3), seen_only=True, fused_on_cpu=fused
        )
        model.zero_grad()
        loss = loss_fn(model, users, positives + 0, weights, normaliser=4.0)
        loss.backward()
        grads = [users.grad] + [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((loss.detach(), grads))
    (fused_loss, fused_grads), (autograd_loss, autograd_grads) = results
    torch.testing.assert_close(fused_loss, autograd_loss, rtol=1e-5, atol=1e-6)
    assert len(fused_grads) == len(autograd_grads) > 1
    for a, b in zip(fused_grads, autograd_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("logq_correction", [True, False])
def test_padded_sampled_candidates_give_the_same_loss_and_gradients_on_one_shape_per_step(
    fused: bool, logq_correction: bool
) -> None:
    from recall_service.model import TwoTowerModel, TwoTowerShape
    from recall_service.train import SampledSoftmaxLoss

    torch.manual_seed(0)
    shape = TwoTowerShape(
        num_items=300, num_attributes=3, max_attributes=1, num_scenarios=1, dim=8, layers=1, similarity="dot"
    )
    model = TwoTowerModel(shape, np.zeros((301, 1), dtype=np.int64)).eval()
    counts = np.arange(300) % 11 + 1
    positives = torch.tensor([2, 4, 4, 9, 30, 290])
    columns_seen: dict[int, set[int]] = {}
    results = {}
    for multiple in (1, 64):
        loss_fn = SampledSoftmaxLoss(
            counts,
            uniform_negatives=100,  # a sampled softmax: the distinct draws vary step to step
            rng=np.random.default_rng(3),
            logq_correction=logq_correction,
            fused_on_cpu=fused,
            candidate_multiple=multiple,
        )
        taken = loss_fn.buffer.take
        columns_seen[multiple] = set()

        def recording_take(rows, columns, *args, _seen=columns_seen[multiple], _take=taken):
            _seen.add(columns)
            return _take(rows, columns, *args)

        loss_fn.buffer.take = recording_take
        steps = []
        for step in range(3):
            users = torch.randn(6, 8, generator=torch.Generator().manual_seed(step), requires_grad=True)
            model.zero_grad()
            loss = loss_fn(model, users, positives + 0)
            loss.backward()
            grads = [users.grad] + [p.grad.clone() for p in model.parameters() if p.grad is not None]
            steps.append((loss.detach(), grads))
        results[multiple] = steps
    for (padded_loss, padded_grads), (exact_loss, exact_grads) in zip(results[64], results[1], strict=True):
        torch.testing.assert_close(padded_loss, exact_loss, rtol=1e-5, atol=1e-6)
        for a, b in zip(padded_grads, exact_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if fused:  # the product's width: the exact counts differ step to step, the padded ones do not
        assert len(columns_seen[1]) > 1
        assert columns_seen[64] and all(columns % 64 == 0 for columns in columns_seen[64])
        assert len(columns_seen[64]) < len(columns_seen[1])


def test_the_sampled_negatives_are_the_distinct_draws_outside_the_batch_in_ascending_order() -> None:
    """The sampler's mask over the catalog keeps exactly what np.setdiff1d keeps (the draws, each
    once, less the batch's positives, ascending): the same candidates, columns and logQ terms."""
    from recall_service.train import distinct_except

    rng = np.random.default_rng(5)
    for num_items, draws, batch in [(50, 200, 10), (36_303, 20_000, 256), (7, 3, 0), (7, 0, 4), (1, 5, 1)]:
        drawn = rng.integers(1, num_items + 1, size=draws)
        positives = np.unique(rng.integers(1, num_items + 1, size=batch))
        kept = distinct_except(drawn, positives, num_items)
        expected = np.setdiff1d(drawn, positives)
        assert kept.dtype == np.int64
        np.testing.assert_array_equal(kept, expected)
