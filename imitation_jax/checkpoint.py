"""Orbax checkpoints under RUN_DIR/checkpoints/<step>/, one item per part of the training state:

    params/     parameters (global arrays; restore into any mesh or process count)
    opt_state/  optimizer state
    rng/        the run's PRNG key data
    data/       JSON: step, data-iterator state (the loader is random-access by step), epoch
    config/     JSON: the resolved config that wrote it
    base/       JSON (LoRA runs only): the frozen base's identity, {"path", "hash"}; params/ and
                opt_state/ then hold the adapters and their optimizer state only

Orbax writes each step into a temporary directory and renames it when complete, so a write torn by
a kill is never mistaken for a checkpoint; restore still falls back past any step it cannot read.
A checkpoint that does not fit the model (shape, dtype, missing parameter) is an error naming the
parameter, never a silent fresh start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import sys
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from imitation_jax.errors import CheckpointError

ITEMS = ("params", "opt_state", "rng", "data", "config", "base")
_TMP = re.compile(r"\.orbax-checkpoint-tmp")


@dataclasses.dataclass
class CheckpointConfig:
    every_steps: int = 500  # 0: no step-based checkpoints
    every_minutes: float = 0.0  # also save when this long has passed since the last save (0: off)
    keep: int = 3  # most recent checkpoints kept
    milestone_every: int = 0  # also keep every step divisible by this forever (0: none)
    async_save: bool = True  # training goes on while a checkpoint is written


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), "checkpoints")


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def _handlers() -> dict:
    return {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
            "rng": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(), "base": ocp.JsonCheckpointHandler()}


class Checkpointer:
    """Saves on a step interval, a time interval and on demand; restores the newest readable step."""

    def __init__(self, run_dir: str, cfg: CheckpointConfig, max_to_keep: Optional[int] = None):
        self.cfg = cfg
        self.directory = checkpoint_dir(run_dir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep if max_to_keep is not None else cfg.keep,
            keep_period=cfg.milestone_every or None, enable_async_checkpointing=cfg.async_save,
            create=True, cleanup_tmp_directories=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())
        self._last_save_time = time.monotonic()

    # -- saving ---------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Whether the schedule asks for a checkpoint after `step` (this process's view: in a
        multi-process run the caller agrees on it with the others)."""
        if self.cfg.every_steps and step % self.cfg.every_steps == 0:
            return True
        return bool(self.cfg.every_minutes) and time.monotonic() - self._last_save_time >= 60 * self.cfg.every_minutes

    def save(self, step: int, state: dict, data_state: dict, config: dict, base: Optional[dict] = None) -> None:
        """`base`: a LoRA run's base identity (`base_identity`), saved beside the adapters."""
        if step in self.manager.all_steps():
            return
        items = dict(
            params=ocp.args.StandardSave(state["params"], save_args=layer_save_args(state["params"])),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            rng=ocp.args.StandardSave({"key": state["rng"]}), data=ocp.args.JsonSave({"step": step, **data_state}),
            config=ocp.args.JsonSave(config))
        if base is not None:
            items["base"] = ocp.args.JsonSave(base)
        args = ocp.args.Composite(**items)
        self.manager.save(step, args=args, force=True)
        self._last_save_time = time.monotonic()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # -- restoring ------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def incomplete(self) -> list[str]:
        if not os.path.isdir(self.directory):
            return []
        return sorted(d for d in os.listdir(self.directory) if _TMP.search(d))

    def restore_latest(self, abstract_state: dict, base: Optional[dict] = None) -> Optional[tuple[int, dict, dict]]:
        """(step, state, data_state) from the newest complete, readable checkpoint, or None.

        abstract_state: ShapeDtypeStructs with target shardings for params / opt_state / rng.
        base: a LoRA run's base identity now (`base_identity`); the checkpoint's must be the same.
        """
        for name in self.incomplete():
            _log(f"checkpoint: ignoring {os.path.join(self.directory, name)}: an incomplete write (torn by a kill)")
        for step in reversed(self.steps()):
            try:
                saved = saved_param_shapes(os.path.join(self.directory, str(step), "params"))
            except CheckpointError as exc:
                _log(f"checkpoint: step {step} is unreadable ({exc}); falling back to the previous one")
                continue
            check_fits(os.path.join(self.directory, str(step), "params"), abstract_state["params"], saved)
            if base is not None:
                check_base(os.path.join(self.directory, str(step)), base)
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_state["params"]),
                    opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
                    rng=ocp.args.StandardRestore({"key": abstract_state["rng"]}),
                    data=ocp.args.JsonRestore()))
            except Exception as exc:  # unreadable files of any kind: fall back to an older step
                _log(f"checkpoint: step {step} is unreadable ({type(exc).__name__}: "
                     f"{str(exc).splitlines()[0][:200]}); falling back to the previous one")
                continue
            state = {"params": out["params"], "opt_state": out["opt_state"], "rng": out["rng"]["key"]}
            return step, state, dict(out["data"])
        return None


def _leaf_paths(tree: Any) -> dict[str, Any]:
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def saved_param_shapes(item_dir: str) -> dict[str, Any]:
    """{"a/b/c": metadata with .shape and .dtype} of a params item; CheckpointError if unreadable."""
    try:
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(item_dir)
        meta = getattr(meta, "item_metadata", meta)
        saved = _leaf_paths(meta.tree if hasattr(meta, "tree") else meta)
    except Exception as exc:
        raise CheckpointError(f"{item_dir}: cannot read checkpoint metadata: {str(exc).splitlines()[0]}") from None
    if not saved:
        raise CheckpointError(f"{item_dir}: no readable parameter metadata")
    return saved


