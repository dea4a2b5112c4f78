"""The two-tower recall model (PyTorch; training and export only, never imported by serving).

User tower: a learned "no history" start token followed by the user's recent items (item id +
pooled attribute embedding + event type + position), encoded by a small causal Transformer (pre-LN,
or post-LN with a LayerNorm on the input embeddings as in SASRec); the output at the newest
position plus a scenario embedding, projected (and L2-normalised for cosine similarity), is the
user vector. Because attention is causal, one forward pass yields the user vector of every prefix
of a sequence (the next-item training objective). Histories are LEFT-padded (newest item last) so
the newest position is always the last column, and the start token guarantees at least one
unmasked key for every real position (no NaN on empty histories in ONNX Runtime).

Item tower: item id embedding plus the mean of its attribute embeddings (L2-normalised for cosine
similarity; raw for the inner product, where an item's norm can carry its popularity). The user
tower reads items through the same tables, so a rarely-bought item still shares its brand and
category signal.

Item text (when the catalog has titles, ``recall_service.text``): the mean embedding of the title's
hashed word and character-trigram features (an ``EmbeddingBag`` of the tower's width), or a trained
linear projection of a local sentence model's fixed title vector, added to the item representation
like the attribute mean. Text-less catalogs build no text module at all (the model, its state dict
and its numbers are those of a model without text). With text, the id embeddings of items that
training never saw are masked to zero (``mask_unseen_ids``): an id that no positive ever reached is
noise (only pushed away as a negative), so a cold item is what its attributes and text say.

Ids: items are ``dense + 1`` (0 = padding), attributes ``dense + 1`` (0 = padding).

Ensemble (:class:`TowerEnsemble`, ``RecallTrainConfig.ensemble``): models trained apart from
their own seeds, exported as one graph whose user vector is theirs side by side, against item
vectors side by side: the index's inner product is the sum of their scores.

Training computes every item's representation once per step (:meth:`TwoTowerModel.item_table`:
the attribute mean as one sparse [items x attributes] product instead of an [items x attributes x
dim] gather) and reads both towers from that table; the exported serving graph keeps the per-token
gather (:meth:`TwoTowerModel.item_features`), which computes the same numbers for the few items of
a request.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.torch_layers import Dropout


@dataclass
class TwoTowerShape:
    """Sizes that define the model's parameters (saved with checkpoints)."""

    num_items: int
    num_attributes: int
    max_attributes: int
    num_scenarios: int
    num_event_types: int = 5
    dim: int = 64
    layers: int = 2
    heads: int = 2
    max_length: int = 50
    dropout: float = 0.3
    # Learned per-head attention bias by distance (in items) between query and key: a recency
    # signal that, unlike absolute positions, means the same for every prefix of a sequence.
    relative_positions: bool = False
    # Training only: the share of candidate items whose id embedding is dropped from the item
    # tower (attributes alone), so that rarely-seen items still get a useful vector.
    id_dropout: float = 0.0
    # "cosine": L2-normalised towers and a learned temperature; "dot": raw inner product of the
    # unnormalised towers (as SASRec), so an item's norm can carry its popularity.
    similarity: str = "cosine"
    # Post-LN blocks with a LayerNorm on the input embeddings (SASRec / BERT) instead of pre-LN.
    post_norm: bool = False
    # Item text: "off", "hash" (hashed title features, ``text_buckets`` of them) or "sentence"
    # (fixed ``text_input_dim``-wide title vectors, linearly projected).
    text: str = "off"
    text_buckets: int = 0
    text_input_dim: int = 0
    # Zero the id embedding of items without training interactions (their text and attributes
    # alone make their vector).
    mask_unseen_ids: bool = False


