"""Named model sizes with the numbers of the published Hugging Face `config.json` files."""

from __future__ import annotations

import dataclasses

from imitation_jax.model import families
from imitation_jax.model.config import ModelConfig, RopeScaling

_LLAMA1 = dict(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0)
_LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0)
_LLAMA3 = dict(vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0)
_LLAMA31 = dict(_LLAMA3, max_position_embeddings=131072)


def _gemma3_layers(n: int, pattern: int = 6) -> list[str]:
    """Gemma 3's interleaving: every `pattern`-th layer global, the rest sliding."""
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


def _size(hidden: int, inter: int, layers: int, heads: int, kv: int | None = None) -> dict:
    return dict(hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=heads, num_kv_heads=kv)


# Architecture fields only; how to compute (dtypes, remat, attention) comes from the run config.
PRESETS: dict[str, dict] = {
    "llama-7b": dict(_LLAMA1, **_size(4096, 11008, 32, 32)),
    "llama-13b": dict(_LLAMA1, **_size(5120, 13824, 40, 40)),
    "llama-30b": dict(_LLAMA1, **_size(6656, 17920, 60, 52)),
    "llama-65b": dict(_LLAMA1, **_size(8192, 22016, 80, 64), rms_norm_eps=1e-5),
    "llama2-7b": dict(_LLAMA2, **_size(4096, 11008, 32, 32, 32)),
    "llama2-13b": dict(_LLAMA2, **_size(5120, 13824, 40, 40, 40)),
    "llama2-70b": dict(_LLAMA2, **_size(8192, 28672, 80, 64, 8)),
    "llama3-8b": dict(_LLAMA3, **_size(4096, 14336, 32, 32, 8)),
    "llama3-70b": dict(_LLAMA3, **_size(8192, 28672, 80, 64, 8)),
    "llama3.1-8b": dict(_LLAMA31, **_size(4096, 14336, 32, 32, 8), rope_scaling=RopeScaling()),
    "llama3.1-70b": dict(_LLAMA31, **_size(8192, 28672, 80, 64, 8), rope_scaling=RopeScaling()),
    # Qwen/Qwen2.5-7B, Qwen/Qwen3-8B, mistralai/Mistral-7B-v0.1, google/gemma-3-4b-pt's text_config
    # (config.json).
    "qwen2.5-7b": dict(families.features("qwen2"), family="qwen2", vocab_size=152064, max_position_embeddings=131072,
                       rms_norm_eps=1e-6, rope_theta=1e6, **_size(3584, 18944, 28, 28, 4)),
    "qwen3-8b": dict(families.features("qwen3"), family="qwen3", vocab_size=151936, max_position_embeddings=40960,
                     rms_norm_eps=1e-6, rope_theta=1e6, **_size(4096, 12288, 36, 32, 8)),
    "mistral-7b": dict(families.features("mistral"), family="mistral", vocab_size=32000,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
                       **_size(4096, 14336, 32, 32, 8)),
    "gemma3-4b": dict(families.features("gemma3"), family="gemma3", vocab_size=262208, max_position_embeddings=131072,
                      rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling=RopeScaling(rope_type="linear", factor=8.0),
                      rope_local_theta=10000.0, sliding_window=1024, layer_types=_gemma3_layers(34), head_dim=256,
                      query_pre_attn_scalar=256.0, tie_word_embeddings=True, **_size(2560, 10240, 34, 8, 4)),
    # A few million parameters: the CPU demo and the tests. vocab_size=0 takes the tokenizer's.
    "tiny": dict(
        vocab_size=0, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
        **_size(256, 688, 4, 8, 4),
    ),
}


def preset_fields(name: str) -> dict:
    """The architecture fields of preset `name`; a one-line error lists the known names."""
    if name not in PRESETS:
        raise ValueError(f"model.preset={name!r} is not one of {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    if isinstance(fields.get("rope_scaling"), RopeScaling):
        fields["rope_scaling"] = dataclasses.replace(fields["rope_scaling"])
    if fields.get("layer_types") is not None:
        fields["layer_types"] = list(fields["layer_types"])
    return fields


def preset(name: str, **overrides) -> ModelConfig:
    return ModelConfig(**{**preset_fields(name), **overrides})
