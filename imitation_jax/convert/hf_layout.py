"""Where each Hugging Face tensor lives in our parameter tree, and how it is laid out: LLaMA's
table, plus each family's extra tensors (`FAMILY_LAYOUT`: Qwen2's biases, Qwen3's q/k norms,
Gemma 3's four norms per layer).

One table, used in both directions: HF stores `nn.Linear` weights as (out, in); we store kernels as
(in, heads, head_dim) / (heads, head_dim, out) / (in, out), with the layers stacked on axis 0.
Because the model uses HF's rotate-half RoPE, no permutation of q/k rows is needed.

Each entry has a kind saying how the two layouts relate, so any slice of one of our arrays can be
read as a slice of the HF tensor (what sharded, streamed loading needs):
  same       ours == hf
  transpose  ours == hf.T                                   (gate/up/down, lm_head)
  qkv        ours (d, heads, hd) == hf.T.reshape(...)       hf (heads*hd, d)
  o          ours (heads, hd, d) == hf.T.reshape(...)       hf (d, heads*hd)
  bias       ours (heads, hd) == hf.reshape(...)             hf (heads*hd,)
"""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import numpy as np

from imitation_jax.model.config import ModelConfig


class Layout(NamedTuple):
    hf_name: str  # with {i} for the layer
    path: tuple[str, ...]  # in our state tree
    kind: str


LAYER_LAYOUT: list[Layout] = [
    Layout("model.layers.{i}.self_attn.q_proj.weight", ("layers", "attn", "q"), "qkv"),
    Layout("model.layers.{i}.self_attn.k_proj.weight", ("layers", "attn", "k"), "qkv"),
    Layout("model.layers.{i}.self_attn.v_proj.weight", ("layers", "attn", "v"), "qkv"),
    Layout("model.layers.{i}.self_attn.o_proj.weight", ("layers", "attn", "o"), "o"),
    Layout("model.layers.{i}.mlp.gate_proj.weight", ("layers", "mlp", "gate"), "transpose"),
    Layout("model.layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up"), "transpose"),
    Layout("model.layers.{i}.mlp.down_proj.weight", ("layers", "mlp", "down"), "transpose"),
    Layout("model.layers.{i}.input_layernorm.weight", ("layers", "attn_norm", "weight"), "same"),
    Layout("model.layers.{i}.post_attention_layernorm.weight", ("layers", "mlp_norm", "weight"), "same"),
]

def _attn(name: str, ours: str, kind: str = "same") -> Layout:
    return Layout(f"model.layers.{{i}}.self_attn.{name}", ("layers", "attn", *ours.split("/")), kind)


_QKV_BIAS = [_attn(f"{p}_proj.bias", f"{p}_bias", "bias") for p in "qkv"]
_O_BIAS = [_attn("o_proj.bias", "o_bias")]
_QK_NORM = [_attn("q_norm.weight", "q_norm/weight"), _attn("k_norm.weight", "k_norm/weight")]
_GEMMA_NORMS = [
    Layout("model.layers.{i}.input_layernorm.weight", ("layers", "attn_norm", "weight"), "same"),
    Layout("model.layers.{i}.post_attention_layernorm.weight", ("layers", "post_attn_norm", "weight"), "same"),
    Layout("model.layers.{i}.pre_feedforward_layernorm.weight", ("layers", "mlp_norm", "weight"), "same"),
    Layout("model.layers.{i}.post_feedforward_layernorm.weight", ("layers", "post_mlp_norm", "weight"), "same"),
]

GLOBAL_LAYOUT: list[Layout] = [
    Layout("model.embed_tokens.weight", ("embed",), "same"),
    Layout("model.norm.weight", ("norm", "weight"), "same"),
    Layout("lm_head.weight", ("lm_head",), "transpose"),
]

# Buffers some checkpoints carry that hold no parameters (recomputed from the config).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def layer_layout(cfg: ModelConfig) -> list[Layout]:
    """The per-layer tensors of `cfg`'s family and features, in HF's order within a layer."""
    attn, mlp, norms = LAYER_LAYOUT[:4], LAYER_LAYOUT[4:7], LAYER_LAYOUT[7:]
    if cfg.qkv_bias:
        attn = attn[:3] + _QKV_BIAS + attn[3:]
    if cfg.o_bias:
        attn = attn + _O_BIAS
    if cfg.qk_norm:
        attn = attn + _QK_NORM
    return attn + mlp + (_GEMMA_NORMS if cfg.post_norms else norms)


