"""Packing tokenized examples into fixed-length rows, and turning packed rows into model inputs.

An example of n ids occupies n - 1 positions of a row: inputs = ids[:-1], targets = ids[1:],
loss_mask = mask[1:] (the shift happens per example, so no target ever belongs to another one).
Examples in a row are told apart by `segment_ids` (1, 2, 3, ... ; 0 is padding), which the model
turns into a block-diagonal attention mask, and `positions` restart at 0 in each segment. Padding
has loss_mask 0, so it carries no loss.

`pack(lengths, seq_len, method)` assigns examples to rows:

  * `best_fit` (default): best-fit decreasing: longest example first, each into the open row with
    the least room that still fits it (the oldest such row). O(n log n) with a bucket per remaining room, so millions of
    examples pack in seconds (fill figures: docs/benchmarks.md).
  * `first_fit`: first-fit decreasing (the first row with room, via a max segment tree).
  * `none`: one example per row (plain padded rows).

A packed row is stored compactly as (tokens, loss_mask, lengths): the concatenated ids of its
examples, their masks and each example's length; `assemble` expands rows into the model's
`FIELDS`. A set prepared with the teacher's log-probabilities adds a fourth item, the sparse
targets (positions into tokens, ids [P, K], logprobs [P, K]), which `assemble(..., teacher_k=K)`
expands into `TEACHER_FIELDS` (B, T, K) aligned with `targets`: id -1 (logprob NEG_INF) where
there is no target. `Rows` holds assembled rows in memory (tests, small sets); prepared sets are read from
ArrayRecord files (`storage.py`) through the same `take(indices)` interface.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

from imitation_jax.data.teacher_logprobs import NEG_INF
from imitation_jax.data.templates import Example

FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")
TEACHER_FIELDS = ("teacher_ids", "teacher_logprobs")
PACKING = ("best_fit", "first_fit", "none")

PackedRow = tuple  # tokens int32, loss_mask bool, lengths int32[, (positions, ids, logprobs)]


def pack(lengths: Sequence[int] | np.ndarray, seq_len: int, method: str = "best_fit"
         ) -> list[list[int]]:
    """Example indices of each row; `lengths` are row positions (ids - 1), each <= seq_len."""
    lengths = np.asarray(lengths, np.int64)
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if method not in PACKING:
        raise ValueError(f"packing {method!r} is not one of {', '.join(PACKING)}")
    if len(lengths) and (lengths.max() > seq_len or lengths.min() < 1):
        raise ValueError(f"example lengths must be in [1, {seq_len}], got "
                         f"[{lengths.min()}, {lengths.max()}]")
    if method == "none":
        return [[i] for i in range(len(lengths))]
    order = np.argsort(-lengths, kind="stable")  # longest first; ties in input order
    return _best_fit(lengths, order, seq_len) if method == "best_fit" else \
        _first_fit(lengths, order, seq_len)


_assign = pack  # `pack_examples` has a parameter called pack


def _best_fit(lengths: np.ndarray, order: np.ndarray, seq_len: int) -> list[list[int]]:
    rows: list[list[int]] = []
    rooms: list[int] = []  # sorted distinct rooms (free positions) of open rows
    by_room: dict[int, collections.deque] = {}  # room -> open rows with that room, oldest first
    for i in order.tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(rooms, n)
        if k == len(rooms):
            r, room = len(rows), seq_len
            rows.append([])
        else:
            room = rooms[k]
            bucket = by_room[room]
            r = bucket.popleft()
            if not bucket:
                del rooms[k], by_room[room]
        rows[r].append(i)
        room -= n
        if room > 0:
            if room not in by_room:
                bisect.insort(rooms, room)
                by_room[room] = collections.deque()
            by_room[room].append(r)
    return rows


def _first_fit(lengths: np.ndarray, order: np.ndarray, seq_len: int) -> list[list[int]]:
    n_max = max(1, len(order))
    size = 1 << (n_max - 1).bit_length()
    tree = np.zeros(2 * size, np.int64)  # max room over each subtree; leaves = rows (0 = closed)
    rows: list[list[int]] = []
    for i in order.tolist():
        n = int(lengths[i])
        if tree[1] >= n:  # leftmost row with room >= n
            node = 1
            while node < size:
                node = 2 * node if tree[2 * node] >= n else 2 * node + 1
            r = node - size
        else:
            r = len(rows)
            rows.append([])
            node = size + r
            tree[node] = seq_len
        rows[r].append(i)
        tree[node] -= n
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return rows


def packed_rows(examples: Sequence[Example], assignment: Iterable[Sequence[int]],
                teachers: Sequence | None = None, teacher_k: int = 0) -> Iterable[PackedRow]:
    """Compact rows (tokens, loss_mask, lengths) from an assignment of examples to rows. With
    `teachers` (each example's `teacher_targets.Targets` or None) and `teacher_k`, a fourth item:
    the rows' sparse targets (positions into tokens, ids [P, K], logprobs [P, K]), K = teacher_k."""
    for members in assignment:
        exs = [examples[i] for i in members]
        row = (np.concatenate([e.ids for e in exs]).astype(np.int32),
               np.concatenate([e.loss_mask for e in exs]).astype(np.bool_),
               np.asarray([len(e) for e in exs], np.int32))
        if teachers is None:
            yield row
            continue
        pos, ids, lps = [np.zeros(0, np.int32)], [np.zeros((0, teacher_k), np.int32)], \
            [np.zeros((0, teacher_k), np.float32)]
        offset = 0
        for i, e in zip(members, exs):
            t = teachers[i]
            if t is not None:
                extra = ((0, 0), (0, teacher_k - t.ids.shape[1]))
                pos.append(t.positions + offset)
                ids.append(np.pad(t.ids, extra, constant_values=-1))
                lps.append(np.pad(t.logprobs, extra, constant_values=NEG_INF))
            offset += len(e)
        yield (*row, (np.concatenate(pos).astype(np.int32), np.concatenate(ids).astype(np.int32),
                      np.concatenate(lps).astype(np.float32)))


def row_counts(tokens: np.ndarray, loss_mask: np.ndarray, lengths: np.ndarray) -> tuple[int, int]:
    """(non-pad positions, trained positions) of a compact row."""
    first = np.zeros(len(tokens), np.bool_)
    first[np.cumsum(lengths) - lengths] = True
    return int(lengths.sum() - len(lengths)), int(loss_mask[~first].sum())


def assemble(rows: Sequence[PackedRow | None], seq_len: int, pad_id: int, teacher_k: int = 0
             ) -> dict[str, np.ndarray]:
    """Model inputs for compact rows; None gives an all-padding row (mask 0). teacher_k > 0 (a
    set with the teacher's log-probabilities): `TEACHER_FIELDS` too, (B, T, teacher_k)."""
    b = len(rows)
    out = {"inputs": np.full((b, seq_len), pad_id, np.int32),
           "targets": np.full((b, seq_len), pad_id, np.int32),
           "loss_mask": np.zeros((b, seq_len), np.float32),
           "segment_ids": np.zeros((b, seq_len), np.int32),
           "positions": np.zeros((b, seq_len), np.int32)}
    if teacher_k:
        out["teacher_ids"] = np.full((b, seq_len, teacher_k), -1, np.int32)
        out["teacher_logprobs"] = np.full((b, seq_len, teacher_k), NEG_INF, np.float32)
    for r, row in enumerate(rows):
        if row is None:
            continue
        tokens, mask, lengths = row[:3]
        lengths = np.asarray(lengths, np.int64)
        ends = np.cumsum(lengths)
        first = np.zeros(len(tokens), np.bool_)
        first[ends - lengths] = True
        last = np.zeros(len(tokens), np.bool_)
        last[ends - 1] = True
        n = int(ends[-1] - len(lengths))
        if n > seq_len:
            raise ValueError(f"a packed row holds {n} positions, more than seq_len {seq_len}")
        out["inputs"][r, :n] = tokens[~last]
        out["targets"][r, :n] = tokens[~first]
        out["loss_mask"][r, :n] = mask[~first]
        out["segment_ids"][r, :n] = np.repeat(np.arange(1, len(lengths) + 1), lengths - 1)
        starts = np.cumsum(lengths - 1) - (lengths - 1)
        out["positions"][r, :n] = np.arange(n) - np.repeat(starts, lengths - 1)
        if teacher_k and len(row) > 3:
            at, ids, lps = row[3]
            at = np.asarray(at, np.int64)
            # ids position c of example e (0-based) is predicted at row position c - e - 1
            example = np.searchsorted(ends, at, side="right")
            if len(at) and (first[at].any() or ids.shape[1] != teacher_k):
                raise ValueError("teacher targets at the first id of an example, or K != teacher_k")
            out["teacher_ids"][r, at - example - 1] = ids
            out["teacher_logprobs"][r, at - example - 1] = lps
    return out


@dataclasses.dataclass(frozen=True)
class PackStats:
    examples: int  # examples given
    rows: int
    truncated: int  # examples cut to seq_len + 1 ids
    dropped: int  # examples with no trained token (after truncation), in no row
    trained_tokens: int  # positions with loss_mask 1
    tokens: int  # non-padding positions
    seq_len: int

    @property
    def non_pad_fraction(self) -> float:
        return self.tokens / max(1, self.rows * self.seq_len)

    def as_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "non_pad_fraction": self.non_pad_fraction}


