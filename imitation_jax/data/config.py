"""Data settings (`data.*`): which data a run trains on and how raw files are prepared."""

from __future__ import annotations

import dataclasses
from typing import Optional

from imitation_jax.data.cleaning import CleaningConfig
from imitation_jax.data.packing import PACKING
from imitation_jax.data.templates import TEMPLATE_NAMES

DEFAULT_TEMPLATE = "koala"
DEFAULT_SEQ_LEN = 512
DEFAULT_PACKING = "best_fit"


@dataclasses.dataclass
class DataConfig:
    path: Optional[str] = None  # a prepared set (imitation-jax prepare ... --out DIR); keys below that
    # are set must match how it was prepared. Without it, raw files are prepared into cache_dir:
    train_files: list[str] = dataclasses.field(default_factory=list)  # PATH or PATH:format=F,weight=W|count=N
    eval_files: list[str] = dataclasses.field(default_factory=list)  # held-out split; empty: none
    eval_fraction: float = 0.0  # of the raw training conversations, held out for eval
    tokenizer: Optional[str] = None  # SentencePiece .model, or a directory with tokenizer.model/tokenizer.json
    template: Optional[str] = None  # koala (default) | vicuna | llama2-chat | llama3 | chatml | hf
    seq_len: Optional[int] = None  # row length (default 512); with data.path: the set's
    packing: Optional[str] = None  # best_fit (default) | first_fit | none (one conversation per row)
    turn_tokens: bool = False  # add special tokens marking each user and model turn
    format: str = "auto"  # auto | sharegpt | openai | alpaca | text (raw files that do not say)
    skip_invalid: bool = False  # skip (and count) invalid records instead of stopping
    cleaning: CleaningConfig = dataclasses.field(default_factory=CleaningConfig)
    workers: Optional[int] = None  # tokenizing processes when preparing raw files (None: auto)
    cache_dir: Optional[str] = None  # where raw files are prepared (default $IMITATION_JAX_CACHE or ~/.cache/imitation_jax)
    max_train_tokens: Optional[int] = None  # train on a fixed subset of at most N trained tokens
    seed: int = 0  # shuffle order


def check_data_config(cfg: Any) -> None:
    """Config-time checks of `DataConfig` (no file is read); ValueError names the key."""
    if not cfg.path and not cfg.train_files:
        raise ValueError("no training data: set data.path (a directory made by `imitation-jax "
                         "prepare`) or data.train_files")
    if cfg.eval_files and not cfg.train_files:
        raise ValueError("data.eval_files needs data.train_files")
    if not cfg.path and not cfg.tokenizer:
        raise ValueError("data.tokenizer is required with data.train_files")
    if cfg.template is not None and cfg.template not in TEMPLATE_NAMES:
        raise ValueError(f"data.template: unknown chat template {cfg.template!r}; known: "
                         f"{', '.join(TEMPLATE_NAMES)}")
    if cfg.packing is not None and cfg.packing not in PACKING:
        raise ValueError(f"data.packing={cfg.packing!r} is not one of {', '.join(PACKING)}")
    if cfg.seq_len is not None and cfg.seq_len < 2:
        raise ValueError(f"data.seq_len={cfg.seq_len} must be at least 2")
    if not 0 <= cfg.eval_fraction < 1:
        raise ValueError(f"data.eval_fraction={cfg.eval_fraction} must be in [0, 1)")
    if cfg.max_train_tokens is not None and cfg.max_train_tokens < 1:
        raise ValueError(f"data.max_train_tokens={cfg.max_train_tokens} must be positive")