def iter_layout(cfg: ModelConfig) -> Iterator[Layout]:
    for entry in GLOBAL_LAYOUT:
        if entry.hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        yield entry
    yield from layer_layout(cfg)


def hf_names(entry: Layout, cfg: ModelConfig) -> list[str]:
    if "{i}" in entry.hf_name:
        return [entry.hf_name.format(i=i) for i in range(cfg.num_layers)]
    return [entry.hf_name]


def hf_shape(entry: Layout, cfg: ModelConfig, vocab_rows: int) -> tuple[int, ...]:
    """The shape config.json implies for one HF tensor of this entry."""
    d, hd, inter = cfg.hidden_size, cfg.dim_per_head, cfg.intermediate_size
    name = entry.hf_name
    if "embed_tokens" in name or "lm_head" in name:
        return (vocab_rows, d)
    if entry.kind == "bias":
        return ((cfg.num_heads if "q_proj" in name else cfg.kv_heads) * hd,)
    if entry.kind == "same":
        return (hd,) if name.endswith(("q_norm.weight", "k_norm.weight")) else (d,)
    if entry.kind == "qkv":
        return ((cfg.num_heads if "q_proj" in name else cfg.kv_heads) * hd, d)
    if entry.kind == "o":
        return (d, cfg.num_heads * hd)
    return (d, inter) if "down_proj" in name else (inter, d)


def to_ours(kind: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """An HF tensor, or the piece of it `hf_index` names, in our layout."""
    hd = cfg.dim_per_head
    if kind == "same":
        return w
    if kind == "transpose":
        return w.T
    if kind == "qkv":
        return w.T.reshape(w.shape[1], -1, hd)
    if kind == "bias":
        return w.reshape(-1, hd)
    return w.T.reshape(-1, hd, w.shape[0])  # o


def to_hf(kind: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    if kind == "same":
        return w
    if kind == "transpose":
        return w.T
    if kind == "qkv":
        return w.reshape(w.shape[0], -1).T
    if kind == "bias":
        return w.reshape(-1)
    return w.reshape(-1, w.shape[-1]).T  # o


def hf_index(kind: str, index: tuple[slice, ...], shape: tuple[int, ...], cfg: ModelConfig) -> tuple[slice, ...]:
    """The HF slice holding `ours[index]` (index without the layer axis; shape is ours). The
    head_dim axis is never split (sharding rules keep it whole), so heads map to row ranges."""
    full = [s.indices(n)[:2] for s, n in zip(index, shape)]
    if kind == "same":
        return tuple(slice(a, b) for a, b in full)
    if kind == "transpose":
        return tuple(slice(a, b) for a, b in reversed(full))
    hd = cfg.dim_per_head
    if kind == "bias":
        (h0, h1), hd_range = full
        assert hd_range == (0, hd), "head_dim must not be split"
        return (slice(h0 * hd, h1 * hd),)
    if kind == "qkv":
        (d0, d1), (h0, h1), hd_range = full
        assert hd_range == (0, hd), "head_dim must not be split"
        return (slice(h0 * hd, h1 * hd), slice(d0, d1))
    (h0, h1), hd_range, (d0, d1) = full
    assert hd_range == (0, hd), "head_dim must not be split"
    return (slice(d0, d1), slice(h0 * hd, h1 * hd))


def params_from_hf(cfg: ModelConfig, get_tensor: Callable[[str], np.ndarray]) -> dict:
    """Nested dict of numpy arrays in our layout, reading HF tensors one at a time by name."""
    tree: dict = {}
    for entry in iter_layout(cfg):
        parts = [to_ours(entry.kind, np.asarray(get_tensor(n)), cfg) for n in hf_names(entry, cfg)]
        value = np.stack(parts) if "{i}" in entry.hf_name else parts[0]
        node = tree
        for key in entry.path[:-1]:
            node = node.setdefault(key, {})
        node[entry.path[-1]] = value
    return tree


def model_config_from_hf(hf: dict) -> dict:
    """Kept for callers of the first version; see hf_config.model_config_from_hf."""
    from imitation_jax.convert.hf_config import model_fields_from_hf

    return model_fields_from_hf(hf, "config.json")