@dataclasses.dataclass(frozen=True)
class Rows:
    """N assembled rows of seq_len in memory. loss_mask is float32 so it multiplies token losses
    directly. Implements the row-source interface (`len`, `seq_len`, `pad_id`, `take`,
    `trained_per_row`, `tokens_per_row`, `fingerprint`) that the loader reads."""

    inputs: np.ndarray  # int32 [N, seq_len]
    targets: np.ndarray  # int32 [N, seq_len]
    loss_mask: np.ndarray  # float32 [N, seq_len], 1.0 where the target is trained
    segment_ids: np.ndarray  # int32 [N, seq_len], 0 = padding
    positions: np.ndarray  # int32 [N, seq_len]
    pad_id: int
    stats: PackStats

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def seq_len(self) -> int:
        return self.inputs.shape[1]

    @property
    def trained_per_row(self) -> np.ndarray:
        return self.loss_mask.sum(1).astype(np.int64)

    @property
    def tokens_per_row(self) -> np.ndarray:
        return (self.segment_ids > 0).sum(1).astype(np.int64)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for name in FIELDS:
            h.update(np.ascontiguousarray(getattr(self, name)).tobytes())
        return h.hexdigest()[:16]

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The rows at `indices` as a batch dict; index -1 gives an all-padding row (mask 0)."""
        indices = np.asarray(indices, np.int64)
        pad = indices < 0
        out = {}
        for name in FIELDS:
            batch = getattr(self, name)[np.where(pad, 0, indices)]
            if pad.any():
                batch[pad] = self.pad_id if name in ("inputs", "targets") else 0
            out[name] = batch
        return out


def pack_examples(examples: Iterable[Example], seq_len: int, pad_id: int,
                  pack: bool | str = True) -> Rows:
    """Examples -> assembled `Rows` in memory.

    `pack`: True (best_fit), False (none) or a method of `PACKING`. An example longer than
    seq_len + 1 ids is cut (counted as truncated); one left with no trained token is dropped.
    """
    method = "best_fit" if pack is True else "none" if pack is False else pack
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    kept: list[Example] = []
    n_examples = truncated = dropped = 0
    for ex in examples:
        n_examples += 1
        if len(ex) > seq_len + 1:
            truncated += 1
            ex = Example(ex.ids[:seq_len + 1], ex.loss_mask[:seq_len + 1])
        if len(ex) < 2 or not ex.loss_mask[1:].any():
            dropped += 1
            continue
        kept.append(ex)
    assignment = _assign([len(e) - 1 for e in kept], seq_len, method)
    out = assemble(list(packed_rows(kept, assignment)), seq_len, pad_id)
    stats = PackStats(examples=n_examples, rows=len(assignment), truncated=truncated,
                      dropped=dropped, trained_tokens=int(out["loss_mask"].sum()),
                      tokens=int((out["segment_ids"] > 0).sum()), seq_len=seq_len)
    return Rows(**out, pad_id=pad_id, stats=stats)
