"""A served result as the public API's items (``ScoredItem``), with explanations when debugging."""

from __future__ import annotations

from recsys.scenario.context import RecommendResult
from recsys.serving.wire import flags_to_mask
from recsys.sources import RECALL_SOURCES
from recsys.v1 import gateway_pb2


def scored_items(result: RecommendResult, debug: bool) -> list[gateway_pb2.ScoredItem]:
    """The wire form of ``result`` (explanations and per-source detail when ``debug``)."""
    candidates = result.candidates
    sources = [RECALL_SOURCES[s] for s in candidates.sources.tolist()]
    scores = candidates.scores.tolist()
    item_ids = result.item_ids
    if not debug:
        return [
            gateway_pb2.ScoredItem(item_id=item_id, score=score, source=source)
            for item_id, score, source in zip(item_ids, scores, sources, strict=True)
        ]
    assert result.catalog is not None
    known = result.history.known
    masks = flags_to_mask(candidates.source_flags, len(RECALL_SOURCES)).tolist()
    source_scores = candidates.source_scores.tolist()
    rank_scores = None if candidates.rank_scores is None else candidates.rank_scores.tolist()
    attended = None if candidates.attended is None else candidates.attended.tolist()
    items = []
    for row, item_id in enumerate(item_ids):
        produced = {
            name: source_scores[row][column]
            for column, name in enumerate(RECALL_SOURCES)
            if masks[row][column]
        }
        rank_score = rank_scores[row] if rank_scores is not None else None
        if rank_score is not None and rank_score != rank_score:  # NaN: beyond max_candidates
            rank_score = None
        attended_ids = (
            [result.history.item_ids[known[p]] for p in attended[row] if 0 <= p < len(known)]
            if attended is not None
            else []
        )
        bid = float(result.catalog.item_bid[candidates.items[row]])
        scored = gateway_pb2.ScoredItem(
            item_id=item_id,
            score=scores[row],
            source=sources[row],
            explanation=explanation(produced or {sources[row]: 0.0}, rank_score, attended_ids, bid),
            recall_score=float(candidates.recall_scores[row]),
            sources=sorted(produced) or [sources[row]],
            attended_item_ids=attended_ids,
        )
        if rank_score is not None:
            scored.rank_score = rank_score
        items.append(scored)
    return items


def explanation(
    source_scores: dict[str, float], rank_score: float | None, attended: list[str], bid: float
) -> str:
    """A one-line human reason for a debug response."""
    sources = ", ".join(
        f"{source} {score:.3f}" for source, score in sorted(source_scores.items(), key=lambda kv: -kv[1])
    )
    parts = [f"recall: {sources}"]
    if rank_score is not None:
        parts.append(f"rank score {rank_score:.3f}")
    if attended:
        parts.append(f"attended to {', '.join(attended)}")
    if bid > 0:
        parts.append(f"bid {bid:.3f}")
    return "; ".join(parts)