def check_fits(item_dir: str, abstract: Any, saved: dict[str, Any] | None = None) -> None:
    """Raise CheckpointError naming the first parameter whose presence, shape or dtype differs."""
    saved = saved if saved is not None else saved_param_shapes(item_dir)
    wanted = _leaf_paths(abstract)
    for name, want in wanted.items():
        if name not in saved:
            raise CheckpointError(f"{item_dir}: parameter '{name}' is missing from the checkpoint")
        got = saved[name]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"{item_dir}: parameter '{name}' has shape {tuple(got.shape)} in the checkpoint "
                                  f"but the config needs {tuple(want.shape)}")
        if np.dtype(got.dtype) != np.dtype(want.dtype):
            raise CheckpointError(f"{item_dir}: parameter '{name}' is {np.dtype(got.dtype)} in the checkpoint "
                                  f"but the config needs {np.dtype(want.dtype)}")
    extra = sorted(set(saved) - set(wanted))
    if extra:
        raise CheckpointError(f"{item_dir}: parameter '{extra[0]}' in the checkpoint is not in the model config")


def resolve_params_path(path: str) -> str:
    """Accepts a run dir, its checkpoints/ dir (newest step), a step dir or a params item dir."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    steps = [d for d in os.listdir(path) if d.isdigit() and os.path.isdir(os.path.join(path, d))] \
        if os.path.isdir(path) else []
    if steps:
        path = os.path.join(path, max(steps, key=int))
    if os.path.isdir(os.path.join(path, "params")):
        path = os.path.join(path, "params")
    if not os.path.isdir(path) or not any(f.startswith(("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt"))
                                          for f in os.listdir(path)):
        raise CheckpointError(f"no Orbax params checkpoint at {path}")
    return path


def _no_step_metadata_warning(record: logging.LogRecord) -> bool:
    """An item inside a step has no step metadata of its own; Orbax warns of it on every restore of
    one (every generate, eval, export of a run), which says nothing wrong."""
    return not str(record.msg).startswith("Metadata file does not exist")


def restore_params(path: str, abstract_params: Any) -> Any:
    """Parameters only (e.g. `init.checkpoint`), into the shapes and shardings of `abstract_params`."""
    item = resolve_params_path(path)
    log = logging.getLogger("absl")
    log.addFilter(_no_step_metadata_warning)
    try:
        check_fits(item, abstract_params)
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(item, abstract_params)
    finally:
        log.removeFilter(_no_step_metadata_warning)


def save_params(directory: str, params: Any) -> str:
    """A standalone params checkpoint (e.g. `import-hf`); returns its path."""
    directory = os.path.abspath(directory)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory, params, save_args=layer_save_args(params), force=True)
    return directory


def layer_save_args(params: Any) -> Any:
    """SaveArgs chunking each stacked parameter (layers/..., leading axis = layer) by layer, so
    export-hf reads one layer at a time (convert.layered_io); other parameters as Orbax likes."""
    def args(path, leaf):
        first = getattr(path[0], "key", getattr(path[0], "name", None)) if path else None
        stacked = first == "layers" and len(getattr(leaf, "shape", ())) >= 2
        return ocp.SaveArgs(shard_axes=(0,)) if stacked else ocp.SaveArgs()

    return jax.tree_util.tree_map_with_path(args, params)


# ------------------------------------------------------------------------------------ LoRA base


HF_WEIGHT_FILES = (".safetensors", ".bin", ".index.json", "config.json")


def content_hash(path: str, suffixes: Optional[tuple[str, ...]] = None) -> str:
    """sha256 over the files of `path` (a file, or a directory: every file below it whose name ends
    with one of `suffixes`, default all, by relative path and bytes, in sorted order): a frozen
    base's identity."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: the LoRA base does not exist")
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, f) for root, _, names in os.walk(path) for f in names
        if suffixes is None or f.endswith(suffixes))
    digest = hashlib.sha256()
    for name in files:
        digest.update(os.path.relpath(name, path).encode() + b"\0")
        with open(name, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def base_identity(path: str, kind: str) -> dict:
    """{"path", "kind", "hash"} of a LoRA run's base: kind "hf" (an HF dir: config.json and the
    weight files hashed) or "checkpoint" (an Orbax params checkpoint: the params item hashed)."""
    if kind == "hf":
        return {"path": os.path.abspath(path), "kind": kind, "hash": content_hash(path, HF_WEIGHT_FILES)}
    return {"path": os.path.abspath(path), "kind": kind, "hash": content_hash(resolve_params_path(path))}


def read_base(step_dir: str) -> Optional[dict]:
    """The base identity saved with a checkpoint step (None: not a LoRA checkpoint)."""
    item = os.path.join(step_dir, "base")
    if not os.path.isdir(item):
        return None
    import json

    try:  # Orbax's JsonCheckpointHandler writes the item as the file "metadata"
        with open(os.path.join(item, "metadata")) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{item}: unreadable base identity ({exc})") from None


def check_base(step_dir: str, now: dict) -> None:
    """One-line CheckpointError unless `step_dir` was trained on the base `now` identifies."""
    saved = read_base(step_dir)
    if saved is None:
        raise CheckpointError(f"{step_dir}: holds no LoRA base identity (not a LoRA checkpoint)")
    if saved.get("hash") != now["hash"]:
        raise CheckpointError(f"{step_dir}: its adapters were trained on the base {saved.get('path')} "
                              f"(sha256 {str(saved.get('hash'))[:12]}) but {now['path']} now hashes to "
                              f"{now['hash'][:12]}: the base changed")
