"""Causal attention over packed rows, behind one function with an implementation switch.

`xla` and `cudnn` go through `jax.nn.dot_product_attention`; `einsum` is a grouped-query einsum
with an fp32 masked softmax, which measured fastest on CPUs. `auto` picks cudnn on GPU, einsum on
CPU and xla elsewhere. Every implementation sees the same mask: causal AND same segment, so
attention never crosses the boundary between two examples packed in one row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def resolve_impl(impl: str) -> str:
    if impl != "auto":
        return impl
    platform = jax.devices()[0].platform
    return {"gpu": "cudnn", "cuda": "cudnn", "cpu": "einsum"}.get(platform, "xla")


def segment_mask(segment_ids: jax.Array, causal: bool = True) -> jax.Array:
    """(batch, 1, q, k) boolean: key visible to query."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
        t = segment_ids.shape[1]
        same = same & jnp.tril(jnp.ones((t, t), dtype=bool))[None]
    return same[:, None]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, impl: str) -> jax.Array:
    """q: (B, T, H, D); k, v: (B, T, KV, D) with H a multiple of KV; returns (B, T, H, D)."""
    impl = resolve_impl(impl)
    if impl == "einsum":
        return _einsum_attention(q, k, v, segment_mask(segment_ids))
    if impl == "cudnn":
        # cuDNN applies the causal part itself (and skips the masked blocks).
        return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids, causal=False),
                                            is_causal=True, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, mask=segment_mask(segment_ids), implementation=impl)


def _einsum_attention(q, k, v, mask):
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)
