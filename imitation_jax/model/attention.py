"""Causal attention over packed rows, behind one function with an implementation switch.

`xla` and `cudnn` go through `jax.nn.dot_product_attention`; `einsum` is a grouped-query einsum
with an fp32 masked softmax in causal query blocks and a hand-written backward pass, which
measured fastest on CPUs (`cpu.einsum_attention`). `auto` picks by the model's platform: cudnn on
GPU, einsum on CPU, xla elsewhere. Every implementation sees the same mask: causal AND same
segment, so attention never crosses the boundary between two examples packed in one row.
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


def segment_mask(segment_ids: jax.Array, causal: bool = True) -> jax.Array:
    """(batch, 1, q, k) boolean: key visible to query."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
        t = segment_ids.shape[1]
        same = same & jnp.tril(jnp.ones((t, t), dtype=bool))[None]
    return same[:, None]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, impl: str,
              platform: str) -> jax.Array:
    """q: (B, T, H, D); k, v: (B, T, KV, D) with H a multiple of KV; returns (B, T, H, D)."""
    impl = resolve_impl(impl, platform, q.dtype)
    if impl == "einsum":
        return einsum_attention(q, k, v, segment_mask(segment_ids), platform)
    if impl == "cudnn":
        # cuDNN applies the causal part itself (and skips the masked blocks).
        return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids, causal=False),
                                            is_causal=True, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids), implementation=impl)


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

