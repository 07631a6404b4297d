"""Where each Hugging Face LLaMA tensor lives in our parameter tree, and how it is laid out.

One table, used in both directions: HF stores `nn.Linear` weights as (out, in); we store kernels as
(in, heads, head_dim) / (heads, head_dim, out) / (in, out), with the layers stacked on axis 0.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from imitation_jax.model.config import ModelConfig, RopeScaling

# (HF name with {i} for the layer, our path in the state tree, to_ours(array, cfg), to_hf(array, cfg))
Layout = tuple[str, tuple[str, ...], Callable, Callable]


def _qkv(heads_attr: str):
    def to_ours(w, cfg):
        heads = getattr(cfg, heads_attr)
        return w.T.reshape(cfg.hidden_size, heads, cfg.dim_per_head)

    def to_hf(w, cfg):
        return w.reshape(cfg.hidden_size, -1).T

    return to_ours, to_hf


def _same(w, cfg):
    return w


def _transpose(w, cfg):
    return w.T


def _o_to_ours(w, cfg):
    return w.T.reshape(cfg.num_heads, cfg.dim_per_head, cfg.hidden_size)


def _o_to_hf(w, cfg):
    return w.reshape(-1, cfg.hidden_size).T


LAYER_LAYOUT: list[Layout] = [
    ("model.layers.{i}.self_attn.q_proj.weight", ("layers", "attn", "q"), *_qkv("num_heads")),
    ("model.layers.{i}.self_attn.k_proj.weight", ("layers", "attn", "k"), *_qkv("kv_heads")),
    ("model.layers.{i}.self_attn.v_proj.weight", ("layers", "attn", "v"), *_qkv("kv_heads")),
    ("model.layers.{i}.self_attn.o_proj.weight", ("layers", "attn", "o"), _o_to_ours, _o_to_hf),
    ("model.layers.{i}.mlp.gate_proj.weight", ("layers", "mlp", "gate"), _transpose, _transpose),
    ("model.layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up"), _transpose, _transpose),
    ("model.layers.{i}.mlp.down_proj.weight", ("layers", "mlp", "down"), _transpose, _transpose),
    ("model.layers.{i}.input_layernorm.weight", ("layers", "attn_norm", "weight"), _same, _same),
    ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "mlp_norm", "weight"), _same, _same),
]

GLOBAL_LAYOUT: list[Layout] = [
    ("model.embed_tokens.weight", ("embed",), _same, _same),
    ("model.norm.weight", ("norm", "weight"), _same, _same),
    ("lm_head.weight", ("lm_head",), _transpose, _transpose),
]


def iter_layout(cfg: ModelConfig) -> Iterator[Layout]:
    for entry in GLOBAL_LAYOUT:
        if entry[0] == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        yield entry
    yield from LAYER_LAYOUT


def params_from_hf(cfg: ModelConfig, get_tensor: Callable[[str], np.ndarray]) -> dict:
    """Nested dict of numpy arrays in our layout, reading HF tensors one at a time by name."""
    tree: dict = {}
    for hf_name, path, to_ours, _ in iter_layout(cfg):
        if "{i}" in hf_name:
            value = np.stack([to_ours(np.asarray(get_tensor(hf_name.format(i=i))), cfg)
                              for i in range(cfg.num_layers)])
        else:
            value = to_ours(np.asarray(get_tensor(hf_name)), cfg)
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def model_config_from_hf(hf: dict) -> dict:
    """Our ModelConfig architecture fields from an HF LlamaConfig dict (config.json)."""
    scaling = hf.get("rope_scaling") or (hf.get("rope_parameters") if
                                          (hf.get("rope_parameters") or {}).get("rope_type") == "llama3" else None)
    rope_theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    head_dim = hf.get("head_dim")
    if head_dim == hf["hidden_size"] // hf["num_attention_heads"]:
        head_dim = None  # the default: keep configs from HF and from presets equal
    return dict(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=head_dim,
        max_position_embeddings=hf.get("max_position_embeddings", 2048), rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_scaling=None if not scaling else RopeScaling(
            rope_type=scaling.get("rope_type", scaling.get("type", "llama3")), factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]), high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"])),
    )
