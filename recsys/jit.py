"""Compiled kernels for the per-request loops that NumPy can only express as many small array passes.

A request's recall merge and its rank features each cost 20-30 NumPy calls on a few hundred
values: at that size every call is a few microseconds of fixed overhead, so most of the time is
dispatch, not arithmetic. :func:`kernel` compiles a plain loop over the arrays instead (numba's
nopython mode: no Python objects, GIL released). Compiled code is cached on disk (next to the
source, or under ``NUMBA_CACHE_DIR`` where that is not writable, as in the images), so only the
first process after an install pays the compile (about a second per kernel; where no cache folder
is writable, every process compiles, with a warning). Each kernel is compiled for one signature
when its module is imported, so nothing compiles on a request.

Also here: a small open-addressing hash table (:func:`hash_table`, :func:`hash_slot`) that
kernels use to map a catalog index to a position ("have I seen this item, and where").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import numba
import numpy as np

# numba's typeof asks numpy.ma about every array, which NumPy imports lazily: loaded here, at import,
# rather than by a service's first request (~15 ms).
import numpy.ma
from numba import types
from numba.core import sigutils

Function = TypeVar("Function", bound=Callable)
log = logging.getLogger(__name__)

# Fibonacci hashing: multiply by 2^64 / golden ratio, keep the top bits.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def kernel(signature: str) -> Callable[[Function], Function]:
    """Compile the decorated function for exactly ``signature`` (numba's notation) when its module
    is imported: nopython mode, cached on disk, releasing the GIL; division by zero gives inf/nan
    as in NumPy instead of raising. A call with other dtypes is a TypeError, never a compile on
    the request path: callers convert their arrays first."""

    arguments, result = sigutils.normalize_signature(signature)
    # Array arguments typed read-only: such a kernel takes read-only arrays (zero-copy views of
    # wire bytes) and writable ones alike, and cannot write into its inputs.
    readonly = [a.copy(readonly=True) if isinstance(a, types.Array) else a for a in arguments]

    def compile_(function: Function) -> Function:
        compile_options = {"nogil": True, "error_model": "numpy"}
        try:
            return numba.njit(result(*readonly), cache=True, **compile_options)(function)
        except RuntimeError as error:  # no writable cache folder: compile for this process only
            log.warning("kernel %s compiled without a disk cache: %s", function.__qualname__, error)
            return numba.njit(result(*readonly), cache=False, **compile_options)(function)

    return compile_


@kernel("Tuple((i8[:], i8[:], i8))(i8)")
def hash_table(size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """An empty table for up to ``size`` keys: (keys int64, values int64 with -1 = empty slot,
    shift). Load factor at most 1/2."""
    bits = 4
    while (1 << bits) < 2 * size:
        bits += 1
    return np.zeros(1 << bits, np.int64), np.full(1 << bits, -1, np.int64), 64 - bits


@kernel("i8(i8[:], i8[:], i8, i8)")
def hash_slot(keys: np.ndarray, values: np.ndarray, shift: int, key: int) -> int:
    """The slot of ``key`` in the table: where it is, or the empty slot where it would go."""
    mask = len(keys) - 1
    slot = np.int64((np.uint64(key) * _GOLDEN) >> np.uint64(shift))
    while values[slot] >= 0 and keys[slot] != key:
        slot = (slot + 1) & mask
    return slot


def isin(values: np.ndarray, test: np.ndarray) -> np.ndarray:
    """``np.isin(values, test)`` for integer arrays, by hashing ``test`` (no sort): bool mask."""
    return _isin(np.asarray(values, np.int64).reshape(-1), np.asarray(test, np.int64).reshape(-1))


@kernel("b1[:](i8[:], i8[:])")
def _isin(values: np.ndarray, test: np.ndarray) -> np.ndarray:
    found = np.zeros(len(values), np.bool_)
    if len(test) == 0:
        return found
    keys, slots, shift = hash_table(len(test))
    for position in range(len(test)):
        slot = hash_slot(keys, slots, shift, test[position])
        keys[slot] = test[position]
        slots[slot] = position
    for position in range(len(values)):
        found[position] = slots[hash_slot(keys, slots, shift, values[position])] >= 0
    return found
