"""Item text for the item tower: hashed subword features of titles, or a local sentence model.

Training-side only (numpy here; the torch module lives in ``recall_service.model``): the exported
item vectors already hold the text part, so serving needs neither this module nor any new package.

Hashed features (the default, no downloads): the lowercased title's word unigrams (``w:word``) and
the character trigrams of each word with boundary marks (``t:#wo``, ``t:wor``, ...), each distinct
feature hashed with CRC-32 (``zlib.crc32`` of its UTF-8 bytes: fixed across runs, processes and
Python versions, unlike the salted ``hash()``) into ``buckets`` ids. Trigrams let an unseen word
still share most of its features with known ones ("shampoos" with "shampoo").

Sentence model (``--text-model PATH``): a local sentence-transformers model encodes each title
once into a fixed vector; the model learns a linear projection of it into the tower.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_BUCKETS = 2**16
MAX_TOKENS = 256  # distinct features kept per title (long descriptions are cut)
TEXT_MODES = ("auto", "off", "hash")

_WORD = re.compile(r"\w+", re.UNICODE)

# titles -> [N, E] float vectors (a loaded sentence model's encode, or a test's fake)
TitleEncoder = Callable[[list[str]], np.ndarray]


def title_features(title: str) -> list[str]:
    """Distinct features of a title, in first-seen order: word unigrams and boundary-marked
    character trigrams of each lowercased word."""
    features: dict[str, None] = {}
    for word in _WORD.findall(title.lower()):
        features.setdefault(f"w:{word}")
        marked = f"#{word}#"
        for start in range(len(marked) - 2):
            features.setdefault(f"t:{marked[start : start + 3]}")
    return list(features)


def hash_feature(feature: str, buckets: int = DEFAULT_BUCKETS) -> int:
    """Bucket id of one feature: CRC-32 of its UTF-8 bytes modulo ``buckets``."""
    return zlib.crc32(feature.encode("utf-8")) % buckets


def title_tokens(title: str, buckets: int = DEFAULT_BUCKETS, max_tokens: int = MAX_TOKENS) -> np.ndarray:
    """Bucket ids (int64) of a title's first ``max_tokens`` distinct features."""
    ids = [hash_feature(feature, buckets) for feature in title_features(title)[:max_tokens]]
    return np.asarray(ids, dtype=np.int64)


def has_titles(titles: Sequence[str] | None) -> bool:
    """Whether any item has a non-blank title."""
    return titles is not None and any(title and title.strip() for title in titles)


@dataclass
class HashedTitles:
    """Every item's bucket ids as CSR arrays over item ids +1 (row 0 = padding, no tokens):
    the tokens of item id ``i`` are ``token_ids[offsets[i]:offsets[i + 1]]``."""

    token_ids: np.ndarray  # int64 [T]
    offsets: np.ndarray  # int64 [num_items + 2]
    buckets: int

    @classmethod
    def build(
        cls, titles: Sequence[str], buckets: int = DEFAULT_BUCKETS, max_tokens: int = MAX_TOKENS
    ) -> HashedTitles:
        rows = [np.zeros(0, dtype=np.int64)] + [title_tokens(t or "", buckets, max_tokens) for t in titles]
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        token_ids = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
        return cls(token_ids, offsets, buckets)


def sentence_model_encoder(path: str | Path) -> TitleEncoder:
    """The ``encode`` of a local sentence-transformers model at ``path`` (never downloads)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--text-model: no local sentence-embedding model at {path}")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise RuntimeError(
            "--text-model needs the 'sentence-transformers' package, which is not installed "
            "(pip install sentence-transformers); or train with the built-in hashed text encoder"
        ) from error
    model = SentenceTransformer(str(path), device="cpu", local_files_only=True)

    def encode(titles: list[str]) -> np.ndarray:
        return np.asarray(model.encode(titles, batch_size=256, show_progress_bar=False), dtype=np.float32)

    return encode


def encode_titles(titles: Sequence[str], encoder: TitleEncoder) -> tuple[np.ndarray, np.ndarray]:
    """([num_items + 1, E] float32 vectors, [num_items + 1] float32 has-title mask) over item ids +1;
    items without a title (and row 0) get zeros and mask 0."""
    present = [i for i, title in enumerate(titles) if title and title.strip()]
    encoded = np.asarray(encoder([titles[i] for i in present]), dtype=np.float32) if present else None
    width = encoded.shape[1] if encoded is not None else 1
    vectors = np.zeros((len(titles) + 1, width), dtype=np.float32)
    mask = np.zeros(len(titles) + 1, dtype=np.float32)
    if encoded is not None:
        if encoded.shape[0] != len(present):
            raise ValueError(f"text encoder returned {encoded.shape[0]} vectors for {len(present)} titles")
        rows = np.asarray(present, dtype=np.int64) + 1
        vectors[rows] = encoded
        mask[rows] = 1.0
    return vectors, mask
