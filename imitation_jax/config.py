"""Run configuration: OmegaConf structured configs, YAML files and `dotted.key=value` overrides.

Precedence, lowest first: dataclass defaults < `model.preset` < YAML file < command-line overrides.
Every mistake (unknown key, wrong type, bad value) becomes a one-line `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from imitation_jax.data.cleaning import CleaningConfig
from imitation_jax.data.training import check_data_config
from imitation_jax.checkpoint import CheckpointConfig
from imitation_jax.distributed import DistributedConfig
from imitation_jax import host_memory
from imitation_jax.model.config import ModelConfig
from imitation_jax.model.presets import preset_fields
from imitation_jax.sharding import MeshConfig


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message is one line."""


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


@dataclasses.dataclass
class TrainConfig:
    steps: Optional[int] = None  # optimizer steps; or
    epochs: Optional[float] = None  # passes over the training rows
    batch_size: int = 8  # sequences per optimizer step, over all processes and micro-batches
    grad_accum: int = 1  # micro-batches per step (each batch_size / grad_accum sequences)
    log_every: int = 10
    loss_chunk: int = 256  # >0: output layer + cross entropy this many positions of every row at a time,
                           # trained tokens first, chunks with none skipped; 0: all at once
    fuse_last_layer: bool = True  # run the last layer's output projection, MLP and the final norm
                                  # inside the loss chunks too, so only for positions that are trained
                                  # (under nnx.scan, slicing off the last layer costs some temporaries)
    seed: int = 0  # parameter init
    peak_flops: Optional[float] = None  # per device, for MFU; None: known chips, or measured on CPU
    # auto | keep | release: keep freed host memory in the process (no page faults every step) when
    # JAX computes on the CPU; see imitation_jax/host_memory.py
    host_memory: str = "auto"


@dataclasses.dataclass
class OptimConfig:
    lr: float = 3e-4
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_steps: int = 100
    end_lr_ratio: float = 0.1  # final lr = lr * end_lr_ratio
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norms and embeddings
    clip_norm: float = 1.0  # global-norm clipping; 0 disables


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


@dataclasses.dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb_project: Optional[str] = None  # set to log to Weights & Biases as well
    progress: bool = True


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


def _one_line(exc: OmegaConfBaseException, where: str) -> str:
    msg = str(exc).splitlines()[0].strip()
    key = getattr(exc, "full_key", None)
    if "not in" in msg and key:
        return f"{where}: unknown config key '{key}'"
    return f"{where}: {msg}" + (f" (key '{key}')" if key and key not in msg else "")


def _merge(layers: list[tuple[str, DictConfig]]) -> DictConfig:
    cfg = OmegaConf.structured(Config)
    for where, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            raise ConfigError(_one_line(exc, where)) from None
    return cfg


def read_layers(path: str | None, overrides: Sequence[str] = (), label: str = "config"
                ) -> list[tuple[str, DictConfig]]:
    """The YAML file (if any) then each `key=value` override as (where, layer), for merging onto
    a structured config in order; a missing file, bad YAML or a malformed override is one line."""
    layers: list[tuple[str, DictConfig]] = []
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"{label} file not found: {path}")
        try:
            layer = OmegaConf.load(path)
        except Exception as exc:  # YAML syntax errors come from several parsers' types
            raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"{path}: a config file must hold a mapping of keys")
        layers.append((path, layer))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        try:
            layers.append((f"override '{item}'", OmegaConf.from_dotlist([item])))
        except OmegaConfBaseException as exc:
            raise ConfigError(_one_line(exc, f"override '{item}'")) from None
    return layers


def load_config(path: str | None, overrides: Sequence[str] = ()) -> Config:
    """Resolve a YAML file plus `key=value` overrides into a validated `Config`."""
    layers = read_layers(path, overrides)
    cfg = _merge(layers)
    if cfg.model.preset:  # rebuild with the preset as the layer just above the defaults
        try:
            fields = preset_fields(cfg.model.preset)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        cfg = _merge([("preset", OmegaConf.create({"model": OmegaConf.structured(fields)}))] + layers)
    try:
        missing = [k for k, node, name in (("run_dir", cfg, "run_dir"),) if OmegaConf.is_missing(node, name)]
        if missing:
            raise ConfigError(f"config: required key(s) not set: {', '.join(missing)}")
        obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc, "config")) from None
    except ValueError as exc:  # __post_init__ checks of the dataclasses
        raise ConfigError(f"config: {exc}") from None
    validate(obj)
    return obj


def validate(cfg: Config) -> None:
    t = cfg.train
    if (t.steps is None) == (t.epochs is None):
        raise ConfigError("config: set exactly one of train.steps and train.epochs")
    if t.grad_accum < 1 or t.batch_size % t.grad_accum:
        raise ConfigError(f"config: train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    if t.host_memory not in host_memory.MODES:
        raise ConfigError(f"config: train.host_memory={t.host_memory!r} is not one of {', '.join(host_memory.MODES)}")
    if cfg.init.checkpoint and cfg.init.hf:
        raise ConfigError("config: set at most one of init.checkpoint and init.hf")
    if cfg.optim.schedule not in ("cosine", "linear", "constant"):
        raise ConfigError(f"config: optim.schedule={cfg.optim.schedule!r} is not one of cosine, linear, constant")
    try:
        check_data_config(cfg.data)
    except ValueError as exc:
        raise ConfigError(f"config: {exc}") from None


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_resolved(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        f.write(to_yaml(cfg))
