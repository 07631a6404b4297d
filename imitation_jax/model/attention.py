"""Causal attention over packed rows, behind one function with an implementation switch.

`xla` and `cudnn` go through `jax.nn.dot_product_attention`; `einsum` is a grouped-query einsum
with an fp32 masked softmax in causal query blocks and a hand-written backward pass, which
measured fastest on CPUs. `auto` picks cudnn on GPU, einsum on
CPU and xla elsewhere. Every implementation sees the same mask: causal AND same segment, so
attention never crosses the boundary between two examples packed in one row.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from imitation_jax.model.cpu_fusion import cpu_conditional, default_platform


def resolve_impl(impl: str, dtype=None) -> str:
    if impl != "auto":
        return impl
    platform = default_platform()
    if platform in ("gpu", "cuda"):  # cuDNN's fused attention has fp16/bf16 kernels only
        return "cudnn" if dtype is None or jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"
    return {"cpu": "einsum"}.get(platform, "xla")


def segment_mask(segment_ids: jax.Array, causal: bool = True) -> jax.Array:
    """(batch, 1, q, k) boolean: key visible to query."""
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    if causal:
        t = segment_ids.shape[1]
        same = same & jnp.tril(jnp.ones((t, t), dtype=bool))[None]
    return same[:, None]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, impl: str) -> jax.Array:
    """q: (B, T, H, D); k, v: (B, T, KV, D) with H a multiple of KV; returns (B, T, H, D)."""
    impl = resolve_impl(impl, q.dtype)
    if impl == "einsum":
        return _einsum_attention(q, k, v, segment_mask(segment_ids))
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


QUERY_BLOCK = 128  # einsum attention: rows of queries per block (keys after a block are skipped)


def _einsum_attention(q, k, v, mask):
    """Grouped-query einsum attention, head-major, in causal query blocks, with a hand-written
    backward pass. Block i of queries only meets keys [0, end of block i): a quarter to a half of
    the (T, T) scores are never computed. On CPU (4 x 512 tokens, 8 heads of 64) one layer's
    forward + backward of this core drops from 142 ms (autodiff of one masked softmax) to 63 ms.

    Scores are kept keys-major, (keys, queries), and queries and outputs transposed and
    block-major, (blocks, b, kv, d, group * block): then each of the six products of the forward
    and backward passes is a plain or right-transposed matmul, which XLA:CPU hands to its fast
    library path (YNNPACK). With scores (queries, keys), the two backward products that contract
    over queries (dK, dV) need a transposed left operand and fell back to a slower matmul
    (~3% of a CPU training step)."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    block = QUERY_BLOCK if t % QUERY_BLOCK == 0 else t
    nb, g = t // block, h // kv
    qt = q.reshape(b, nb, block, kv, g, d).transpose(1, 0, 3, 5, 4, 2).reshape(nb, b, kv, d, g * block)
    out = _blocked_core(qt, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, block)
    return out.reshape(nb, b, kv, d, g, block).transpose(1, 0, 5, 2, 4, 3).reshape(b, t, h, d)


def _spans(t: int, block: int) -> list[tuple[int, int]]:
    return [(lo, lo + block) for lo in range(0, t, block)]


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked_core(qt, k, v, mask, block):
    return _blocked_fwd(qt, k, v, mask, block)[0]


def _blocked_fwd(qt, k, v, mask, block):
    """qt (blocks, b, kv, d, g * block); k, v (b, kv, t, d); mask (b, 1, t, t) -> like qt.

    Per block: S^T = K Q^T, P^T = softmax over keys, O^T = V^T P^T. The backward pass needs each
    block's P^T, its key prefix transposed and its value prefix: kept, since slicing a prefix is
    a copy on CPU."""
    _, b, kv, d, gn = qt.shape
    g = gn // block
    # Computed once, on CPU behind a conditional (`cpu_fusion`): otherwise each block's slice redoes
    # the transpose, and the RoPE before it, from the projection output. Paired A/B on the CPU bench
    # (8 heads of 64, 4 x 512 tokens), ten runs, four beside a same-program control: 1-5% of a
    # training step; with grouped-query attention (smaller keys and values) no change. Both branches
    # are the same, so the predicate only has to be a value the compiler cannot fold.
    transposed = lambda k, v: (k.swapaxes(2, 3), v.swapaxes(2, 3))  # noqa: E731
    kt, vt = cpu_conditional(mask[0, 0, 0, 0], transposed, transposed, k, v)  # (b, kv, d, t)
    mask_t = mask.swapaxes(2, 3)  # (b, 1, key, query)
    outs, saved = [], []
    for i, (lo, hi) in enumerate(_spans(k.shape[2], block)):
        st = jnp.einsum("bksd,bkdq->bksq", k[:, :, :hi], qt[i], preferred_element_type=jnp.float32) * d ** -0.5
        st = jnp.where(mask_t[:, :, :hi, None, lo:hi], st.reshape(b, kv, hi, g, block), jnp.finfo(jnp.float32).min)
        pt = jax.nn.softmax(st, axis=2).reshape(b, kv, hi, gn).astype(v.dtype)
        outs.append(jnp.einsum("bkds,bksq->bkdq", vt[:, :, :, :hi], pt))
        saved.append((pt, kt[:, :, :, :hi], v[:, :, :hi]))
    out = jnp.stack(outs)
    return out, (qt, tuple(saved), out, k.shape)


def _blocked_bwd(block, res, dout):
    qt, saved, out, k_shape = res
    t, d = k_shape[2], k_shape[3]
    # Softmax backward through the output: rowsum(P * dP) = rowsum(dO * O), here per query column.
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=3, keepdims=True)
    dq, dk, dv = [], jnp.zeros(k_shape, jnp.float32), jnp.zeros(k_shape, jnp.float32)
    for i, ((lo, hi), (pt, kt, vp)) in enumerate(zip(_spans(t, block), saved)):
        dv = dv.at[:, :, :hi].add(jnp.einsum("bksq,bkdq->bksd", pt, dout[i], preferred_element_type=jnp.float32))
        dpt = jnp.einsum("bksd,bkdq->bksq", vp, dout[i], preferred_element_type=jnp.float32)
        dst = (pt.astype(jnp.float32) * (dpt - delta[i]) * d ** -0.5).astype(qt.dtype)
        dq.append(jnp.einsum("bkds,bksq->bkdq", kt, dst))
        dk = dk.at[:, :, :hi].add(jnp.einsum("bksq,bkdq->bksd", dst, qt[i], preferred_element_type=jnp.float32))
    return jnp.stack(dq), dk.astype(kt.dtype), dv.astype(vp.dtype), None


_blocked_core.defvjp(_blocked_fwd, _blocked_bwd)
