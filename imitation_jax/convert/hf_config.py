"""HF `config.json` (LlamaConfig) <-> our ModelConfig, refusing what our model cannot compute.

Both the transformers-4 keys (`rope_theta`, `rope_scaling`) and the transformers-5 key
(`rope_parameters`) are read; export writes both so old and new readers (vLLM included) agree.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from imitation_jax.errors import CheckpointError
from imitation_jax.model.config import ModelConfig, RopeScaling

ARCHITECTURES = ("LlamaForCausalLM", "LLaMAForCausalLM")  # the second: early LLaMA-1 conversions
ROPE_TYPES = ("default", "llama3")


def read_config_json(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return hf


def _rope(hf: dict, where: str) -> tuple[float, Optional[dict]]:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind not in ROPE_TYPES:
            raise CheckpointError(f"{where}: rope scaling type {kind!r} is not supported (only llama3)")
        if kind == "default":
            scaling = None
    return float(theta), scaling


def check_supported(hf: dict, where: str) -> None:
    """One-line CheckpointError for an architecture or option our LLaMA does not implement."""
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    model_type = hf.get("model_type", "llama")
    unsupported = [a for a in archs if a not in ARCHITECTURES]
    if unsupported or model_type != "llama":
        name = unsupported[0] if unsupported else f"model_type {model_type!r}"
        extra = ""
        if hf.get("sliding_window"):
            extra = f" (its sliding_window={hf['sliding_window']} attention is not implemented here)"
        raise CheckpointError(f"{where}: architecture {name} is not supported{extra}; "
                              f"only LlamaForCausalLM (LLaMA-1/2/3/3.1 style) is")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (only silu)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise CheckpointError(f"{where}: {key}=true is not supported (LLaMA has no biases)")
    _rope(hf, where)


def model_fields_from_hf(hf: dict, where: str) -> dict:
    """Our ModelConfig architecture fields from an HF LlamaConfig dict."""
    check_supported(hf, where)
    theta, scaling = _rope(hf, where)
    try:
        head_dim = hf.get("head_dim")
        if head_dim == hf["hidden_size"] // hf["num_attention_heads"]:
            head_dim = None  # the default: keep configs from HF and from presets equal
        rope_scaling = None if not scaling else RopeScaling(
            rope_type="llama3", factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]), high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
        return dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_scaling=rope_scaling,
            initializer_range=hf.get("initializer_range", 0.02))
    except KeyError as exc:
        raise CheckpointError(f"{where}: missing key {exc.args[0]!r}") from None


def model_config_from_dir(directory: str, param_dtype: str = "float32") -> ModelConfig:
    hf = read_config_json(directory)
    cfg = ModelConfig(**model_fields_from_hf(hf, os.path.join(directory, "config.json")),
                      param_dtype=param_dtype, dtype=param_dtype)
    try:
        cfg.validate()
    except ValueError as exc:
        raise CheckpointError(f"{directory}/config.json: {exc}") from None
    return cfg


def hf_config_dict(cfg: ModelConfig, torch_dtype: str, bos_id: Optional[int], eos_id: int,
                   pad_id: Optional[int]) -> dict[str, Any]:
    """config.json for `cfg`: transformers' own LlamaConfig serialisation, plus the
    transformers-4 rope keys."""
    from transformers import LlamaConfig

    scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_position_embeddings}
    rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta} if scaling is None \
        else {**scaling, "rope_theta": cfg.rope_theta}
    hf = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.initializer_range, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters=rope_parameters, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        attention_bias=False, mlp_bias=False)
    out = hf.to_dict()
    out["architectures"] = ["LlamaForCausalLM"]
    out["dtype"] = out["torch_dtype"] = torch_dtype
    out["rope_theta"] = cfg.rope_theta
    out["rope_scaling"] = scaling
    return out
