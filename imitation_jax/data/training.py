"""What training asks of the data package: `load_training_data(cfg.data)`.

Training reads a prepared set: `data.path=DIR` (made by `imitation-jax prepare`), or raw files in
`data.train_files` / `data.eval_files`, which are prepared first into a cache directory keyed by a
hash of the inputs (path, size, mtime), the tokenizer files and every prepare setting, so a second
run (or a second process) reuses it. A lock file serialises processes of one host preparing the
same key; on hosts without a shared filesystem each prepares its own identical copy.

`data.max_train_tokens` trains on a fixed subset of rows holding at most that many trained tokens
(prefixes of one fixed row order, so the sets of a data-size sweep are nested).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

from imitation_jax.data import storage
from imitation_jax.data.cleaning import CleaningConfig
from imitation_jax.data.loader import cap_trained_tokens
from imitation_jax.data.prepare import PrepareSettings, input_fingerprint, prepare, summary
from imitation_jax.data.readers import Source, check_readable
from imitation_jax.data.storage import PreparedSet
from imitation_jax.data.tokenizer import load_tokenizer
from imitation_jax.errors import DataError

# Prepare settings a config may state with data.path without being compared to the set's: the
# tokenizer is compared by fingerprint, and these do not decide the rows or were never compared.
_NOT_COMPARED = ("tokenizer", "format", "diversity_sample", "workers")


def _stated(cfg: Any) -> dict[str, Any]:
    """The prepare settings a DataConfig sets (unset: None or the default), as dotted keys."""
    stated = {}
    for f in dataclasses.fields(PrepareSettings):
        if f.name in _NOT_COMPARED:
            continue
        value = getattr(cfg, f.name)
        if f.name == "cleaning":
            given = value if isinstance(value, dict) else dataclasses.asdict(value)
            defaults = dataclasses.asdict(CleaningConfig())
            stated.update({f"cleaning.{k}": v for k, v in given.items() if defaults.get(k) != v})
        elif value != f.default:
            stated[f.name] = value
    return stated


def _check_against_set(cfg: Any, prepared: PreparedSet) -> None:
    """With data.path, every prepare setting the config states must be the one the set was
    prepared with (unset keys take the set's); raw files named too must be its inputs."""
    s, where = prepared.settings, prepared.directory
    for key, value in _stated(cfg).items():
        recorded = s
        for part in PrepareSettings.recorded_name(key).split("."):
            recorded = recorded.get(part) if isinstance(recorded, dict) else None
        if value != recorded:
            raise DataError(f"data.{key}={value!r} but {where} was prepared with {recorded!r}; "
                            f"leave data.{key} unset or prepare again", "config_mismatch")
    if cfg.train_files:
        recorded = [(f.get("split"), f["path"], f.get("weight"), f.get("count"))
                    for f in prepared.stats["input_files"]]
        given = [(split, os.path.abspath(src.path), src.weight, src.count)
                 for split, files in (("eval", cfg.eval_files), ("train", cfg.train_files))
                 for src in (Source.parse(x, cfg.format) for x in files)]
        if given != recorded:
            raise DataError(f"data.train_files/eval_files are not the inputs {where} was prepared "
                            f"from ({', '.join(r[1] for r in recorded)}); drop them to train on "
                            "the prepared set, or drop data.path to prepare them", "config_mismatch")
        for f in prepared.stats["input_files"]:
            try:
                st = os.stat(f["path"])
            except OSError:
                continue
            if (st.st_size, st.st_mtime_ns) != (f["size"], f["mtime_ns"]):
                print(f"warning: {f['path']} changed after {where} was prepared from it; "
                      "prepare again to use the new contents", flush=True)


def prepare_settings(cfg: Any) -> PrepareSettings:
    """The settings raw files named by a DataConfig are prepared with (tokenizer path absolute)."""
    settings = cfg.prepare_settings()
    settings.tokenizer = os.path.abspath(settings.tokenizer)
    return settings


def cache_root(cfg: Any) -> str:
    root = cfg.cache_dir or os.environ.get("IMITATION_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "imitation_jax")
    return os.path.join(os.path.abspath(os.path.expanduser(root)), "prepared")


def prepare_cached(cfg: Any, *, progress: bool = False, log: Callable[[str], None] | None = print
                   ) -> str:
    """The prepared set of raw `cfg.train_files` / `cfg.eval_files`, made on first use."""
    settings = prepare_settings(cfg)
    settings.validate()
    train = [Source.parse(x, settings.format) for x in cfg.train_files]
    evals = [Source.parse(x, settings.format) for x in cfg.eval_files]
    for s in train + evals:
        check_readable(s.path)
    key = hashlib.sha256(json.dumps({
        "version": storage.FORMAT_VERSION, "settings": settings.as_dict(),
        "train": [input_fingerprint(s) for s in train], "eval": [input_fingerprint(s) for s in evals],
        "tokenizer": load_tokenizer(settings.tokenizer).fingerprint(),
    }, sort_keys=True).encode()).hexdigest()[:24]
    root = cache_root(cfg)
    directory = os.path.join(root, key)
    os.makedirs(root, exist_ok=True)
    with _locked(os.path.join(root, f"{key}.lock")):
        if (storage.read_stats(directory) or {}).get("cache_key") == key:
            return directory
        stats = prepare(train, directory, settings, eval_inputs=evals, workers=cfg.workers,
                        progress=progress, extra={"cache_key": key})
    if log:
        log(summary(stats))
    return directory


@contextlib.contextmanager
def _locked(path: str):
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclasses.dataclass
class TrainingData:
    """The data of one training run."""

    path: str  # the prepared set
    prepared: PreparedSet
    train: Any  # row source: len, seq_len, pad_id, take(indices), stats, fingerprint
    eval: Any | None  # the eval split's rows (None when it has none)
    seq_len: int
    vocab_size: int  # the tokenizer's, special tokens added by prepare included
    base_vocab_size: int  # the tokenizer's own
    added_tokens: dict[str, int]  # special token -> id (ids base_vocab_size, ...)
    config: Any  # the DataConfig with template, seq_len, packing and tokenizer filled in

    @property
    def tokenizer(self):
        return self.prepared.tokenizer

    @property
    def template(self):
        return self.prepared.template

    @property
    def stats(self) -> dict:
        return self.prepared.stats


def load_training_data(cfg: Any, process_index: int = 0, process_count: int = 1, *,
                       progress: bool = False, log: Callable[[str], None] | None = print
                       ) -> TrainingData:
    """Opens (or first prepares) the data named by a DataConfig. Raises DataError for bad data
    or a prepared set that does not match the config."""
    cfg.validate()
    if cfg.path:
        directory = cfg.path
    else:
        directory = prepare_cached(cfg, progress=progress and process_index == 0,
                                   log=log if process_index == 0 else None)
    prepared = PreparedSet(directory)
    s = prepared.settings
    if cfg.path:
        _check_against_set(cfg, prepared)
    tok = prepared.stats["tokenizer"]
    if cfg.path and cfg.tokenizer:
        given = load_tokenizer(cfg.tokenizer).fingerprint()
        if given not in (tok.get("fingerprint"), tok.get("source_fingerprint")):
            raise DataError(f"data.tokenizer={cfg.tokenizer} is not the tokenizer {directory} was "
                            f"prepared with ({tok['path']}); leave data.tokenizer unset to use the "
                            "set's own copy", "config_mismatch")
    train = prepared.split("train")
    if cfg.max_train_tokens:
        try:
            train = cap_trained_tokens(train, cfg.max_train_tokens)
        except ValueError as e:
            raise DataError(f"data.max_train_tokens: {e}", "config_mismatch") from None
    evals = prepared.split("eval") if prepared.rows("eval") else None
    resolved = dataclasses.replace(
        cfg, template=s["template"], seq_len=int(s["seq_len"]), packing=s["packing"],
        tokenizer=cfg.tokenizer)
    return TrainingData(
        path=prepared.directory, prepared=prepared, train=train, eval=evals,
        seq_len=prepared.seq_len, vocab_size=int(tok["vocab_size"]),
        base_vocab_size=int(tok["base_vocab_size"]),
        added_tokens={k: int(v) for k, v in tok["added_tokens"].items()}, config=resolved)
