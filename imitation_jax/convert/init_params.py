"""A new run's starting parameters from `init.checkpoint` (Orbax) or `init.hf` (HF dir, streamed
into this mesh's shards), grown to the run's vocabulary when prepare added special tokens."""

from __future__ import annotations

import dataclasses
from typing import Any

from imitation_jax.errors import CheckpointError
from imitation_jax.model.config import ModelConfig


def initial_params(init: Any, model: ModelConfig, mesh, abstract: Any, seed: int) -> dict:
    from imitation_jax import checkpoint
    from imitation_jax.model.params import abstract_params, grow_params

    if init.hf:
        from imitation_jax.convert.hf_import import load_hf_params, read_hf_config

        return load_hf_params(init.hf, model, mesh, hf_vocab=read_hf_config(init.hf).vocab_size, seed=seed)
    if _is_lora_run(init.checkpoint):  # its checkpoints hold adapters: start from base + adapters merged
        from imitation_jax.convert.loading import load_model

        loaded = load_model(init.checkpoint, mesh=mesh, dtype=model.param_dtype)
        if loaded.config.vocab_size > model.vocab_size:
            raise CheckpointError(f"{init.checkpoint}: its vocabulary ({loaded.config.vocab_size}) is "
                                             f"larger than this run's ({model.vocab_size})")
        return grow_params(loaded.params, model, loaded.config.vocab_size, seed)
    item = checkpoint.resolve_params_path(init.checkpoint)
    saved = checkpoint.saved_param_shapes(item)
    rows = tuple(saved["embed"].shape)[0] if "embed" in saved else model.vocab_size
    if rows >= model.vocab_size:
        return checkpoint.restore_params(item, abstract)
    small = dataclasses.replace(model, vocab_size=rows)
    params = checkpoint.restore_params(item, abstract_params(small, mesh))
    return grow_params(params, model, rows, seed)


def _is_lora_run(path: str) -> bool:
    import os

    from imitation_jax.convert.loading import read_run_config

    return os.path.isfile(os.path.join(path, "config.yaml")) and read_run_config(path)[0].lora.enabled


# ModelConfig fields that init.hf's config.json decides (the rest say how to compute).
ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
               "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
               "tie_word_embeddings", "initializer_range")


def with_hf_architecture(model: ModelConfig, hf_dir: str) -> ModelConfig:
    from imitation_jax.convert.hf_config import model_config_from_dir

    hf = model_config_from_dir(hf_dir)
    return dataclasses.replace(model, **{f: getattr(hf, f) for f in ARCH_FIELDS})
