"""A new run's starting parameters from `init.checkpoint` (Orbax) or `init.hf` (HF dir, streamed
into this mesh's shards), grown to the run's vocabulary when prepare added special tokens."""

from __future__ import annotations

import dataclasses
from typing import Any

from imitation_jax.model.config import ModelConfig


def initial_params(init: Any, model: ModelConfig, mesh, abstract: Any, seed: int) -> dict:
    """`init.hf` / `init.checkpoint` (a LoRA run: its base with the adapters merged) as `model`'s
    params on `mesh` (`convert.loading.start_params`, which LoRA runs' loading shares)."""
    from imitation_jax.convert.loading import start_params

    return start_params(init.hf, init.checkpoint, model, mesh, abstract, seed)


# ModelConfig fields that say how to compute (the run's own); every other field is the architecture,
# which init.hf's config.json or init.checkpoint's saved config decides (a new family field included).
COMPUTE_FIELDS = ("preset", "param_dtype", "dtype", "remat", "attention", "scan_unroll", "platform", "lora")
ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in COMPUTE_FIELDS)


def with_hf_architecture(model: ModelConfig, hf_dir: str) -> ModelConfig:
    from imitation_jax.convert.hf_config import model_config_from_dir

    hf = model_config_from_dir(hf_dir)
    return dataclasses.replace(model, **{f: getattr(hf, f) for f in ARCH_FIELDS})


def with_checkpoint_architecture(model: ModelConfig, path: str) -> ModelConfig:
    """`init.checkpoint`'s architecture (an import-hf dir's model.json, or the config.yaml of the run
    that holds it) over `model`'s: the shapes are checked at restore, but a norm epsilon, RoPE base
    or scaling taken from the run's preset instead would compute another model from the same weights."""
    import os

    from imitation_jax.convert import params_dir
    from imitation_jax.convert.loading import read_run_config

    path = os.path.abspath(path)
    if params_dir.is_params_dir(path):
        saved = params_dir.read_meta(path)[0]
    else:
        for _ in range(4):  # a run dir, its checkpoints/, a step, the step's params item
            if os.path.isfile(os.path.join(path, "config.yaml")):
                saved = read_run_config(path)[0]
                break
            path = os.path.dirname(path)
        else:
            return model  # a bare Orbax item: its shapes are all we know
    return dataclasses.replace(model, **{f: getattr(saved, f) for f in ARCH_FIELDS})
