"""A frozen LoRA base stored quantized (QLoRA, Dettmers et al. 2023), dequantized per layer in the
forward pass: `model.lora.base_quant` int8 or nf4 for the seven block projections (q, k, v, o,
gate, up, down); embeddings, output layer and norms stay in `model.param_dtype`.

Both modes scale blocks of BLOCK values along the weight's first input axis (the whole axis when
BLOCK does not divide it) by their absolute maximum (a float32 scale per block):
  int8: code = round(127 w / absmax), stored as int8        (1 + 4/BLOCK bytes per parameter)
  nf4:  code = the nearest of the 16 NormalFloat levels of w / absmax, two codes per uint8
        (0.5 + 4/BLOCK bytes per parameter)
Codes keep the weight's shape (nf4: that axis halved) and logical axis names, so they are sharded
by the weight's rules; scales take the same names (a dimension the mesh does not divide stays
replicated).

Written for this model's stacked, multi-axis kernels rather than through qwix: qwix quantizes by
intercepting the matmuls of matched modules, which would bypass our adapters' own code path and
our CPU kernels; the arithmetic needed here is these two functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("int8", "nf4")
BLOCK = 64
QUANTIZED = ("q", "k", "v", "o", "gate", "up", "down")
SUFFIX_CODES, SUFFIX_SCALE = "_codes", "_scale"

# The 16 NormalFloat4 levels (QLoRA, appendix E): quantiles of N(0, 1) scaled to [-1, 1], with an
# exact zero.
NF4_LEVELS = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def block_size(n: int) -> int:
    return BLOCK if n % BLOCK == 0 else n


def shapes(shape: tuple[int, ...], mode: str, axis: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(codes shape, scale shape) of a weight of `shape` quantized along `axis`."""
    n = shape[axis]
    if mode == "nf4" and n % 2:
        raise ValueError(f"model.lora.base_quant=nf4 packs two codes per byte along an axis of {n} (odd)")
    codes = shape[:axis] + ((n // 2 if mode == "nf4" else n),) + shape[axis + 1:]
    scale = shape[:axis] + (n // block_size(n),) + shape[axis + 1:]
    return codes, scale


def _blocked(x: jax.Array, axis: int) -> jax.Array:
    n = x.shape[axis]
    b = block_size(n)
    return x.reshape(*x.shape[:axis], n // b, b, *x.shape[axis + 1:])


def quantize(w: jax.Array, mode: str, axis: int) -> tuple[jax.Array, jax.Array]:
    """(codes, float32 scales) of `w` blocked along `axis`."""
    wb = _blocked(w.astype(jnp.float32), axis)
    absmax = jnp.max(jnp.abs(wb), axis=axis + 1, keepdims=True)
    safe = jnp.where(absmax > 0, absmax, 1.0)
    x = (wb / safe).reshape(w.shape)  # in [-1, 1]
    scale = jnp.squeeze(safe, axis + 1)
    if mode == "int8":
        return jnp.round(x * 127.0).astype(jnp.int8), scale
    levels = jnp.asarray(NF4_LEVELS)
    codes = jnp.argmin(jnp.abs(x[..., None] - levels), axis=-1).astype(jnp.uint8)
    pairs = codes.reshape(*w.shape[:axis], w.shape[axis] // 2, 2, *w.shape[axis + 1:])
    lo, hi = jnp.take(pairs, 0, axis=axis + 1), jnp.take(pairs, 1, axis=axis + 1)
    return (lo | (hi << 4)).astype(jnp.uint8), scale


def dequantize(codes: jax.Array, scale: jax.Array, mode: str, axis: int, dtype) -> jax.Array:
    """The weight `quantize` encoded, in `dtype`."""
    if mode == "int8":
        x = codes.astype(jnp.float32) * (1.0 / 127.0)
    else:
        lo, hi = codes & 15, codes >> 4
        both = jnp.stack([lo, hi], axis=axis + 1)
        idx = both.reshape(*codes.shape[:axis], codes.shape[axis] * 2, *codes.shape[axis + 1:])
        x = jnp.take(jnp.asarray(NF4_LEVELS), idx.astype(jnp.int32))
    xb = _blocked(x, axis) * jnp.expand_dims(scale, axis + 1)
    return xb.reshape(x.shape).astype(dtype)


def quantize_tree(base: dict, mode: str, stacked_axis: int = 1) -> dict:
    """A base's pure-dict params with each projection of QUANTIZED under layers/ replaced by its
    `<name>_codes` and `<name>_scale` (stacked weights: quantized along axis 1, the first input axis
    after the layer axis)."""
    out = {}
    for k, v in base.items():
        if isinstance(v, dict):
            out[k] = quantize_tree(v, mode, stacked_axis)
        elif k in QUANTIZED:
            out[k + SUFFIX_CODES], out[k + SUFFIX_SCALE] = quantize(v, mode, stacked_axis)
        else:
            out[k] = v
    return out


def dequantize_tree(params: dict, mode: str, dtype, stacked_axis: int = 1) -> dict:
    """The inverse of `quantize_tree` up to rounding: plain weights in `dtype`."""
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out[k] = dequantize_tree(v, mode, dtype, stacked_axis)
        elif k.endswith(SUFFIX_CODES):
            name = k[:-len(SUFFIX_CODES)]
            out[name] = dequantize(v, params[name + SUFFIX_SCALE], mode, stacked_axis, dtype)
        elif not k.endswith(SUFFIX_SCALE):
            out[k] = v
    return out
