"""Data settings of a run (`data.*`): which data it trains on, and how raw files are prepared.

The prepare settings (template, seq_len, packing, cleaning.*, ...) are declared once, in
`PrepareSettings` (imitation_jax.data.prepare); `DataConfig` extends it with what only training
uses, so `train` and `prepare` take the same `data.*` keys.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from imitation_jax.data.prepare import PrepareSettings
from imitation_jax.errors import DataError


@dataclasses.dataclass
class DataConfig(PrepareSettings):
    path: Optional[str] = None  # a prepared set (imitation-jax prepare ... --out DIR); the prepare
    # settings that are set must match how it was prepared. Without it, raw files are prepared into cache_dir:
    train_files: list[str] = dataclasses.field(default_factory=list)  # PATH or PATH:format=F,weight=W|count=N
    eval_files: list[str] = dataclasses.field(default_factory=list)  # held-out split; empty: none
    cache_dir: Optional[str] = None  # where raw files are prepared (default $IMITATION_JAX_CACHE or ~/.cache/imitation_jax)
    max_train_tokens: Optional[int] = None  # train on a fixed subset of at most N trained tokens
    seed: int = 0  # shuffle order of the training rows

    def validate(self) -> None:
        """Config-time checks (no file is read): the prepare settings', then training's own;
        DataError names the key."""
        super().validate()
        if not self.path and not self.train_files:
            raise DataError("no training data: set data.path (a directory made by `imitation-jax "
                            "prepare`) or data.train_files", "bad_option")
        if self.eval_files and not self.train_files:
            raise DataError("data.eval_files needs data.train_files", "bad_option")
        if not self.path and not self.tokenizer:
            raise DataError("data.tokenizer is required with data.train_files", "bad_option")
        if self.max_train_tokens is not None and self.max_train_tokens < 1:
            raise DataError(f"data.max_train_tokens={self.max_train_tokens} must be positive",
                            "bad_option")
