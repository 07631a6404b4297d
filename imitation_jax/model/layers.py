"""Building blocks of the decoder: RMSNorm (LLaMA or Gemma style), rotary embeddings, projections
(with optional biases), the gated MLP (SwiGLU or GeGLU). What differs on CPU comes from `cpu`
(chosen by the config's platform)."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imitation_jax.model import cpu, lora, quant
from imitation_jax.model.config import ModelConfig, RopeScaling, decided
from imitation_jax.sharding import constrain


def param(rngs: nnx.Rngs, shape, names, dtype, std: float | None, fill: float = 1.0) -> nnx.Param:
    """A parameter annotated with logical axis names; std=None means `fill` everywhere (norm scales: 1,
    biases and Gemma's (1 + w) scales: 0)."""
    if std is None:
        value = jnp.full(shape, fill, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    # eager_sharding=False: placement happens once, from the rules table, when the state is jitted.
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


class QuantCodes(nnx.Variable):
    """A frozen, quantized base weight's codes or scales (model/quant.py); never trained."""


def projection(module, rngs: nnx.Rngs, cfg: ModelConfig, name: str, shape, names) -> None:
    """Set `module.<name>`: a weight, or with model.lora.base_quant its `<name>_codes` and
    `<name>_scale` (quantized along the first axis), read back by `kernel`."""
    mode = cfg.lora.base_quant
    if not mode:
        setattr(module, name, param(rngs, shape, names, cfg.weight_dtype, cfg.initializer_range))
        return
    codes, scale = quant.shapes(tuple(shape), mode, 0)
    dtype = jnp.int8 if mode == "int8" else jnp.uint8
    setattr(module, name + quant.SUFFIX_CODES, QuantCodes(jnp.zeros(codes, dtype), out_sharding=tuple(names),
                                                          eager_sharding=False))
    setattr(module, name + quant.SUFFIX_SCALE, QuantCodes(jnp.ones(scale, jnp.float32), out_sharding=tuple(names),
                                                          eager_sharding=False))


def kernel(module, name: str, dtype) -> jax.Array:
    """The weight `name` of `module` in `dtype`, dequantized when the base is stored quantized."""
    mode = module.lora.base_quant
    if not mode:
        return getattr(module, name)[...].astype(dtype)
    return quant.dequantize(getattr(module, name + quant.SUFFIX_CODES)[...],
                            getattr(module, name + quant.SUFFIX_SCALE)[...], mode, 0, dtype)


class Adapted:
    """LoRA adapters (model/lora.py) on a module's projections: `add_adapters` after its base weights,
    `adapted` adds a projection's update to its output."""

    def add_adapters(self, rngs: nnx.Rngs, cfg: ModelConfig, shapes: dict) -> None:
        """shapes: projection -> (input shape, output shape, input axis names, output axis names)."""
        self.lora = cfg.lora
        for name, (i, o, i_names, o_names) in shapes.items():
            if cfg.lora.targets_(name):
                a, b = lora.adapter_params(rngs, i, i_names, o, o_names, cfg.lora.rank)
                setattr(self, name + lora.SUFFIX_A, a)
                setattr(self, name + lora.SUFFIX_B, b)
        self.lora_key = lora.dropout_key(cfg.lora.rank, cfg.lora.dropout)

    def adapted(self, name: str, x: jax.Array, y: jax.Array) -> jax.Array:
        """y (= x @ W_name) plus the LoRA update of `name`, if it has one."""
        if not self.lora.targets_(name):
            return y
        return y + lora.update(x, getattr(self, name + lora.SUFFIX_A), getattr(self, name + lora.SUFFIX_B),
                               self.lora.scale, self.dtype, self.lora_key, self.lora.dropout,
                               lora.TARGETS.index(name))


def bias(module, name: str, shape, names, cfg: ModelConfig) -> None:
    """Set `module.<name>_bias`, zeros (HF nn.Linear biases; never quantized)."""
    setattr(module, name + "_bias", param(None, shape, names, cfg.weight_dtype, None, fill=0.0))


class RMSNorm(nnx.Module):
    """Over the last axis (`size`: hidden_size, or head_dim for the q/k norms). llama style:
    w * norm(x) with norm(x) cast to x's dtype first (HF LlamaRMSNorm); gemma style: (1 + w) * norm(x)
    all in fp32, then cast (HF Gemma3RMSNorm), w starting at 0."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, size: int | None = None, names=("norm",)):
        self.gemma = cfg.norm_style == "gemma"
        self.weight = param(rngs, (size or cfg.hidden_size,), names, cfg.weight_dtype, None,
                            fill=0.0 if self.gemma else 1.0)
        self.eps = cfg.rms_norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in fp32 whatever the compute dtype, as HF's RMSNorms do.
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.gemma:
            return (xf * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...].astype(x.dtype) * xf.astype(x.dtype)


# ------------------------------------------------------------------ per-layer windows and RoPE

FULL_WINDOW = 1 << 30  # a full-attention layer's window in a model that also has sliding ones


class Layer(NamedTuple):
    """What differs between layers, one scalar each (scanned as (layers,) arrays)."""

    window: jax.Array  # keys fewer than this many tokens back are visible
    rope: jax.Array  # 0: the rope_theta table, 1: the rope_local_theta one


def layer_plan(cfg: ModelConfig) -> Layer | None:
    """Per-layer windows and RoPE tables as (layers,) int32 arrays; None when every layer is full."""
    sliding = np.asarray(cfg.sliding_layers())
    if not sliding.any():
        return None
    window = np.where(sliding, cfg.sliding_window, FULL_WINDOW).astype(np.int32)
    rope = (sliding & (cfg.rope_local_theta is not None)).astype(np.int32)
    return Layer(window, rope)


def pick_rope(ropes, layer: Layer | None):
    """(cos, sin) of this layer: the only table, or the one its `rope` names."""
    if len(ropes) == 1 or layer is None:
        return ropes[0]
    local = layer.rope == 1
    return tuple(jnp.where(local, l, g) for g, l in zip(ropes[0], ropes[1]))


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies of rotate-half RoPE, with LLaMA-3.1 scaling (HF's `_compute_llama3_parameters`)
    or linear scaling when configured, computed in float64 numpy then cast, so they are exact."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv_freq.astype(np.float32)
    if scaling.rope_type == "linear":
        return (inv_freq.astype(np.float32) / np.float32(scaling.factor)).astype(np.float32)
    if scaling.rope_type != "llama3":
        raise ValueError(f"rope_scaling type {scaling.rope_type!r} is not supported (only llama3, linear)")
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray, platform: str) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape (batch, seq, head_dim) for integer positions (batch, seq).

    On CPU they are computed behind a conditional (`cpu.cpu_conditional`): XLA:CPU otherwise copies
    the sin/cos into every fusion that reads them, so each head of each attention block slice,
    forward and backward, recomputes them. Positions within the row's length (training, prefill)
    are looked up in a (seq, head_dim) table; any others are computed directly, with the same
    float32 arithmetic."""
    length = positions.shape[-1]

    def lookup(p):
        cos, sin = _rope_tables(jnp.arange(length), inv_freq)
        return jnp.take(cos, p, axis=0), jnp.take(sin, p, axis=0)

    in_table = jnp.all((positions >= 0) & (positions < length))
    return cpu.cpu_conditional(platform, in_table, lookup, lambda p: _rope_tables(p, inv_freq), positions)


def _rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE (HF layout) on x of shape (batch, seq, heads, head_dim)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


class MLP(Adapted, nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), act SiLU (SwiGLU) or tanh GELU (GeGLU). SwiGLU on CPU
    has a hand-written backward pass (`cpu.swiglu`), where it was measured to help; everything else
    runs under autodiff."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        projection(self, rngs, cfg, "gate", (d, f), ("embed", "mlp"))
        projection(self, rngs, cfg, "up", (d, f), ("embed", "mlp"))
        projection(self, rngs, cfg, "down", (f, d), ("mlp", "embed"))
        self.dtype = cfg.compute_dtype
        self.platform = cfg.platform
        self.act = cfg.hidden_act
        self.add_adapters(rngs, cfg, {"gate": ((d,), (f,), ("embed",), ("mlp",)),
                                      "up": ((d,), (f,), ("embed",), ("mlp",)),
                                      "down": ((f,), (d,), ("mlp",), ("embed",))})

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        gate, up, down = kernel(self, "gate", dt), kernel(self, "up", dt), kernel(self, "down", dt)
        act = ACTIVATIONS[self.act]
        if not any(self.lora.targets_(n) for n in ("gate", "up", "down")):
            if decided(self.platform) == "cpu" and self.act == "silu":  # its backward pass is SiLU's
                return cpu.swiglu(x, gate, up, down)
            return constrain(act(x @ gate) * (x @ up), ("batch", "seq", "act_mlp")) @ down
        # With adapters: autodiff of the plain formula (cpu.swiglu's hand-written backward pass
        # has no adapter terms).
        h = act(self.adapted("gate", x, x @ gate)) * self.adapted("up", x, x @ up)
        h = constrain(h, ("batch", "seq", "act_mlp"))
        return self.adapted("down", h, h @ down)
