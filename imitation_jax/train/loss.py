"""Masked next-token cross entropy, in fp32, from final hidden states.

Returns *sums* (loss, correct predictions, trained tokens); the caller divides by the number of
trained tokens in the whole global batch, so gradient accumulation and data parallelism weight
every trained token the same.

The output layer and the cross entropy are one `jax.custom_vjp` ("fused linear cross entropy"):
under differentiation the forward pass computes d(loss)/d(hidden) and d(loss)/d(kernel) while the
logits are at hand, so no (tokens, vocab) tensor outlives its chunk, nothing is recomputed, and
the backward pass only scales them. Without differentiation (evaluation) only the loss is computed.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx


def _identity(params, h):
    return h


def cross_entropy_rows(logits, y, lse_top=None):
    """Cross entropy of (rows, V) fp32 logits per row: (loss (rows,), correct (rows,) {0, 1}, grad)
    where grad(w) is d(sum w * loss)/d(logits) for row weights w (rows,). lse_top: the logits'
    (log-sum-exp, max), each (rows, 1), when the caller has them already. Few passes over the
    logits: the max fuses into the matmul, the log-sum-exp is a reduction that writes nothing, and
    the softmax is recomputed from it inside the one pass that writes the gradient (faster than
    materialising exp(logits - max); docs/benchmarks.md)."""
    if lse_top is None:
        top = jnp.max(logits, axis=-1, keepdims=True)
        lse = top + jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True))
    else:
        lse, top = lse_top
    target = jnp.take_along_axis(logits, y[:, None], axis=-1)
    correct = (target >= top)[:, 0].astype(jnp.float32)  # the target logit is a maximum

    def grad(w):
        onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == y[:, None]
        return jnp.exp(logits - lse) * w[:, None] - jnp.where(onehot, w[:, None], 0.0)

    return (lse - target)[:, 0], correct, grad


def cross_entropy_terms(logits, y, m, with_grads: bool):
    """Masked cross entropy of (rows, V) fp32 logits: loss sum, correct sum, dlogits (None without
    grads)."""
    loss, correct, grad = cross_entropy_rows(logits, y)
    return jnp.sum(loss * m), jnp.sum(correct * m), grad(m) if with_grads else None


def output_layer(tail, params, xs, kernel, with_grads: bool):
    """One chunk's logits: xs (B, C, ...) tail inputs -> (rows, V) fp32 logits and, with grads, a
    function taking d(loss)/d(logits) to (d(tail params), d(xs), dkernel (D, V) fp32)."""
    if with_grads:
        hidden, tail_vjp = jax.vjp(tail, params, *xs)
    else:
        hidden = tail(params, *xs)
    h = hidden.reshape(-1, hidden.shape[-1])
    logits = jnp.dot(h, kernel, preferred_element_type=jnp.float32)
    if not with_grads:
        return logits, None

    def backward(dlogits):
        dlogits = dlogits.astype(h.dtype)
        dh = jnp.dot(dlogits, kernel.T, preferred_element_type=jnp.float32)
        dk = jnp.dot(h.T, dlogits, preferred_element_type=jnp.float32)
        dparams, *dxs = tail_vjp(dh.astype(hidden.dtype).reshape(hidden.shape))
        return dparams, tuple(dxs), dk

    return logits, backward


def _chunk_terms(tail, params, xs, kernel, y, m, with_grads: bool):
    """One chunk: xs (B, C, ...) tail inputs, y (B*C,), m (B*C,) fp32 -> loss sum, correct sum
    [, d(tail params), d(xs), dkernel (D, V) fp32]."""
    logits, backward = output_layer(tail, params, xs, kernel, with_grads)
    loss, correct, dlogits = cross_entropy_terms(logits, y, m, with_grads)
    if not with_grads:
        return loss, correct
    return (loss, correct, *backward(dlogits))


def _over_chunks(tail, params, xs, kernel, y, m, live, with_grads: bool):
    """xs: tail inputs (n, B, C, ...), y and m (n, B*C): a loop over the n chunks that computes only
    the first `live` (the caller puts trained tokens first, so the chunks after them hold nothing
    to learn)."""
    n = y.shape[0]
    if n == 1:
        out = _chunk_terms(tail, params, [x[0] for x in xs], kernel, y[0], m[0], with_grads)
        return out if not with_grads else out[:3] + (tuple(d[None] for d in out[3]),) + out[4:]
    f32_zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), tree)  # noqa: E731
    zero = jnp.zeros((), jnp.float32)

    def body(carry, chunk):
        i, xc, yc, mc = chunk

        def compute(carry):
            out = _chunk_terms(tail, params, xc, kernel, yc, mc, with_grads)
            summed = (carry[0] + out[0], carry[1] + out[1])
            if not with_grads:
                return summed, None
            return summed + jax.tree.map(jnp.add, carry[2:], (out[2], out[4])), out[3]

        def skip(carry):
            return carry, (tuple(jnp.zeros(x.shape, x.dtype) for x in xc) if with_grads else None)

        return jax.lax.cond(i < live, compute, skip, carry)

    init = (zero, zero) + ((f32_zeros(params), f32_zeros(kernel)) if with_grads else ())
    carry, dxs = jax.lax.scan(body, init, (jnp.arange(n), tuple(xs), y, m))
    if not with_grads:
        return carry
    return carry[0], carry[1], carry[2], dxs, carry[3]


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_ce(tail, params, xs, kernel, y, m, live):
    return _over_chunks(tail, params, xs, kernel, y, m, live, with_grads=False)


def _fused_ce_fwd(tail, params, xs, kernel, y, m, live):
    loss, correct, dparams, dxs, dk = _over_chunks(tail, params, xs, kernel, y, m, live, with_grads=True)
    cast = lambda d, like: jax.tree.map(lambda a, b: a.astype(b.dtype), d, like)  # noqa: E731
    return (loss, correct), (cast(dparams, params), cast(tuple(dxs), tuple(xs)), dk.astype(kernel.dtype))


def _fused_ce_bwd(tail, res, g):
    scale = lambda tree: jax.tree.map(lambda a: (a * g[0]).astype(a.dtype), tree)  # noqa: E731
    dparams, dxs, dk = res
    return scale(dparams), scale(dxs), scale(dk), None, None, None


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def masked_cross_entropy(hidden, kernel: jax.Array, targets: jax.Array, mask: jax.Array, chunk: int = 0,
                         tail: nnx.Module | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """hidden (B, T, D), kernel (D, V), targets (B, T) int, mask (B, T) {0, 1}.

    chunk > 0 computes the logits of (B, chunk) tokens at a time (never more fp32 logits than
    that), each row's trained tokens first, and skips the chunks after the last trained token of
    every row: with half of each row trained, the output layer costs half.

    With `tail` (an nnx module mapping its inputs position by position to hidden states, such as
    `Llama.trunk`'s), `hidden` is a tuple of its inputs, each (B, T, ...): the tail then runs inside
    the chunks too, so it is computed, and differentiated, for the live chunks only.
    """
    if tail is None:
        call, params, xs = _identity, (), (hidden,)
    else:
        graphdef, params = nnx.split(tail)
        call, xs = partial(_call_module, graphdef), tuple(hidden)
    b, t = targets.shape
    mask = mask.astype(jnp.float32)
    kernel = kernel.astype(xs[0].dtype)
    if chunk <= 0 or chunk >= t:
        live, chunk = jnp.ones((), jnp.int32), t
    else:
        if t % chunk:  # pad the rows with untrained positions (they sort last and are skipped)
            pad = chunk - t % chunk
            xs = tuple(jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)) for x in xs)
            targets, mask = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))
            t += pad
        # Trained tokens first within each row (rows stay where the batch sharding put them); the
        # loss is a sum, so the order does not matter. Chunk c holds positions [c*chunk, (c+1)*chunk)
        # of every row and is computed only if some row still has trained tokens there.
        order = jnp.argsort(mask == 0, axis=1, stable=True)
        xs = tuple(jnp.take_along_axis(x, order.reshape(b, t, *(1,) * (x.ndim - 2)), axis=1) for x in xs)
        targets, mask = jnp.take_along_axis(targets, order, axis=1), jnp.take_along_axis(mask, order, axis=1)
        live = (jnp.max(jnp.sum(mask > 0, axis=1)) + chunk - 1) // chunk

    def to_chunks(x):  # (B, T, ...) -> (T/chunk, B, chunk, ...)
        return jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)

    flat = lambda x: to_chunks(x).reshape(t // chunk, b * chunk)  # noqa: E731
    loss, correct = _fused_ce(call, params, tuple(to_chunks(x) for x in xs), kernel, flat(targets), flat(mask), live)
    return loss, correct, jnp.sum(mask)


def _call_module(graphdef, params, *xs):
    return nnx.merge(graphdef, params)(*xs)