class CausalSelfAttentionBlock(nn.Module):
    """Pre-LN Transformer block with an explicit boolean attention mask (exports cleanly to ONNX)."""

    def __init__(self, dim: int, heads: int, dropout: float, post_norm: bool = False):
        super().__init__()
        self.post_norm = post_norm
        self.heads = heads
        self.head_dim = dim // heads
        self.norm_attention = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attention_out = nn.Linear(dim, dim)
        self.norm_feed_forward = nn.LayerNorm(dim)
        self.feed_forward = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), Dropout(dropout), nn.Linear(4 * dim, dim)
        )
        self.dropout = Dropout(dropout)

    def forward(
        self,
        hidden: torch.Tensor,
        allowed: torch.Tensor,
        bias: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """``hidden`` [B, S, D]; ``allowed`` [B, 1, S, S] bool (query row may attend key column);
        ``bias`` [B or 1, H, S, S] added to the attention logits. ``last_only``: the output of the last
        position alone, [B, 1, D] (every position is still a key and a value)."""
        batch, length, dim = hidden.shape
        attention_input = hidden if self.post_norm else self.norm_attention(hidden)
        qkv = self.qkv(attention_input).view(batch, length, 3, self.heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, S, Dh]
        if last_only:
            query, allowed, hidden = query[:, :, -1:], allowed[:, :, -1:], hidden[:, -1:]
            bias = None if bias is None else bias[:, :, -1:]
        scores = query @ key.transpose(-1, -2) / math.sqrt(self.head_dim)
        if bias is not None:
            scores = scores + bias
        scores = scores.masked_fill(~allowed, -1e9)
        attention = self.dropout(torch.softmax(scores, dim=-1))
        context = (attention @ value).transpose(1, 2).reshape(batch, query.shape[2], dim)
        if self.post_norm:
            hidden = self.norm_attention(hidden + self.dropout(self.attention_out(context)))
            return self.norm_feed_forward(hidden + self.dropout(self.feed_forward(hidden)))
        hidden = hidden + self.dropout(self.attention_out(context))
        return hidden + self.dropout(self.feed_forward(self.norm_feed_forward(hidden)))


class _SparseMeanPool(torch.autograd.Function):
    """``pooling @ weight`` with a fixed sparse ``pooling`` matrix; the gradient is the transposed
    (precomputed) matrix times the incoming gradient, both sparse-dense products."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, pooling: torch.Tensor, pooling_t: torch.Tensor) -> torch.Tensor:
        ctx.pooling_t = pooling_t
        # fp32 under autocast too: sparse products have no bf16 kernels (and the table is small)
        with torch.autocast(weight.device.type, enabled=False):
            return pooling @ weight.to(pooling.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        with torch.autocast(grad.device.type, enabled=False):
            return ctx.pooling_t @ grad.to(ctx.pooling_t.dtype), None, None


class HashedTextEncoder(nn.Module):
    """Mean embedding of each item's hashed title features (CSR over item ids +1; no features: 0)."""

    def __init__(self, token_ids: np.ndarray, offsets: np.ndarray, buckets: int, dim: int):
        super().__init__()
        self.bag = nn.EmbeddingBag(buckets, dim, mode="mean", include_last_offset=True)
        nn.init.normal_(self.bag.weight, std=0.05)
        self.register_buffer("token_ids", torch.as_tensor(token_ids, dtype=torch.long))
        self.register_buffer("offsets", torch.as_tensor(offsets, dtype=torch.long))

    def table(self) -> torch.Tensor:
        """[num_items + 1, D] text part of every item (row 0 and title-less items: zeros)."""
        return self.bag(self.token_ids, self.offsets)


class ProjectedTextEncoder(nn.Module):
    """A trained linear projection of fixed title vectors (a local sentence model's)."""

    def __init__(self, vectors: np.ndarray, has_text: np.ndarray, dim: int):
        super().__init__()
        self.projection = nn.Linear(vectors.shape[1], dim)
        self.register_buffer("vectors", torch.as_tensor(vectors, dtype=torch.float32))
        self.register_buffer("has_text", torch.as_tensor(has_text, dtype=torch.float32))

    def table(self) -> torch.Tensor:
        """[num_items + 1, D] projected title vectors (row 0 and title-less items: zeros)."""
        return self.projection(self.vectors) * self.has_text.unsqueeze(-1)


def attribute_mean_matrices(
    item_attributes: torch.Tensor, num_attributes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse CSR [items + 1, attributes + 1] averaging each item's attribute ids (+1, 0 = none),
    and its transpose: ``matrix @ attribute_embedding.weight`` is every item's attribute mean."""
    present = item_attributes > 0
    counts = present.sum(dim=1).clamp(min=1).to(torch.float32)
    rows, slots = present.nonzero(as_tuple=True)
    columns = item_attributes[rows, slots]
    values = 1.0 / counts[rows]
    shape = (item_attributes.shape[0], num_attributes + 1)

    def csr(row: torch.Tensor, column: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        order = torch.argsort(row * size[1] + column)
        crow = torch.zeros(size[0] + 1, dtype=torch.long, device=row.device)
        crow[1:] = torch.cumsum(torch.bincount(row, minlength=size[0]), dim=0)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the ops used here are stable
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, column[order], values[order], size)

    return csr(rows, columns, shape), csr(columns, rows, (shape[1], shape[0]))


class TwoTowerModel(nn.Module):
    """User and item towers sharing the item id and attribute tables."""

    def __init__(
        self,
        shape: TwoTowerShape,
        item_attributes: np.ndarray,
        text_arrays: dict[str, np.ndarray] | None = None,
        seen_items: np.ndarray | None = None,
    ):
        """``text_arrays``: ``token_ids`` + ``offsets`` (shape.text "hash", :class:`HashedTitles`)
        or ``vectors`` + ``has_text`` ("sentence"); ``seen_items`` [num_items] bool, the items
        training has interactions of (``shape.mask_unseen_ids``)."""
        super().__init__()
        self.shape = shape
        dim = shape.dim
        self.item_embedding = nn.Embedding(shape.num_items + 1, dim, padding_idx=0)
        self.attribute_embedding = nn.Embedding(shape.num_attributes + 1, dim, padding_idx=0)
        # [num_items + 1, max_attributes] attribute ids (+1, 0 = none) per item id (+1).
        self.register_buffer("item_attributes", torch.as_tensor(item_attributes, dtype=torch.long))
        self.event_embedding = nn.Embedding(shape.num_event_types, dim)
        self.position_embedding = nn.Embedding(shape.max_length + 1, dim)
        self.start_token = nn.Parameter(torch.zeros(dim))
        self.relative_bias = (
            nn.Embedding(shape.max_length + 1, shape.heads) if shape.relative_positions else None
        )
        self.scenario_embedding = nn.Embedding(max(shape.num_scenarios, 1), dim)
        self.input_dropout = Dropout(shape.dropout)
        if shape.similarity not in ("cosine", "dot"):
            raise ValueError(f"similarity must be 'cosine' or 'dot', not {shape.similarity!r}")
        self.blocks = nn.ModuleList(
            CausalSelfAttentionBlock(dim, shape.heads, shape.dropout, shape.post_norm)
            for _ in range(shape.layers)
        )
        # Pre-LN: normalises the last block's output; post-LN: the input embeddings.
        self.output_norm = nn.LayerNorm(dim)
        self.user_projection = nn.Linear(dim, dim)
        # log of the softmax scale (1 / temperature), learned; starts at 1/0.05.
        self.log_scale = nn.Parameter(torch.tensor(math.log(20.0)))
        # The raw inner product has no temperature: a parameter no loss reaches would stall
        # DistributedDataParallel, which waits for every parameter's gradient.
        self.log_scale.requires_grad_(shape.similarity == "cosine")
        self._pooling: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._init_weights()
        # Built after the other weights are drawn, so that those are the same with and without text.
        self.text: HashedTextEncoder | ProjectedTextEncoder | None = None
        if shape.text != "off":
            if text_arrays is None:
                raise ValueError(f"text {shape.text!r} needs the items' text arrays")
            if shape.text == "hash":
                self.text = HashedTextEncoder(
                    text_arrays["token_ids"], text_arrays["offsets"], shape.text_buckets, dim
                )
            elif shape.text == "sentence":
                self.text = ProjectedTextEncoder(text_arrays["vectors"], text_arrays["has_text"], dim)
            else:
                raise ValueError(f"text must be 'off', 'hash' or 'sentence', not {shape.text!r}")
            # Set while exporting: the serving graph reads the text part from this constant table.
            self.register_buffer("_frozen_text", None, persistent=False)
        if shape.mask_unseen_ids:
            if seen_items is None:
                raise ValueError("mask_unseen_ids needs seen_items")
            mask = np.concatenate([[0.0], np.asarray(seen_items, dtype=np.float32)])
            self.register_buffer("id_mask", torch.as_tensor(mask, dtype=torch.float32).unsqueeze(-1))

    @classmethod
    def from_state_dict(cls, shape: TwoTowerShape, state_dict: dict[str, torch.Tensor]) -> TwoTowerModel:
        """The model a :meth:`state_dict` came from (its buffers hold the item arrays)."""
        arrays = {
            name.split(".", 1)[1]: tensor.numpy()
            for name, tensor in state_dict.items()
            if name.startswith("text.") and name.count(".") == 1
        }
        seen = state_dict["id_mask"][1:, 0].numpy() > 0 if "id_mask" in state_dict else None
        model = cls(shape, state_dict["item_attributes"].numpy(), arrays or None, seen)
        model.load_state_dict(state_dict)
        return model

    def _init_weights(self) -> None:
        for embedding in (self.item_embedding, self.attribute_embedding):
            nn.init.normal_(embedding.weight, std=0.05)
            with torch.no_grad():
                embedding.weight[0].zero_()
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        nn.init.normal_(self.event_embedding.weight, std=0.02)
        nn.init.normal_(self.scenario_embedding.weight, std=0.02)
        nn.init.normal_(self.start_token, std=0.02)
        if self.relative_bias is not None:
            nn.init.zeros_(self.relative_bias.weight)

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the sparse pooling cache (sparse CSR tensors cannot be
        deep-copied); it is rebuilt from ``item_attributes`` on first use."""
        state = self.__dict__.copy()
        state["_pooling"] = {}
        return state

    def text_table(self) -> torch.Tensor | None:
        """[num_items + 1, D] text part of every item, or None without text."""
        if self.text is None:
            return None
        return self._frozen_text if self._frozen_text is not None else self.text.table()

    @contextlib.contextmanager
    def frozen_text(self) -> Iterator[None]:
        """Within: :meth:`item_features` reads the text part from a precomputed constant table
        (the exported serving graph gathers rows of it instead of pooling title features)."""
        if self.text is None:
            yield
            return
        with torch.no_grad():
            self._frozen_text = self.text.table().detach()
        try:
            yield
        finally:
            self._frozen_text = None

    @property
    def normalised(self) -> bool:
        """Whether both towers' outputs are L2-normalised (cosine similarity)."""
        return self.shape.similarity == "cosine"

    def scale(self) -> torch.Tensor:
        """Logit scale: learned 1 / temperature for cosine similarity, 1 for the raw dot product."""
        if not self.normalised:
            return torch.ones(())
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def item_features(self, items: torch.Tensor, id_dropout: float = 0.0) -> torch.Tensor:
        """Unnormalised item representation (id + mean attribute embedding) of ``items`` (+1 ids);
        ``id_dropout`` drops that share of the id embeddings (training)."""
        attributes = self.item_attributes[items]  # [..., A]
        present = (attributes > 0).to(torch.float32)
        pooled = (self.attribute_embedding(attributes) * present.unsqueeze(-1)).sum(-2)
        pooled = pooled / present.sum(-1, keepdim=True).clamp(min=1.0)
        ids = self.item_embedding(items)
        if self.shape.mask_unseen_ids:
            ids = ids * self.id_mask[items]
        if id_dropout > 0:
            ids = ids * (torch.rand(ids.shape[:-1], device=ids.device) >= id_dropout).unsqueeze(-1)
        features = ids + pooled
        text = self.text_table()
        return features if text is None else features + F.embedding(items, text)

    def item_table(self, id_dropout: float = 0.0) -> torch.Tensor:
        """[num_items + 1, D] unnormalised item representations (row 0 = padding), computed once
        for every item: :meth:`item_features` of all ids, with the attribute mean as one sparse
        product. ``id_dropout`` drops that share of the id embeddings (training candidates)."""
        device = self.item_attributes.device
        if device not in self._pooling:
            self._pooling[device] = attribute_mean_matrices(self.item_attributes, self.shape.num_attributes)
        pooling, pooling_t = self._pooling[device]
        pooled = _SparseMeanPool.apply(self.attribute_embedding.weight, pooling, pooling_t)
        ids = self.item_embedding.weight
        if self.shape.mask_unseen_ids:
            ids = ids * self.id_mask
        if id_dropout > 0:
            keep = torch.rand(ids.shape[0], 1, device=ids.device) >= id_dropout
            ids = ids * keep
        table = ids + pooled
        text = self.text_table()
        return table if text is None else table + text

    def candidate_vectors(self, table: torch.Tensor) -> torch.Tensor:
        """Item-tower vectors [num_items, D] (dense id order) from an :meth:`item_table`."""
        vectors = table[1:]
        return F.normalize(vectors, dim=-1) if self.normalised else vectors

    def candidate_rows(self, table: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``candidate_vectors(table)[items - 1]`` for ``items`` (+1 ids) without the whole catalog's
        vectors (a sampled softmax): its gradient reaches the table without a full-size slice.

        ``index_select``, not ``table[items]``: on a CPU the indexing's backward is an accumulating
        ``index_put`` (sorted, serial), ~6x slower than ``index_select``'s ``index_add`` for the
        ~16k rows of a step on Beauty tiled 3x; the same sums (the candidates are distinct)."""
        rows = table.index_select(0, items)
        return F.normalize(rows, dim=-1) if self.normalised else rows

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """Item tower: vectors of ``items`` (+1 ids), L2-normalised for cosine similarity."""
        id_dropout = self.shape.id_dropout if self.training else 0.0
        features = self.item_features(items, id_dropout)
        return F.normalize(features, dim=-1) if self.normalised else features

    def item_logits(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits [U, I]: user . item (times the learned scale for cosine), what the index ranks by."""
        return self.scaled(users @ self.item_vectors(items).T)

    def scaled(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits times the cosine temperature; the raw inner product is used as it is."""
        return self.scale() * logits if self.normalised else logits

    def all_item_vectors(self) -> torch.Tensor:
        """[num_items, D] item-tower vectors in dense id order (row i = dense item i)."""
        return self.item_vectors(torch.arange(1, self.shape.num_items + 1))

    def encode(
        self,
        items: torch.Tensor,
        events: torch.Tensor,
        item_table: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Hidden states [B, S + 1, D]: the start token sits just before each row's oldest item.

        ``items``/``events`` are [B, S] left-padded (0 = padding), newest last; the last column of
        the result is therefore always the newest item, or the start token for an empty history.
        ``item_table`` (training, validation): read item representations from it instead of
        pooling each token's attributes (the serving graph's way). ``last_only``: [B, 1, D], the
        newest position alone (the last block computes nothing else: what validation needs).
        """
        length = items.shape[1]
        padded_items = torch.cat([torch.zeros_like(items[:, :1]), items], dim=1)  # [B, S + 1]
        padded_events = torch.cat([torch.zeros_like(events[:, :1]), events], dim=1)
        history_length = (items > 0).sum(dim=1, keepdim=True)
        steps = torch.arange(length + 1, device=items.device)
        is_start = steps.unsqueeze(0) == (length - history_length)  # [B, S + 1]
        valid = is_start | (padded_items > 0)
        items_in = (
            self.item_features(padded_items)
            if item_table is None
            else F.embedding(padded_items, item_table, padding_idx=0)
        )
        tokens = items_in + self.event_embedding(padded_events)
        tokens = torch.where(is_start.unsqueeze(-1), self.start_token.expand_as(tokens), tokens)
        # Position 0 = start token, then 1.. from the oldest item (the same for every prefix).
        positions = (torch.cumsum(valid.to(torch.long), dim=1) - 1).clamp(min=0)
        hidden = tokens + self.position_embedding(positions)
        if self.shape.post_norm:
            hidden = self.output_norm(hidden)
        hidden = self.input_dropout(hidden)
        causal = steps.unsqueeze(0) <= steps.unsqueeze(1)  # [S + 1, S + 1]: key <= query
        diagonal = steps.unsqueeze(0) == steps.unsqueeze(1)
        # Padding rows may attend themselves so that no row is fully masked.
        allowed = ((causal & valid.unsqueeze(1)) | diagonal).unsqueeze(1)  # [B, 1, S + 1, S + 1]
        bias = None
        if self.relative_bias is not None:
            # The pairs attention reads (a valid key at or before its query, or a row attending
            # itself) lie as far apart in positions as in columns, a row's valid tokens being
            # consecutive at its end: one bias from the column distance serves every row (masked
            # pairs never read theirs), and training scatters its gradient once, not once per row.
            distance = (steps.unsqueeze(1) - steps.unsqueeze(0)).clamp(0, self.shape.max_length)
            bias = self.relative_bias(distance).permute(2, 0, 1).unsqueeze(0)  # [1, H, S + 1, S + 1]
        last_block = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            hidden = block(hidden, allowed, bias, last_only=last_only and index == last_block)
        return hidden if self.shape.post_norm else self.output_norm(hidden)

    def user_head(self, hidden: torch.Tensor, scenarios: torch.Tensor) -> torch.Tensor:
        """User vectors from hidden states and scenario ids (broadcast over positions)."""
        users = self.user_projection(hidden + self.scenario_embedding(scenarios))
        return F.normalize(users, dim=-1) if self.normalised else users

    def forward(self, items: torch.Tensor, events: torch.Tensor, scenarios: torch.Tensor) -> torch.Tensor:
        """User tower for serving: [B, D] user vectors after the newest history position."""
        hidden = self.encode(items, events, last_only=True)[:, -1]
        return self.user_head(hidden, scenarios)


class TowerEnsemble(nn.Module):
    """Two-tower models trained apart (each from its own seed) served as one model: the user vector
    is the members' user vectors side by side, the item vector the members' item vectors side by
    side, so the inner product the index ranks by is the sum of the members' own scores. An
    ensemble at the price of a wider vector: one ONNX graph, one index, nothing new in serving.

    It has what export and validation read of a :class:`TwoTowerModel`: ``shape`` (the first
    member's; ``dim`` is a member's width, the vectors are ``len(members)`` times it),
    ``normalised``, ``forward``, ``all_item_vectors`` and ``frozen_text``."""

    def __init__(self, members: list[TwoTowerModel]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        first = members[0].shape
        for member in members[1:]:
            other = member.shape
            if (other.num_items, other.max_length, other.similarity) != (
                first.num_items,
                first.max_length,
                first.similarity,
            ):
                raise ValueError("ensemble members must share the catalog, max_length and similarity")
        self.members = nn.ModuleList(members)

    @property
    def shape(self) -> TwoTowerShape:
        return self.members[0].shape

    @property
    def normalised(self) -> bool:
        """Whether each member's part of a vector is L2-normalised (the whole has norm sqrt(K))."""
        return self.members[0].normalised

    def forward(self, items: torch.Tensor, events: torch.Tensor, scenarios: torch.Tensor) -> torch.Tensor:
        """[B, K * D]: the members' user vectors side by side."""
        return torch.cat([member(items, events, scenarios) for member in self.members], dim=-1)

    def all_item_vectors(self) -> torch.Tensor:
        """[num_items, K * D]: the members' item vectors side by side (dense id order)."""
        return torch.cat([member.all_item_vectors() for member in self.members], dim=-1)

    @contextlib.contextmanager
    def frozen_text(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for member in self.members:
                stack.enter_context(member.frozen_text())
            yield


def tower_members(model: TwoTowerModel | TowerEnsemble) -> list[TwoTowerModel]:
    """The two-tower models ``model`` is made of: an ensemble's members, or the model itself."""
    return list(model.members) if isinstance(model, TowerEnsemble) else [model]


class UserTowerForExport(nn.Module):
    """The serving graph: (items int64 [B, S], events int64 [B, S], scenario int64 [B]) -> [B, D]."""

    def __init__(self, model: TwoTowerModel | TowerEnsemble):
        super().__init__()
        self.model = model

    def forward(self, items: torch.Tensor, events: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        return self.model(items, events, scenario)
