"""Run-directory bookkeeping around resume: setting old checkpoints aside on an explicit restart,
and dropping metrics of steps that a resume will redo."""

from __future__ import annotations

import json
import os
import time

import jax



def set_aside_previous_run(run_dir: str) -> str | None:
    """Rename checkpoints/ and metrics.jsonl to *.replaced-<time> (nothing is deleted)."""
    if jax.process_index() != 0:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = None
    for name in ("checkpoints", "metrics.jsonl"):
        path = os.path.join(run_dir, name)
        if os.path.exists(path):
            moved = f"{path}.replaced-{stamp}"
            os.rename(path, moved)
    return moved


def truncate_metrics(run_dir: str, last_step: int) -> None:
    """Keep metrics.jsonl records up to `last_step`: the resumed run logs the later steps again."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:  # a line torn by the kill
            continue
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
