"""Deterministic, random-access batches of packed rows for each process.

Global batch `step` is a pure function of (seed, step): the epoch is `step // batches_per_epoch`,
each epoch is its own grain shuffle of the row indices (grain's index shuffle, keyed by the seed
and the epoch), and each process reads only its contiguous slice of that global batch (its rows
of the ArrayRecord files, nothing else). Nothing is iterated, so every process agrees on the
global batch without talking to the others, and **the iterator state is the step**:
`loader.state(step)` is a small JSON-able dict (step plus what must not change: seed, batch
size, number of rows and the data fingerprint) for the checkpoint, and `loader.restore(state)`
checks it against the current data and returns the step to continue from. `iterator(step)`
gives the same batches as a prefetching Python iterator with `get_state` / `set_state`.

A row source is anything with `len()`, `seq_len`, `pad_id`, `take(indices) -> dict of [B, T]
arrays` (index -1: a padding row with no loss), `trained_per_row`, `tokens_per_row`, `stats` and
`fingerprint`: in-memory `Rows`, a prepared set's `PreparedSplit`, or a `Subset` of either.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from collections.abc import Iterator

import grain
import numpy as np

from imitation_jax.data.packing import PackStats


def shuffled_order(n: int, seed: int) -> np.ndarray:
    """A fixed permutation of range(n) (grain's index shuffle)."""
    ds = grain.MapDataset.range(n).shuffle(seed=seed)
    return np.fromiter((ds[i] for i in range(n)), np.int64, n)


class Subset:
    """The rows `rows` of a source, as a source."""

    def __init__(self, source, rows: np.ndarray, label: str = "subset"):
        self.source = source
        self.rows = np.asarray(rows, np.int64)
        self.seq_len, self.pad_id = source.seq_len, source.pad_id
        self.trained_per_row = np.asarray(source.trained_per_row)[self.rows]
        self.tokens_per_row = np.asarray(source.tokens_per_row)[self.rows]
        per_row = getattr(source, "examples_per_row", None)
        self.examples_per_row = None if per_row is None else np.asarray(per_row)[self.rows]
        digest = hashlib.sha256(self.rows.tobytes()).hexdigest()[:8]
        self.fingerprint = f"{source.fingerprint}:{label}:{digest}"
        self.stats = PackStats(examples=-1 if self.examples_per_row is None
                               else int(self.examples_per_row.sum()), rows=len(self.rows), truncated=0, dropped=0,
                               trained_tokens=int(self.trained_per_row.sum()),
                               tokens=int(self.tokens_per_row.sum()), seq_len=self.seq_len)

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, indices) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        return self.source.take(np.where(indices < 0, -1, self.rows[np.maximum(indices, 0)]))


def cap_trained_tokens(source, max_tokens: int, seed: int = 0) -> Subset:
    """At most `max_tokens` trained tokens of `source`: the longest prefix of a fixed row order
    (grain shuffle by `seed`) that fits. Prefixes of one order, so smaller caps are subsets of
    larger ones (a data-size sweep trains on nested sets)."""
    order = shuffled_order(len(source), seed)
    cum = np.cumsum(np.asarray(source.trained_per_row)[order])
    k = int(np.searchsorted(cum, max_tokens, side="right"))
    if k == 0:
        raise ValueError(f"max_train_tokens={max_tokens} is less than the trained tokens of one "
                         f"row ({int(cum[0]) if len(cum) else 0})")
    return Subset(source, order[:k], label=f"max{max_tokens}")


class BatchLoader:
    def __init__(self, rows, global_batch_size: int, *, seed: int, shuffle: bool = True,
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
        self.seed = seed
        self.shuffle = shuffle
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

    def indices_at(self, step: int) -> np.ndarray:
        """Row indices of this process's slice of global batch `step` (-1: padding)."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        epoch, batch = divmod(step, self.batches_per_epoch)
        n = len(self.rows)
        return np.array([self._order[epoch * n + int(p)] if p < n else -1
                         for p in self._local_positions(batch)], np.int64)

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch `step`: (local_batch_size, seq_len) arrays."""
        return self.rows.take(self.indices_at(step))

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Every row once, in order, unshuffled; the last batch padded with zero-mask rows."""
        n = len(self.rows)
        for batch in range(-(-n // self.global_batch_size)):
            positions = self._local_positions(batch)
            yield self.rows.take(np.where(positions < n, positions, -1))

    # ------------------------------------------------------------ checkpointable state

    def state(self, step: int) -> dict:
        """The iterator state to checkpoint before running global batch `step`."""
        return {"step": int(step), "seed": self.seed, "shuffle": self.shuffle,
                "global_batch_size": self.global_batch_size, "rows": len(self.rows),
                "fingerprint": str(getattr(self.rows, "fingerprint", ""))}

    def restore(self, state: dict) -> int:
        """The step to continue from; ValueError if the state belongs to other data or settings."""
        mine = self.state(int(state.get("step", 0)))
        for key in ("seed", "shuffle", "global_batch_size", "rows", "fingerprint"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"the saved data iterator state has {key}={state[key]!r} but this "
                                 f"run has {mine[key]!r}: the data or its settings changed")
        return mine["step"]

    def iterator(self, step: int = 0, prefetch: int = 2) -> BatchIterator:
        return BatchIterator(self, step, prefetch)


class BatchIterator:
    """batch_at(step), batch_at(step + 1), ... read `prefetch` batches ahead in a thread."""

    def __init__(self, loader: BatchLoader, step: int = 0, prefetch: int = 2):
        self.loader, self.step, self.prefetch = loader, step, prefetch
        self._pool = concurrent.futures.ThreadPoolExecutor(1) if prefetch > 0 else None
        self._ahead: dict[int, concurrent.futures.Future] = {}

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._pool is None:
            batch = self.loader.batch_at(self.step)
        else:
            for s in range(self.step, self.step + self.prefetch + 1):
                if s not in self._ahead:
                    self._ahead[s] = self._pool.submit(self.loader.batch_at, s)
            batch = self._ahead.pop(self.step).result()
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return self.loader.state(self.step)

    def set_state(self, state: dict) -> None:
        self.step = self.loader.restore(state)
        self._ahead.clear()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
