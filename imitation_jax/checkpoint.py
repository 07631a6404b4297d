"""Orbax checkpoints under RUN_DIR/checkpoints/<step>/ with one item per part of the state.

This module saves final parameters and restores parameters into any mesh (target shardings come
from the caller's abstract arrays); the checkpoint issue extends it to the full training state.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A missing or unusable checkpoint; the message is one line."""


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), "checkpoints")


def manager(run_dir: str, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(checkpoint_dir(run_dir), options=options)


def save_params(run_dir: str, step: int, params: Any) -> str:
    """Write params for `step` and wait for the write to finish; returns the step directory."""
    mgr = manager(run_dir)
    mgr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)
    mgr.wait_until_finished()
    mgr.close()
    return os.path.join(checkpoint_dir(run_dir), str(step))


def resolve_params_path(path: str) -> str:
    """Accepts a run dir, its checkpoints/ dir (latest step), a step dir or a params item dir."""
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


def restore_params(path: str, abstract_params: Any) -> Any:
    """Restore into the shapes, dtypes and shardings of `abstract_params` (ShapeDtypeStructs)."""
    item = resolve_params_path(path)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(item, abstract_params)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{item}: does not fit the model config: {str(exc).splitlines()[0]}") from None
