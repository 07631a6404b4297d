"""The prefetching batch iterator: the same batches in the same order as reading in the loop, a
reader's error raised at the step it belongs to, and the wait time accounted per step."""

from __future__ import annotations

import time

import numpy as np
import pytest

from imitation_jax.train.prefetch import DevicePrefetch


def _host(n, fail_at=None, delay=0.0):
    for i in range(n):
        if i == fail_at:
            raise OSError(f"unreadable batch {i}")
        time.sleep(delay)
        yield {"x": np.full((2, 3), i)}


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetch_gives_the_same_batches_in_order(depth):
    placed = []
    it = DevicePrefetch(_host(6), lambda b: placed.append(int(b["x"][0, 0])) or b["x"] * 10, depth)
    got = [int(next(it)[0, 0]) for _ in range(6)]
    it.close()
    assert got == [0, 10, 20, 30, 40, 50]
    assert placed == list(range(6))  # each batch placed once, in order


def test_a_reader_error_is_raised_at_its_own_step():
    it = DevicePrefetch(_host(5, fail_at=2), lambda b: b, depth=2)
    assert int(next(it)["x"][0, 0]) == 0 and int(next(it)["x"][0, 0]) == 1
    with pytest.raises(OSError, match="unreadable batch 2"):
        next(it)
    it.close()


def test_prefetch_hides_reading_behind_the_step():
    """With a 20 ms reader and a 40 ms step, the loop waits ~20 ms a step without prefetch and
    almost nothing with it (after the first batch)."""
    waits = {}
    for depth in (0, 2):
        it = DevicePrefetch(_host(8, delay=0.02), lambda b: b, depth)
        next(it)
        it.mean_wait()  # the first batch is always waited for
        for _ in range(6):
            time.sleep(0.04)  # the device step
            next(it)
        waits[depth] = it.mean_wait()
        it.close()
    assert waits[0] > 0.015 and waits[2] < 0.005, waits
