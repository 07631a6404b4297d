"""What runs only on CPU (`ModelConfig.platform == "cpu"`): the kernels and XLA:CPU workarounds the
model is traced with there and nowhere else. Figures: docs/benchmarks.md.

- `cpu_conditional`: a fusion boundary. XLA:CPU copies cheap producers (sin/cos, transposes, RoPE)
  into every fusion that consumes them, so a value read by many slices is recomputed for each;
  `optimization_barrier` does not stop it (it is removed before fusion on CPU), a conditional does.
  Used for the RoPE tables (`layers.rope_tables`) and the attention's transposed keys and values.
- `swiglu`: the MLP with a hand-written backward pass (`layers.MLP`; autodiff on other platforms).
- `einsum_attention`: blocked causal attention with a hand-written backward pass, what
  `attention="auto"` picks on CPU (`attention.resolve_impl`; it runs anywhere when named).
- `COMPILER_OPTIONS`: XLA:CPU flags for the jitted train and eval steps (`train.step`).

Not here because it acts before JAX starts: keeping freed host memory in the process (`host_memory`).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from imitation_jax.model.config import decided
from imitation_jax.sharding import constrain

# XLA:CPU prefers 256-bit vectors by default (against AVX-512 frequency drops); 512-bit ones made
# the bench's training step faster on an AVX-512 CPU. Without AVX-512, LLVM keeps the widest it has.
COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512}


def cpu_conditional(platform: str, pred: jax.Array, on_true, on_false, *operands):
    """`lax.cond(pred, on_true, on_false, *operands)` on CPU, so each branch's result is computed
    once; `on_false(*operands)` elsewhere. Both branches must give the same values (up to rounding):
    the conditional is there for the fusion boundary, not for a choice that changes results."""
    if decided(platform) != "cpu":
        return on_false(*operands)
    return jax.lax.cond(pred, on_true, on_false, *operands)


# ------------------------------------------------------------------------------------------ SwiGLU


def _swiglu_hidden(x, gate, up):
    a, b = x @ gate, x @ up
    return a, b, constrain(jax.nn.silu(a) * b, ("batch", "seq", "act_mlp"))


@jax.custom_vjp
def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """(silu(x @ gate) * (x @ up)) @ down for x (..., d).

    The backward pass is written out as 2-D matmuls over (tokens, features): XLA:CPU's own
    derivative fuses the SiLU derivative into a transposing copy that cost more than the MLP's
    matmuls."""
    return _swiglu_hidden(x, gate, up)[2] @ down


def _swiglu_fwd(x, gate, up, down):
    a, b, h = _swiglu_hidden(x, gate, up)
    return h @ down, (x, a, b, h, gate, up, down)


def _swiglu_bwd(res, dy):
    x, a, b, h, gate, up, down = res
    flat = lambda v: v.reshape(-1, v.shape[-1])  # noqa: E731
    x2, a2, b2, h2, dy2 = flat(x), flat(a), flat(b), flat(h), flat(dy)
    dh = dy2 @ down.T
    sig = jax.nn.sigmoid(a2.astype(jnp.float32))
    a32, dh32 = a2.astype(jnp.float32), dh.astype(jnp.float32)
    da = (dh32 * b2.astype(jnp.float32) * sig * (1 + a32 * (1 - sig))).astype(x.dtype)
    db = (dh32 * a32 * sig).astype(x.dtype)
    dx = da @ gate.T + db @ up.T
    return dx.reshape(x.shape), x2.T @ da, x2.T @ db, h2.T @ dy2


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


# ------------------------------------------------------------------------------- einsum attention

QUERY_BLOCK = 128  # einsum attention: rows of queries per block (keys after a block are skipped)


def einsum_attention(q, k, v, mask, platform: str):
    """Grouped-query einsum attention, head-major, in causal query blocks, with a hand-written
    backward pass: q (B, T, H, D), k and v (B, T, KV, D), mask (B, 1, T, T) -> (B, T, H, D).
    Block i of queries only meets keys [0, end of block i): a quarter to a half of the (T, T)
    scores are never computed, and the backward pass beats autodiff of one masked softmax.

    Scores are kept keys-major, (keys, queries), and queries and outputs transposed and
    block-major, (blocks, b, kv, d, group * block): then each of the six products of the forward
    and backward passes is a plain or right-transposed matmul, which XLA:CPU hands to its fast
    library path (YNNPACK). With scores (queries, keys), the two backward products that contract
    over queries (dK, dV) need a transposed left operand and fall back to a slower matmul."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    block = QUERY_BLOCK if t % QUERY_BLOCK == 0 else t
    nb, g = t // block, h // kv
    qt = q.reshape(b, nb, block, kv, g, d).transpose(1, 0, 3, 5, 4, 2).reshape(nb, b, kv, d, g * block)
    out = _blocked_core(qt, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, block, decided(platform))
    return out.reshape(nb, b, kv, d, g, block).transpose(1, 0, 5, 2, 4, 3).reshape(b, t, h, d)


def _spans(t: int, block: int) -> list[tuple[int, int]]:
    return [(lo, lo + block) for lo in range(0, t, block)]


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blocked_core(qt, k, v, mask, block, platform):
    return _blocked_fwd(qt, k, v, mask, block, platform)[0]


def _blocked_fwd(qt, k, v, mask, block, platform):
    """qt (blocks, b, kv, d, g * block); k, v (b, kv, t, d); mask (b, 1, t, t) -> like qt.

    Per block: S^T = K Q^T, P^T = softmax over keys, O^T = V^T P^T. The backward pass needs each
    block's P^T, its key prefix transposed and its value prefix: kept, since slicing a prefix is
    a copy on CPU."""
    _, b, kv, d, gn = qt.shape
    g = gn // block
    # Computed once, on CPU behind a conditional: otherwise each block's slice redoes the transpose,
    # and the RoPE before it, from the projection output (no gain measured with grouped-query
    # attention's smaller keys and values, no loss either). Both branches are the same, so the
    # predicate only has to be a value the compiler cannot fold.
    transposed = lambda k, v: (k.swapaxes(2, 3), v.swapaxes(2, 3))  # noqa: E731
    kt, vt = cpu_conditional(platform, mask[0, 0, 0, 0], transposed, transposed, k, v)  # (b, kv, d, t)
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


def _blocked_bwd(block, platform, res, dout):
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
