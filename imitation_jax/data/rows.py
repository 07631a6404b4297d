"""Fixed-length training rows from tokenized examples: next-token shift, truncation, packing.

The shift happens per example before packing (inputs = ids[:-1], targets = ids[1:],
mask = loss_mask[1:]), so no target ever belongs to another example. Packed examples are told apart
by `segment_ids` (1, 2, 3, ... within a row; 0 is padding), which the model turns into a
block-diagonal attention mask, and `positions` restart at 0 in each segment.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from imitation_jax.data.templates import Example

FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class PackStats:
    examples: int  # examples given
    rows: int
    truncated: int  # examples cut to seq_len
    dropped: int  # examples with no trained token left (after truncation), not in any row
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
    """N rows of seq_len. loss_mask is float32 so it multiplies token losses directly."""

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
                  pack: bool = True) -> Rows:
    """Shifts, truncates and places examples into rows of `seq_len`.

    pack=True: greedy in order — an example joins the current row if it fits, else starts a new
    one. pack=False: one example per row. An example longer than seq_len (after the shift) is cut
    to seq_len; one left with no trained token is dropped. Both are counted in `Rows.stats`.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    n_examples = truncated = dropped = 0
    rows: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
    used = seq_len  # tokens in the current row; "full" so the first example opens a row
    for ex in examples:
        n_examples += 1
        inputs, targets, mask = ex.ids[:-1], ex.ids[1:], ex.loss_mask[1:]
        if len(inputs) > seq_len:
            truncated += 1
            inputs, targets, mask = inputs[:seq_len], targets[:seq_len], mask[:seq_len]
        if not mask.any():
            dropped += 1
            continue
        if not pack or used + len(inputs) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((inputs, targets, mask))
        used += len(inputs)

    n = len(rows)
    out = {
        "inputs": np.full((n, seq_len), pad_id, np.int32),
        "targets": np.full((n, seq_len), pad_id, np.int32),
        "loss_mask": np.zeros((n, seq_len), np.float32),
        "segment_ids": np.zeros((n, seq_len), np.int32),
        "positions": np.zeros((n, seq_len), np.int32),
    }
    for r, row in enumerate(rows):
        start = 0
        for segment, (inputs, targets, mask) in enumerate(row, start=1):
            end = start + len(inputs)
            out["inputs"][r, start:end] = inputs
            out["targets"][r, start:end] = targets
            out["loss_mask"][r, start:end] = mask
            out["segment_ids"][r, start:end] = segment
            out["positions"][r, start:end] = np.arange(len(inputs))
            start = end
    stats = PackStats(
        examples=n_examples, rows=n, truncated=truncated, dropped=dropped,
        trained_tokens=int(out["loss_mask"].sum()),
        tokens=int((out["segment_ids"] > 0).sum()), seq_len=seq_len)
    return Rows(**out, pad_id=pad_id, stats=stats)
