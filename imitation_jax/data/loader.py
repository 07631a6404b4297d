"""Deterministic, random-access batches of packed rows for each process.

Global batch `step` is a pure function of (seed, step): the epoch is `step // batches_per_epoch`,
each epoch is its own grain shuffle of the row indices (grain combines the seed with the epoch),
and each process takes its contiguous slice of that global batch. Nothing is iterated, so resuming
at a checkpointed step needs only the step, and every process agrees on the global batch without
talking to the others.
"""

from __future__ import annotations

from collections.abc import Iterator

import grain
import numpy as np

from imitation_jax.data.rows import Rows


class BatchLoader:
    def __init__(self, rows: Rows, global_batch_size: int, *, seed: int, shuffle: bool = True,
                 process_index: int = 0, process_count: int = 1,
                 drop_remainder: bool = True):
        """drop_remainder=True (training): each epoch yields len(rows) // global_batch_size full
        batches and the rows left over differ from epoch to epoch. False: the last batch of an
        epoch is padded with all-zero-mask rows (and fewer rows than one batch are fine)."""
        if global_batch_size < 1:
            raise ValueError(f"global batch size must be positive, got {global_batch_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if global_batch_size % process_count:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                             f"{process_count} processes")
        if len(rows) == 0:
            raise ValueError("no rows to load (every example was dropped, or the data is empty)")
        if drop_remainder and len(rows) < global_batch_size:
            raise ValueError(f"only {len(rows)} packed rows, but one global batch needs "
                             f"{global_batch_size}: add data or lower the global batch size")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        self.rows = rows
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.process_index = process_index
        self.process_count = process_count
        self.drop_remainder = drop_remainder
        # ds[epoch * len(rows) + i] is row index i of that epoch's permutation.
        order = grain.MapDataset.range(len(rows))
        self._order = order.shuffle(seed=seed) if shuffle else order

    @property
    def batches_per_epoch(self) -> int:
        n, b = len(self.rows), self.global_batch_size
        return n // b if self.drop_remainder else -(-n // b)

    def _local_positions(self, batch_in_epoch: int) -> np.ndarray:
        """Positions within an epoch of this process's rows of a global batch."""
        start = batch_in_epoch * self.global_batch_size + self.process_index * self.local_batch_size
        return np.arange(start, start + self.local_batch_size)

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch `step`: (local_batch_size, seq_len) arrays."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        epoch, batch = divmod(step, self.batches_per_epoch)
        n = len(self.rows)
        positions = self._local_positions(batch)
        indices = np.array([self._order[epoch * n + int(p)] if p < n else -1 for p in positions],
                           np.int64)
        return self.rows.take(indices)

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Every row once, in order, unshuffled; the last batch padded with zero-mask rows."""
        n = len(self.rows)
        for batch in range(-(-n // self.global_batch_size)):
            positions = self._local_positions(batch)
            yield self.rows.take(np.where(positions < n, positions, -1))
