"""Causal attention over packed rows, behind one function with an implementation switch.

`xla` and `cudnn` go through `jax.nn.dot_product_attention`; `einsum` is a grouped-query einsum
with an fp32 masked softmax in causal query blocks and a hand-written backward pass, which
measured fastest on CPUs (`cpu.einsum_attention`). `auto` picks by the model's platform: cudnn on
GPU, einsum on CPU, xla elsewhere. Every implementation sees the same mask: causal AND same
segment, so attention never crosses the boundary between two examples packed in one row, AND, for
a sliding-window layer, within `window` tokens (the query itself included, as HF's
`kv_idx > q_idx - window`). Tokens of one example are contiguous in a row, so the distance in the
row is the distance in positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imitation_jax.model.config import decided
from imitation_jax.model.cpu import einsum_attention


def resolve_impl(impl: str, platform: str, dtype=None) -> str:
    """The implementation `impl` names on `platform` (ModelConfig.platform, decided from the mesh)."""
    if impl != "auto":
        return impl
    if decided(platform) == "gpu":  # cuDNN's fused attention has fp16/bf16 kernels only
        return "cudnn" if dtype is None or jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"
    return {"cpu": "einsum"}.get(platform, "xla")


def segment_mask(segment_ids: jax.Array, causal: bool = True, window: jax.Array | None = None) -> jax.Array:
    """(batch, 1, q, k) boolean: key visible to query. `window` (a scalar, possibly traced: a layer's
    own under the layer scan) keeps keys less than `window` tokens before the query."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    t = segment_ids.shape[1]
    if causal:
        same = same & jnp.tril(jnp.ones((t, t), dtype=bool))[None]
    if window is not None:
        same = same & within_window(jnp.arange(t), t, window)[None]
    return same[:, None]


def within_window(query: jax.Array, keys: int, window: jax.Array) -> jax.Array:
    """(len(query), keys) boolean: key slot k is fewer than `window` slots before query slot q (or after it)."""
    return (query[:, None] - jnp.arange(keys)[None, :]) < window


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, impl: str,
              platform: str, window: jax.Array | None = None) -> jax.Array:
    """q: (B, T, H, D); k, v: (B, T, KV, D) with H a multiple of KV; returns (B, T, H, D). The
    einsum kernel's block skipping only drops keys after a block, so a window mask is exact there too."""
    impl = resolve_impl(impl, platform, q.dtype)
    if impl == "einsum":
        return einsum_attention(q, k, v, segment_mask(segment_ids, window=window), platform)
    if impl == "cudnn":
        # cuDNN applies the causal part itself (and skips the masked blocks).
        return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids, causal=False, window=window),
                                            is_causal=True, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids, window=window), implementation=impl)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Decoding: q (B, T, H, D) over cached keys/values (B, S, KV, D) with a boolean mask
    (B, 1, T, S); fp32 scores and softmax. T is a decode step or a few, so no blocking (a prompt
    goes through `attention`, as in training)."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * d ** -0.5
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)

