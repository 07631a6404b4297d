"""Where metrics go: RUN_DIR/metrics.jsonl (one object per logged step), TensorBoard, optional
wandb. Only process 0 writes; the others get a logger that does nothing."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax


@dataclasses.dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb_project: Optional[str] = None  # set to log to Weights & Biases as well
    progress: bool = True


class MetricsLogger:
    def __init__(self, run_dir: str, tensorboard: bool = True, wandb_project: str | None = None,
                 config: dict | None = None):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not self.enabled:
            return
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if wandb_project:
            import wandb  # optional extra

            self._wandb = wandb.init(project=wandb_project, dir=run_dir, config=config)

    def log(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{prefix + k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                if self._tb is not None:
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(record, step=step)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(value: Any) -> Any:
    try:
        return float(value) if not isinstance(value, (int, str)) else value
    except (TypeError, ValueError):
        return str(value)
