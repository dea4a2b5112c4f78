"""The compiled kernels' shared pieces: the hash table and ``isin`` agree with NumPy on random
integer arrays (negative, repeated, int32 and int64, empty, a full table)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from recsys.jit import hash_slot, hash_table, isin, kernel


def test_isin_matches_numpy_on_random_integer_arrays() -> None:
    rng = np.random.default_rng(0)
    for case in range(500):
        dtype = np.int32 if case % 2 else np.int64
        span = int(rng.choice([3, 50, 10_000, 2**40 if dtype == np.int64 else 2**30]))
        values = rng.integers(-span, span, int(rng.integers(0, 300))).astype(dtype)
        test = rng.integers(-span, span, int(rng.integers(0, 60))).astype(dtype)
        if len(values) and len(test) and case % 3 == 0:
            test[: len(test) // 2] = rng.choice(values, len(test) // 2)  # many hits
        assert np.array_equal(isin(values, test), np.isin(values, test)), case


def test_a_table_filled_to_its_load_limit_finds_every_key() -> None:
    keys, slots, shift = hash_table(64)
    assert len(slots) == 128  # load factor 1/2: probing chains form
    items = [7 + n * (1 << 40) for n in range(61)] + [-1, 0, -(2**62)]
    for position, item in enumerate(items):
        slot = hash_slot(keys, slots, shift, item)
        assert slots[slot] < 0
        keys[slot], slots[slot] = item, position
    for position, item in enumerate(items):
        assert slots[hash_slot(keys, slots, shift, item)] == position
    assert slots[hash_slot(keys, slots, shift, 8)] < 0


def test_kernels_take_read_only_views_of_wire_bytes() -> None:
    values = np.frombuffer(np.arange(10, dtype=np.int64).tobytes(), dtype=np.int64)
    test = np.frombuffer(np.array([3, 30], np.int64).tobytes(), dtype=np.int64)
    assert not values.flags.writeable and not test.flags.writeable
    assert np.flatnonzero(isin(values, test)).tolist() == [3]


def test_a_kernel_without_a_writable_cache_compiles_for_the_process_and_warns(caplog) -> None:
    namespace: dict = {}
    exec("def add_one(x):\n    return x + 1\n", namespace)  # no source file: numba has nowhere to cache
    with caplog.at_level("WARNING", logger="recsys.jit"):
        add_one = kernel("i8(i8)")(namespace["add_one"])
    assert add_one(41) == 42
    assert "without a disk cache" in caplog.text


def test_importing_the_kernels_loads_what_their_first_call_needs() -> None:
    # numba's typeof checks each array against numpy.ma, which NumPy imports lazily: without it
    # the first kernel call in a process (a service's first request) paid that import.
    code = "import sys, recsys.jit; print('numpy.ma' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"
