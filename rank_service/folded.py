"""The served CPU graph: the ranker with everything item- or scenario-only folded at export.

``FoldedRanker`` computes the scores of :class:`~rank_service.model.Ranker` (eval mode) with less
work and fewer ONNX nodes; its export is the CPU serving graph. Folded at export time (float64,
stored float32) from the ranker's weights as they are then:

- per-item tables, each gathered once per candidate: the item vector (the ranker's frozen item
  table, shared with the history); its target-attention query (scaled, per head, with a
  constant 1 appended); its part of the first MLP layer (item vector and log-popularity through
  ``feature_projection`` and the first layer);
- per-scenario tables: the scenario's part of the query and of the first MLP layer (+ biases);
- composed weights: value then output projection per head; ``feature_projection`` then the first
  MLP layer for the numeric features; each encoder layer's Q, K, V projections packed into one
  matrix (one ``com.microsoft.Attention`` node per layer).

Per request the history side builds a block-diagonal key matrix [H * (hd + 1), H * T] (per head
K_h^T plus one row: the scenario's logit per key, -1e9 where masked, met by the query's constant
1) and values [H * T, D] already through the output projection. The candidate side is then three
matmuls for the attention (logits, per-head softmax, weights @ values) and the MLP as 2-D Gemms
whose bias and gathered per-item term are the Gemm's C input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rank_service.model import Ranker, multi_head_attention, register_microsoft_schema

# What the served CPU graph computes (the bundle manifest carries it).
FOLDED_DESCRIPTION = (
    "scores of the model with item- and scenario-only terms precomputed at export: per-item tables "
    "(item vector, scaled target-attention query, first-MLP-layer contribution incl. popularity), "
    "per-scenario query and first-layer terms, value x output projection and feature projection x "
    "first layer composed, Q|K|V packed into one com.microsoft.Attention per encoder layer"
)
# Logit of masked history positions in the target attention (finite: the key matrix's
# off-diagonal blocks multiply it by 0).
MASKED_LOGIT = -1.0e9


@torch.library.custom_op("recsys::self_attention", mutates_args=())
def self_attention(x: Tensor, weight: Tensor, bias: Tensor, key_mask: Tensor, num_heads: int) -> Tensor:
    """Self-attention of x [B, T, D] with packed Q|K|V ``weight`` [D, 3D] and ``bias`` [3D], before
    the output projection; ``key_mask`` [B, T] int32, 1 = attend. Exported as
    ``com.microsoft.Attention``."""
    query, key, value = (x @ weight + bias).chunk(3, dim=-1)
    return multi_head_attention(query, key, value, key_mask, num_heads)


@self_attention.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, key_mask: Tensor, num_heads: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[1] // 3))


def _register_attention_schema() -> None:
    """``com.microsoft.Attention`` with the inputs used here (packed Q|K|V weights and bias)."""
    register_microsoft_schema(
        "Attention",
        [("input", "T", False), ("weights", "T", False), ("bias", "T", False), ("mask_index", "M", False)],
        ["tensor(float)"],
        "key padding mask [B, T], 1 = attend",
    )


def onnx_self_attention(x, weight, bias, key_mask, num_heads: int):
    """ONNX translation of ``recsys::self_attention`` (onnxscript, used at export)."""
    import onnxscript

    _register_attention_schema()
    microsoft = onnxscript.values.Opset("com.microsoft", 1)
    return microsoft.Attention(x, weight, bias, key_mask, num_heads=num_heads)


ONNX_TRANSLATIONS = {torch.ops.recsys.self_attention.default: onnx_self_attention}


def _parameter(value: Tensor) -> nn.Parameter:
    return nn.Parameter(value.to(torch.float32).contiguous(), requires_grad=False)


class FoldedRanker(nn.Module):
    """Scores [B, N] of a frozen ranker (eval mode) from the folded tables described above."""

    def __init__(self, ranker: Ranker):
        super().__init__()
        ranker.eval().freeze_item_table()  # item vectors: the frozen table (history and candidates)
        self.ranker = ranker
        self.heads = ranker.config.heads
        self.head_dim = ranker.config.dim // self.heads
        with torch.no_grad():
            self._fold_encoder(ranker)
            self._fold_target(ranker)

    def _fold_encoder(self, ranker: Ranker) -> None:
        weights, biases = [], []
        for layer in ranker.layers:
            projections = (layer.attention.query, layer.attention.key, layer.attention.value)
            weights.append(_parameter(torch.cat([p.weight.T for p in projections], dim=1)))
            biases.append(_parameter(torch.cat([p.bias for p in projections])))
        self.qkv_weights = nn.ParameterList(weights)
        self.qkv_biases = nn.ParameterList(biases)

    def _fold_target(self, ranker: Ranker) -> None:
        d64, dim, heads, head_dim = torch.float64, ranker.config.dim, self.heads, self.head_dim
        target, first = ranker.target_attention, ranker.mlp[0]
        # First MLP layer [2D, 5D] over (candidate, attended, product, scenario, numeric).
        w_item, w_attended, w_product, w_scenario, w_numeric = first.weight.to(d64).split(dim, dim=1)
        numeric = w_numeric @ ranker.feature_projection.weight.to(d64)  # [2D, F + 1], last: popularity
        scale = 1.0 / math.sqrt(head_dim)
        query_w, query_b = target.query.weight.to(d64).T * scale, target.query.bias.to(d64) * scale

        items = ranker.item_table.to(d64)  # [I + 1, D]
        query = (items @ query_w).reshape(-1, heads, head_dim)
        query = torch.cat([query, torch.ones_like(query[..., :1])], dim=-1)
        self.item_query = _parameter(query.reshape(len(items), -1))  # [I + 1, H * (hd + 1)]
        popularity = ranker.item_popularity.to(d64)[:, None]
        self.item_hidden = _parameter(items @ w_item.T + popularity * numeric[:, -1])

        scenarios = ranker.scenario_embedding.weight.to(d64)
        self.scenario_query = _parameter(scenarios @ query_w + query_b)
        bias = first.bias.to(d64) + w_numeric @ ranker.feature_projection.bias.to(d64)
        self.scenario_hidden = _parameter(scenarios @ w_scenario.T + bias)
        self.candidate_weight = _parameter(torch.cat([w_attended.T, w_product.T, numeric[:, :-1].T]))

        # Value then output projection per head: [D, H * D], [H * D] (output bias split over heads).
        value_w = target.value.weight.to(d64).T.reshape(dim, heads, head_dim)
        value_b = target.value.bias.to(d64).reshape(heads, head_dim)
        out_w = target.out.weight.to(d64).T.reshape(heads, head_dim, dim)
        self.value_out_weight = _parameter(torch.einsum("dhk,hke->dhe", value_w, out_w).reshape(dim, -1))
        value_out_bias = torch.einsum("hk,hke->he", value_b, out_w) + target.out.bias.to(d64) / heads
        self.value_out_bias = _parameter(value_out_bias.reshape(-1))

    def encode_history(self, history: Tensor, history_events: Tensor) -> tuple[Tensor, Tensor]:
        """As :meth:`Ranker.encode_history`, with one packed attention op per layer."""
        ranker = self.ranker
        x, mask = ranker.embed_history(history, history_events)
        key_mask = mask.to(torch.int32)
        for layer, weight, bias in zip(ranker.layers, self.qkv_weights, self.qkv_biases, strict=True):
            attended = self_attention(layer.attention_norm(x), weight, bias, key_mask, self.heads)
            x = x + layer.attention.out(attended)
            x = x + layer.ffn(layer.ffn_norm(x))
        return ranker.output_norm(x), mask

    def forward(
        self,
        history: Tensor,
        history_events: Tensor,
        scenario: Tensor,
        candidates: Tensor,
        candidate_features: Tensor,
    ) -> Tensor:
        """Scores [B, N]; inputs as :meth:`Ranker.forward`."""
        encoded, mask = self.encode_history(history, history_events)
        keys, values = self._target_keys_values(encoded, mask, scenario)
        batch, count = candidates.shape
        logits = (F.embedding(candidates, self.item_query) @ keys).reshape(batch, count, self.heads, -1)
        attended = torch.softmax(logits, dim=-1).reshape(batch, count, -1) @ values
        product = F.embedding(candidates, self.ranker.item_table) * attended
        features = torch.cat([attended, product, candidate_features], dim=-1).reshape(batch * count, -1)
        scenario_hidden = F.embedding(scenario, self.scenario_hidden)[:, None]
        hidden = F.embedding(candidates, self.item_hidden) + scenario_hidden
        # 2-D, so that the additions are the Gemms' C input and bias.
        hidden = F.gelu(torch.addmm(hidden.reshape(batch * count, -1), features, self.candidate_weight))
        mlp = self.ranker.mlp
        hidden = F.gelu(mlp[3](hidden))
        return mlp[5](hidden).reshape(batch, count) + product.sum(-1)

    def _target_keys_values(self, encoded: Tensor, mask: Tensor, scenario: Tensor) -> tuple[Tensor, Tensor]:
        """Block-diagonal keys [B, H * (hd + 1), H * T] and values [B, H * T, D] (module docstring)."""
        heads, head_dim = self.heads, self.head_dim
        batch, length, dim = encoded.shape
        keys = self.ranker.target_attention.key(encoded).reshape(batch, length, heads, head_dim)
        scenario_query = F.embedding(scenario, self.scenario_query).reshape(batch, 1, heads, head_dim)
        key_bias = (keys * scenario_query).sum(-1) + torch.where(mask, 0.0, MASKED_LOGIT)[:, :, None]
        keys = torch.cat([keys, key_bias[..., None]], dim=-1).permute(0, 2, 3, 1)  # [B, H, hd + 1, T]
        blocks = torch.eye(heads, dtype=keys.dtype, device=keys.device)
        keys = (keys[:, :, :, None, :] * blocks[:, None, :, None]).reshape(batch, -1, heads * length)
        values = encoded @ self.value_out_weight + self.value_out_bias
        values = values.reshape(batch, length, heads, dim).transpose(1, 2).reshape(batch, -1, dim)
        return keys, values
