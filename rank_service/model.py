"""The Transformer ranker (torch; training and export only).

One request = one behaviour sequence and N candidates. The sequence (item id + attributes, event
type, recency position) is encoded ONCE by self-attention, with a learned "no history" token
prepended so that every attention row has at least one unmasked key (an all-masked softmax is
NaN in ONNX Runtime). Each candidate then attends to the encoded sequence (target attention);
its own features, the scenario embedding and the recall-stage features go through an MLP to a
score. Candidates never interact, so padding candidates cannot change real ones' scores.

Attention has two implementations with the same weights: plain ops (training, the CPU graph,
attention weights for debug) and a custom op exported as ``com.microsoft.MultiHeadAttention``
(the GPU graph, run by ONNX Runtime's fused kernels).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rank_service.features import NUM_CANDIDATE_FEATURES, NUM_EVENT_TYPES
from recsys.torch_layers import Dropout


@dataclass
class RankerConfig:
    num_items: int
    num_attributes: int
    num_scenarios: int
    max_history: int = 50
    max_attributes: int = 8
    dim: int = 64
    heads: int = 2
    layers: int = 2
    dropout: float = 0.2
    # Width of the first MLP layer, the candidate side's largest matmul (0 = twice ``dim``).
    mlp_width: int = 0
    # The item id embeddings are fixed vectors (the recall model's item vectors, set by training)
    # times one learned gain, instead of free per-item parameters.
    frozen_item_ids: bool = False
    # False: items are their attributes alone (no per-item id embedding): the id-level signal
    # reaches the ranker only through the recall sources' scores and the popularity feature.
    item_ids: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@torch.library.custom_op("recsys::multi_head_attention", mutates_args=())
def multi_head_attention(
    query: Tensor, key: Tensor, value: Tensor, key_mask: Tensor, num_heads: int
) -> Tensor:
    """Scaled dot-product attention over projected [B, S, D] / [B, T, D] tensors.

    ``key_mask`` [B, T] int32, 1 = attend. Exported as ``com.microsoft.MultiHeadAttention``.
    """
    batch, queries, dim = query.shape
    head = dim // num_heads
    q = query.reshape(batch, queries, num_heads, head).transpose(1, 2)
    k = key.reshape(batch, -1, num_heads, head).transpose(1, 2)
    v = value.reshape(batch, -1, num_heads, head).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(head)
    logits = logits.masked_fill(key_mask[:, None, None, :] == 0, float("-inf"))
    out = torch.softmax(logits, dim=-1) @ v
    return out.transpose(1, 2).reshape(batch, queries, dim).contiguous()


@multi_head_attention.register_fake
def _(query: Tensor, key: Tensor, value: Tensor, key_mask: Tensor, num_heads: int) -> Tensor:
    return torch.empty_like(query)


def register_microsoft_schema(
    name: str, inputs: list[tuple[str, str, bool]], float_types: list[str], mask_doc: str
) -> None:
    """Register ``com.microsoft.<name>`` with the onnx package (which lacks ONNX Runtime's contrib
    schemas) so that onnxscript can emit it. ``inputs``: (name, type var, optional); type var
    ``T`` is ``float_types``, ``M`` an int32 mask; one ``T`` output and a ``num_heads`` attribute."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(name, "com.microsoft"):
        return
    optional = OpSchema.FormalParameterOption.Optional
    single = OpSchema.FormalParameterOption.Single
    schema = OpSchema(
        name,
        "com.microsoft",
        1,
        inputs=[
            OpSchema.FormalParameter(input_name, kind, param_option=optional if is_optional else single)
            for input_name, kind, is_optional in inputs
        ],
        outputs=[OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", float_types, "float tensors"), ("M", ["tensor(int32)"], mask_doc)],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "number of heads")],
    )
    onnx.defs.register_schema(schema)


def _register_multi_head_attention_schema() -> None:
    """``com.microsoft.MultiHeadAttention`` with the inputs of ORT's contrib op."""
    register_microsoft_schema(
        "MultiHeadAttention",
        [
            ("query", "T", False),
            ("key", "T", True),
            ("value", "T", True),
            ("bias", "T", True),
            ("key_padding_mask", "M", True),
        ],
        ["tensor(float)", "tensor(float16)"],
        "key padding mask, 1 = attend",
    )


def onnx_multi_head_attention(query, key, value, key_mask, num_heads: int):
    """ONNX translation of ``recsys::multi_head_attention`` (onnxscript, used at export)."""
    import onnxscript

    _register_multi_head_attention_schema()
    microsoft = onnxscript.values.Opset("com.microsoft", 1)
    return microsoft.MultiHeadAttention(query, key, value, None, key_mask, num_heads=num_heads)


class Attention(nn.Module):
    """Multi-head attention with a key mask; ``fused`` selects the custom (exported-fused) op."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = Dropout(dropout)
        self.fused = False

    def forward(self, queries: Tensor, keys: Tensor, key_mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """queries [B, S, D], keys [B, T, D], key_mask [B, T] bool -> ([B, S, D], weights [B, S, T])."""
        q, k, v = self.query(queries), self.key(keys), self.value(keys)
        if self.fused:
            attended = torch.ops.recsys.multi_head_attention(q, k, v, key_mask.to(torch.int32), self.heads)
            return self.out(attended), None
        batch, length, dim = q.shape
        q = q.reshape(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = k.reshape(batch, -1, self.heads, self.head_dim).transpose(1, 2)
        v = v.reshape(batch, -1, self.heads, self.head_dim).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        attended = (self.dropout(weights) @ v).transpose(1, 2).reshape(batch, length, dim)
        return self.out(attended), weights.mean(dim=1)


class EncoderLayer(nn.Module):
    """Pre-norm Transformer layer: x + attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads, dropout)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), Dropout(dropout), nn.Linear(2 * dim, dim)
        )
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        normed = self.attention_norm(x)
        x = x + self.dropout(self.attention(normed, normed, mask)[0])
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class Ranker(nn.Module):
    """Scores [B, N] candidates against [B, L] histories (see the module docstring)."""

    def __init__(self, config: RankerConfig, item_attributes: np.ndarray, item_popularity: np.ndarray):
        super().__init__()
        self.config = config
        dim = config.dim
        self.item_embedding = nn.Embedding(config.num_items + 1, dim, padding_idx=0)
        self.attribute_embedding = nn.Embedding(config.num_attributes + 1, dim, padding_idx=0)
        # [num_items + 1, A] attribute ids + 1 (0 = none) and log-popularity per model id.
        self.register_buffer("item_attributes", torch.as_tensor(item_attributes, dtype=torch.long))
        self.register_buffer("item_popularity", torch.as_tensor(item_popularity, dtype=torch.float32))
        self.register_buffer("item_table", torch.zeros(0, dim), persistent=False)
        self.event_embedding = nn.Embedding(NUM_EVENT_TYPES, dim)
        self.position_embedding = nn.Embedding(config.max_history, dim)
        self.no_history = nn.Parameter(torch.zeros(1, 1, dim))
        self.scenario_embedding = nn.Embedding(config.num_scenarios, dim)
        self.input_norm = nn.LayerNorm(dim)
        self.input_dropout = Dropout(config.dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(dim, config.heads, config.dropout) for _ in range(config.layers)
        )
        self.output_norm = nn.LayerNorm(dim)
        self.target_attention = Attention(dim, config.heads, 0.0)
        self.feature_projection = nn.Linear(NUM_CANDIDATE_FEATURES + 1, dim)
        mlp_width = config.mlp_width or 2 * dim
        self.mlp = nn.Sequential(
            nn.Linear(5 * dim, mlp_width),
            nn.GELU(),
            Dropout(config.dropout),
            nn.Linear(mlp_width, dim),
            nn.GELU(),
            nn.Linear(dim, 1),
        )
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        nn.init.normal_(self.attribute_embedding.weight, std=0.02)
        if config.frozen_item_ids or not config.item_ids:
            # fixed vectors, or none read at all: a parameter no loss reaches would also stall
            # DistributedDataParallel, which waits for every parameter's gradient
            self.item_embedding.weight.requires_grad_(False)
        if config.frozen_item_ids:
            self.item_gain = nn.Parameter(torch.ones(()))
        nn.init.normal_(self.no_history, std=0.02)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()
            self.attribute_embedding.weight[0].zero_()

    # -- item representation -------------------------------------------------------------
    def compute_item_table(self) -> Tensor:
        """Item id embedding + mean attribute embedding for every model id [num_items + 1, D]."""
        attributes = self.item_attributes
        counts = (attributes > 0).sum(dim=1, keepdim=True).clamp(min=1)
        attribute_mean = self.attribute_embedding(attributes).sum(dim=1) / counts
        table = self.item_ids(self.item_embedding.weight) + attribute_mean
        return table * (torch.arange(table.shape[0], device=table.device) > 0)[:, None]

    def item_ids(self, embedded: Tensor) -> Tensor:
        """The id part of item representations (scaled by the learned gain when frozen)."""
        if not self.config.item_ids:
            return torch.zeros_like(embedded)
        return embedded * self.item_gain if self.config.frozen_item_ids else embedded

    def set_item_vectors(self, vectors: np.ndarray) -> None:
        """Fixed id embeddings from ``vectors`` [num_items, dim] (catalog order), scaled to the
        initial embeddings' RMS (0.02) so that the learned gain starts at the usual magnitude."""
        vectors = np.asarray(vectors, dtype=np.float32)
        expected = (self.config.num_items, self.config.dim)
        if vectors.shape != expected:
            raise ValueError(f"item vectors have shape {vectors.shape}, the ranker needs {expected}")
        rms = float(np.sqrt(np.mean(vectors**2))) or 1.0
        with torch.no_grad():
            self.item_embedding.weight[1:] = torch.from_numpy(vectors * (0.02 / rms))
            self.item_embedding.weight[0].zero_()

    def freeze_item_table(self) -> None:
        """Precompute item representations (serving/export): one Gather instead of a bag mean."""
        with torch.no_grad():
            self.item_table = self.compute_item_table().detach().clone()

    def item_representation(self, ids: Tensor) -> Tensor:
        if self.item_table.shape[0]:
            return F.embedding(ids, self.item_table)
        attributes = self.item_attributes[ids]
        counts = (attributes > 0).sum(dim=-1, keepdim=True).clamp(min=1)
        attribute_mean = self.attribute_embedding(attributes).sum(dim=-2) / counts
        represented = self.item_ids(self.item_embedding(ids)) + attribute_mean
        return represented * (ids > 0).unsqueeze(-1)

    def set_fused_attention(self, fused: bool) -> None:
        for module in self.modules():
            if isinstance(module, Attention):
                module.fused = fused

    # -- forward -------------------------------------------------------------------------
    def encode_history(self, history: Tensor, history_events: Tensor) -> tuple[Tensor, Tensor]:
        """[B, L] -> encoded [B, L + 1, D] (position 0 = "no history" token) and key mask."""
        x, mask = self.embed_history(history, history_events)
        for layer in self.layers:
            x = layer(x, mask)
        return self.output_norm(x), mask

    def embed_history(self, history: Tensor, history_events: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder's input [B, L + 1, D] (normalised, "no history" token first) and key mask."""
        valid = history > 0
        lengths = valid.sum(dim=1, keepdim=True)
        steps = torch.arange(history.shape[1], device=history.device)[None, :]
        # Recency position: 0 = most recent item, independent of padding.
        recency = (lengths - 1 - steps).clamp(min=0, max=self.config.max_history - 1)
        x = (
            self.item_representation(history)
            + self.event_embedding(history_events)
            + self.position_embedding(recency)
        )
        no_history = self.no_history.expand(history.shape[0], 1, -1)
        x = torch.cat([no_history, x], dim=1)
        mask = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
        return self.input_dropout(self.input_norm(x)), mask

    def forward(
        self,
        history: Tensor,
        history_events: Tensor,
        scenario: Tensor,
        candidates: Tensor,
        candidate_features: Tensor,
    ) -> tuple[Tensor, Tensor | None]:
        """Scores [B, N] and target-attention weights [B, N, L + 1] (None when fused)."""
        encoded, mask = self.encode_history(history, history_events)
        candidate = self.item_representation(candidates)
        scenario_vector = self.scenario_embedding(scenario)[:, None, :].expand_as(candidate)
        attended, weights = self.target_attention(candidate + scenario_vector, encoded, mask)
        numeric = torch.cat([candidate_features, self.item_popularity[candidates].unsqueeze(-1)], dim=-1)
        hidden = torch.cat(
            [candidate, attended, candidate * attended, scenario_vector, self.feature_projection(numeric)],
            dim=-1,
        )
        scores = self.mlp(hidden).squeeze(-1) + (candidate * attended).sum(-1)
        return scores, weights


class ScoresOnly(nn.Module):
    """Export wrapper: the graph's outputs (scores, and attention unless fused)."""

    def __init__(self, ranker: Ranker, with_attention: bool):
        super().__init__()
        self.ranker = ranker
        self.with_attention = with_attention

    def forward(self, history, history_events, scenario, candidates, candidate_features):
        scores, weights = self.ranker(history, history_events, scenario, candidates, candidate_features)
        if self.with_attention:
            return scores, weights
        return (scores,)
