"""Softmax cross-entropy over many items in one reused buffer (CPU training).

The recall trainer's largest tensors are a step's [positions x items] logits: the autograd path
(matmul, ``log_softmax``, ``nll_loss`` and their backward) allocates three or four of them per
step, each of a size set by that batch's positions (and, sampled, its candidates), and glibc's
heap, kept for speed (see ``recsys.training.reuse_freed_memory``), fragments under ever-different
sizes: training Beauty tiled 3x held 8.7 GB resident after three epochs (10.7 GB by its end) for
about 1 GB in use.

:func:`softmax_cross_entropy` computes the loss and its gradient in forward (the gradient of a
softmax cross-entropy in its logits is ``softmax - onehot``), in a single block reused step after
step (:class:`LogitsBuffer`): the logits are written there, the softmax is taken a few rows at a
time in fp32 and written back in place as ``softmax - onehot``, and backward is two matmuls with
it, each row weighted by its share of the loss. The same sums as ``F.cross_entropy`` on the
product (tested to rounding). The 3x log's whole recall training peaked at 2.5 GB, its epochs
~58 s instead of ~92-118 s (its sampled softmax gains most); a Beauty step is about level with
autograd's (``python -m recall_service.train_bench``: ``loss_in_one_buffer_step_speedup``).
"""

from __future__ import annotations

from typing import Any

import torch

# Rows of the softmax taken at once in fp32: about this many elements (a few MB, cache-sized).
CHUNK_ELEMENTS = 1 << 19


class LogitsBuffer:
    """One flat block, grown when a step needs more (with headroom) and otherwise reused.

    ``generation`` counts the steps it served: a backward checks that no later forward has
    overwritten the gradient it reads."""

    def __init__(self, headroom: float = 1.25):
        self.headroom = headroom
        self.generation = 0
        self._flat: torch.Tensor | None = None

    def take(self, rows: int, columns: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A [rows, columns] view of the block (contents undefined)."""
        size = rows * columns
        flat = self._flat
        if flat is None or flat.dtype != dtype or flat.device != device or flat.numel() < size:
            self._flat = None  # free the old block before the new one is allocated
            flat = self._flat = torch.empty(int(size * self.headroom) + 1, dtype=dtype, device=device)
        self.generation += 1
        return flat[:size].view(rows, columns)

    @property
    def bytes(self) -> int:
        return 0 if self._flat is None else self._flat.numel() * self._flat.element_size()


def row_factors(
    rows: int, weights: torch.Tensor | None, normaliser: float | None, device: torch.device
) -> torch.Tensor:
    """[rows] fp32: each row's share of the loss, as ``recall_service.train.weighted_loss`` sums:
    the (weighted) mean, or the (weighted) sum over ``normaliser``."""
    if weights is None:
        return torch.full((rows,), 1.0 / (normaliser if normaliser is not None else rows), device=device)
    weights = weights.float()
    return weights / (normaliser if normaliser is not None else weights.sum())


# Below this a target's fp32 softmax has lost precision (subnormal or 0): its loss is then
# taken from the row's log-sum-exp instead of the log of the probability.
SMALLEST_EXACT_PROBABILITY = 1e-30


def target_losses(logits: torch.Tensor, probabilities: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[rows] fp32 ``-log softmax(logits)[label]`` from the rows' softmax ``probabilities``; rows
    whose target probability underflows are recomputed from their logits."""
    target = probabilities.gather(1, labels).squeeze(1)
    losses = target.log().neg_()
    tiny = target < SMALLEST_EXACT_PROBABILITY
    if bool(tiny.any()):
        rows = logits[tiny].float()
        losses[tiny] = torch.logsumexp(rows, dim=1) - rows.gather(1, labels[tiny]).squeeze(1)
    return losses


class _SoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        users: torch.Tensor,
        vectors: torch.Tensor,
        labels: torch.Tensor,
        factors: torch.Tensor,
        column_bias: torch.Tensor | None,
        masked_columns: torch.Tensor | None,
        buffer: LogitsBuffer,
        compute_dtype: torch.dtype,
    ) -> torch.Tensor:
        rows, columns = users.shape[0], vectors.shape[0]
        left, right = users.detach().to(compute_dtype), vectors.detach().to(compute_dtype)
        block = buffer.take(rows, columns, compute_dtype, users.device)
        torch.matmul(left, right.T, out=block)
        losses = torch.empty(rows, dtype=torch.float32, device=users.device)
        step = max(1, CHUNK_ELEMENTS // max(columns, 1))
        shifted = column_bias is not None or masked_columns is not None
        for start in range(0, rows, step):
            chunk = block[start : start + step]
            logits = chunk
            if shifted:  # the bias added in fp32, not rounded to the block's precision
                logits = chunk.float()
                if column_bias is not None:
                    logits.add_(column_bias)
                if masked_columns is not None:
                    logits.masked_fill_(masked_columns, float("-inf"))
            chunk_labels = labels[start : start + step, None]
            probabilities = torch.softmax(logits, dim=1, dtype=torch.float32)
            losses[start : start + step] = target_losses(logits, probabilities, chunk_labels)
            # each row's gradient in its logits, before its share of the loss: softmax - onehot
            probabilities.scatter_add_(
                1, chunk_labels, torch.full(chunk_labels.shape, -1.0, device=chunk.device)
            )
            chunk.copy_(probabilities)
        ctx.save_for_backward(left, right, factors)
        ctx.buffer, ctx.generation, ctx.block = buffer, buffer.generation, block
        ctx.dtypes = (users.dtype, vectors.dtype)
        return (losses * factors).sum()

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        if ctx.buffer.generation != ctx.generation:
            raise RuntimeError("the logits buffer was reused by another step before this backward")
        left, right, factors = ctx.saved_tensors
        gradient = ctx.block  # [rows, columns] softmax - onehot; row i's loss weighs factors[i]
        shares = (factors * grad_loss.float())[:, None]
        grad_users = grad_vectors = None
        if ctx.needs_input_grad[0]:
            grad_users = (gradient @ right).float().mul_(shares).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            grad_vectors = (gradient.T @ (left.float() * shares).to(gradient.dtype)).to(ctx.dtypes[1])
        return grad_users, grad_vectors, None, None, None, None, None, None


def softmax_cross_entropy(
    users: torch.Tensor,
    vectors: torch.Tensor,
    labels: torch.Tensor,
    buffer: LogitsBuffer,
    weights: torch.Tensor | None = None,
    normaliser: float | None = None,
    column_bias: torch.Tensor | None = None,
    masked_columns: torch.Tensor | None = None,
    low_precision: bool = False,
) -> torch.Tensor:
    """Cross-entropy of ``users`` [P, D] . ``vectors`` [C, D] (+ ``column_bias`` [C]; columns
    where ``masked_columns`` [C] is True excluded) against column ``labels`` [P]: the mean over
    the rows, weighted by ``weights`` [P], or the (weighted) sum over ``normaliser``.

    ``low_precision``: the product and the stored gradient in bf16 (the softmax itself and the
    loss in fp32). Differentiable in ``users`` and ``vectors``; the gradient lives in ``buffer``
    until the next call, so each call's backward must run before the next call."""
    rows = users.shape[0]
    if rows == 0:
        return (users.sum() + vectors.sum()) * 0.0
    factors = row_factors(rows, weights, normaliser, users.device)
    compute_dtype = torch.bfloat16 if low_precision else torch.float32
    bias = None if column_bias is None else column_bias.detach().float()
    return _SoftmaxCrossEntropy.apply(
        users, vectors, labels, factors, bias, masked_columns, buffer, compute_dtype
    )
