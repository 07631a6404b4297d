"""Run configuration: OmegaConf structured configs, YAML files and `dotted.key=value` overrides.

Precedence, lowest first: dataclass defaults < `model.preset` < YAML file < command-line overrides.
Every mistake (unknown key, wrong type, bad value) becomes a one-line `ConfigError`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from imitation_jax import host_memory
from imitation_jax.checkpoint import CheckpointConfig
from imitation_jax.data.config import DataConfig
from imitation_jax.distributed import DistributedConfig
from imitation_jax.errors import ConfigError
from imitation_jax.model.config import ModelConfig
from imitation_jax.model.presets import preset_fields
from imitation_jax.settings import merge_layers, one_line, read_layers
from imitation_jax.sharding import MeshConfig
from imitation_jax.train.metrics import LoggingConfig
from imitation_jax.train.objectives import KDConfig, validate as validate_objective
from imitation_jax.train.optimizer import OptimConfig


@dataclasses.dataclass
class TrainConfig:
    steps: Optional[int] = None  # optimizer steps; or
    epochs: Optional[float] = None  # passes over the training rows
    batch_size: int = 8  # sequences per optimizer step, over all processes and micro-batches
    grad_accum: int = 1  # micro-batches per step (each batch_size / grad_accum sequences)
    log_every: int = 10
    prefetch: int = 2  # batches read and placed on the devices ahead of the step that uses them (0: in the loop)
    loss_chunk: int = 256  # >0: output layer + cross entropy this many positions of every row at a time,
                           # trained tokens first, chunks with none skipped; 0: all at once
    fuse_last_layer: bool = True  # run the last layer's output projection, MLP and the final norm
                                  # inside the loss chunks too, so only for positions that are trained
                                  # (under nnx.scan, slicing off the last layer costs some temporaries)
    objective: str = "sft"  # sft: cross entropy on the teacher's text | kd: distillation (kd.*)
    seed: int = 0  # parameter init
    peak_flops: Optional[float] = None  # per device, for MFU; None: known chips, or measured on CPU
    # auto | keep | release: keep freed host memory in the process (no page faults every step) when
    # JAX computes on the CPU; see imitation_jax/host_memory.py
    host_memory: str = "auto"


@dataclasses.dataclass
class EvalConfig:
    every_steps: int = 0  # held-out loss every N steps (0: only at the end)
    max_batches: Optional[int] = None
    batch_size: Optional[int] = None  # default: train.batch_size // train.grad_accum
    # lm-eval tasks on the live parameters (imitation_jax.evaluation.in_training); scores are
    # logged as task/<task>/<metric>. The shipped suite (mini_*) is always on the include path.
    tasks: list[str] = dataclasses.field(default_factory=list)
    tasks_every_steps: int = 0  # 0: only at the end
    tasks_limit: Optional[float] = None  # documents per task (< 1: a fraction)
    tasks_num_fewshot: Optional[int] = None
    tasks_include_path: list[str] = dataclasses.field(default_factory=list)
    tasks_batch_size: int = 16


@dataclasses.dataclass
class InitConfig:
    checkpoint: Optional[str] = None  # Orbax params checkpoint (a run dir, checkpoints/ or one step)
    hf: Optional[str] = None  # or a Hugging Face LLaMA dir: its config.json sets the architecture and its
    # safetensors are streamed into the sharded params (each process reads only its shards)
    adapter: Optional[str] = None  # LoRA: start the adapters from a PEFT adapter dir or a LoRA run dir
    # (convert/adapter_init.py); its rank/alpha/targets set model.lora, its base init.* when unset


@dataclasses.dataclass
class Config:
    run_dir: str = MISSING
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    kd: KDConfig = dataclasses.field(default_factory=KDConfig)


def load_config(path: str | None, overrides: Sequence[str] = ()) -> Config:
    """Resolve a YAML file plus `key=value` overrides into a validated `Config`."""
    layers = read_layers(path, overrides)
    cfg = merge_layers(Config, layers)
    if cfg.model.preset:  # rebuild with the preset as the layer just above the defaults
        try:
            fields = preset_fields(cfg.model.preset)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        cfg = merge_layers(Config, [("preset", OmegaConf.create({"model": OmegaConf.structured(fields)}))] + layers)
    try:
        missing = [k for k, node, name in (("run_dir", cfg, "run_dir"),) if OmegaConf.is_missing(node, name)]
        if missing:
            raise ConfigError(f"config: required key(s) not set: {', '.join(missing)}")
        obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(one_line(exc, "config")) from None
    except ValueError as exc:  # __post_init__ checks of the dataclasses
        raise ConfigError(f"config: {exc}") from None
    validate(obj)
    return obj


def validate(cfg: Config) -> None:
    t = cfg.train
    if (t.steps is None) == (t.epochs is None):
        raise ConfigError("config: set exactly one of train.steps and train.epochs")
    if t.prefetch < 0:
        raise ConfigError(f"config: train.prefetch={t.prefetch} must be >= 0")
    if t.grad_accum < 1 or t.batch_size % t.grad_accum:
        raise ConfigError(f"config: train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    if t.host_memory not in host_memory.MODES:
        raise ConfigError(f"config: train.host_memory={t.host_memory!r} is not one of {', '.join(host_memory.MODES)}")
    validate_objective(t.objective, cfg.kd)
    if cfg.init.checkpoint and cfg.init.hf:
        raise ConfigError("config: set at most one of init.checkpoint and init.hf")
    if cfg.optim.schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(f"config: optim.schedule={cfg.optim.schedule!r} is not one of cosine, linear, constant")
    try:
        cfg.data.validate()
    except ValueError as exc:
        raise ConfigError(f"config: {exc}") from None


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_resolved(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        f.write(to_yaml(cfg))
