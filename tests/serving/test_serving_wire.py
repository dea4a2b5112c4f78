"""The packed internal wire: round trips, validation naming the field, catalog fingerprints."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.serving.validation import InvalidArgument
from recsys.serving.wire import (
    FLAGS,
    INDEX,
    SCORE,
    CatalogMismatch,
    catalog_fingerprint,
    check_catalog,
    flags_to_mask,
    mask_to_flags,
    pack,
    unpack,
    unpack_indices,
    unpack_scores,
)


def test_arrays_round_trip_exactly():
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 1_000_000, 300).astype(np.int64)
    scores = rng.normal(size=(300, 4)).astype(np.float32)
    assert np.array_equal(unpack(pack(indices, INDEX), INDEX, "items"), indices)
    assert np.array_equal(unpack(pack(scores, SCORE), SCORE, "scores").reshape(300, 4), scores)
    mask = rng.random((300, 4)) < 0.5
    flags = mask_to_flags(mask)
    assert flags.dtype == np.uint8
    assert np.array_equal(flags_to_mask(unpack(flags.tobytes(), FLAGS, "flags"), 4), mask)


def test_empty_arrays_round_trip():
    assert len(unpack(pack([], INDEX), INDEX, "items", 0)) == 0
    assert len(mask_to_flags(np.zeros((0, 4), bool))) == 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: unpack(b"\x00\x00\x00", INDEX, "items"), "items: 3 bytes"),
        (lambda: unpack(pack([1, 2], INDEX), INDEX, "items", 3), "items: must have 3 values, got 2"),
        (lambda: unpack_indices(pack([0, 5], INDEX), "items", 5), "items: catalog index 5 is outside 0..4"),
        (lambda: unpack_indices(pack([-1], INDEX), "items", 5), "items: catalog index -1"),
        (lambda: unpack_scores(pack([1.0, np.nan], SCORE), "scores", 2), "scores: must be finite"),
    ],
)
def test_malformed_arrays_are_invalid_arguments_naming_the_field(call, message):
    with pytest.raises(InvalidArgument) as error:
        call()
    assert str(error.value).startswith(message)


def test_the_fingerprint_depends_on_ids_and_their_order():
    ids = ["a", "b", "c"]
    assert catalog_fingerprint(ids) == catalog_fingerprint(list(ids))
    assert catalog_fingerprint(ids) != catalog_fingerprint(["b", "a", "c"])
    assert catalog_fingerprint(ids) != catalog_fingerprint(["a", "b"])
    assert catalog_fingerprint(["ab", "c"]) != catalog_fingerprint(["a", "bc"])
    check_catalog(catalog_fingerprint(ids), catalog_fingerprint(ids))
    with pytest.raises(CatalogMismatch):
        check_catalog(catalog_fingerprint(ids), catalog_fingerprint(["a"]))


def test_index_and_score_checks_agree_with_numpy_on_random_arrays():
    rng = np.random.default_rng(3)
    extremes = np.asarray([np.iinfo(np.int32).min, -1, 0, np.iinfo(np.int32).max], np.int32)
    for _ in range(500):
        num_items = int(rng.integers(1, 50))
        values = rng.integers(-3, num_items + 3, size=int(rng.integers(0, 20))).astype(np.int32)
        if rng.random() < 0.2 and len(values):
            values[rng.integers(len(values))] = rng.choice(extremes)
        outside = values[(values < 0) | (values >= num_items)]
        if len(outside):
            with pytest.raises(InvalidArgument, match=f"catalog index {outside[0]} is outside"):
                unpack_indices(pack(values, INDEX), "items", num_items)
        else:
            assert unpack_indices(pack(values, INDEX), "items", num_items).tolist() == values.tolist()
        scores = rng.normal(size=len(values)).astype(np.float32)
        if rng.random() < 0.3 and len(scores):
            scores[rng.integers(len(scores))] = rng.choice([np.nan, np.inf, -np.inf])
        if np.isfinite(scores).all():
            assert unpack_scores(pack(scores, SCORE), "scores", len(scores)).tolist() == scores.tolist()
        else:
            with pytest.raises(InvalidArgument, match="scores: must be finite"):
                unpack_scores(pack(scores, SCORE), "scores", len(scores))
