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


def _chunk_terms(h, kernel, y, m, with_grads: bool):
    """h (R, D), y (R,), m (R,) fp32 -> loss sum, correct sum[, dh (R, D), dkernel (D, V) fp32]."""
    logits = jnp.dot(h, kernel, preferred_element_type=jnp.float32)
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    sumexp = jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True)
    target = jnp.take_along_axis(shifted, y[:, None], axis=-1)
    loss = jnp.sum((jnp.log(sumexp) - target)[:, 0] * m)
    correct = jnp.sum((target[:, 0] >= 0).astype(jnp.float32) * m)  # the target logit is a maximum
    if not with_grads:
        return loss, correct
    onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == y[:, None]
    dlogits = ((jnp.exp(shifted) / sumexp - onehot) * m[:, None]).astype(h.dtype)
    dh = jnp.dot(dlogits, kernel.T, preferred_element_type=jnp.float32)
    dk = jnp.dot(h.T, dlogits, preferred_element_type=jnp.float32)
    return loss, correct, dh, dk


def _over_chunks(h, kernel, y, m, live, rows: int, with_grads: bool):
    """Loop over chunks of `rows` tokens, computing only the first `live` chunks (the caller puts
    trained tokens first, so the chunks after them hold nothing to learn)."""
    n, d = h.shape
    if rows >= n:
        return _chunk_terms(h, kernel, y, m, with_grads)
    split = lambda x: x.reshape(n // rows, rows, *x.shape[1:])  # noqa: E731
    zero = jnp.zeros((), jnp.float32)

    def body(carry, xs):
        i, hc, yc, mc = xs

        def compute(carry):
            out = _chunk_terms(hc, kernel, yc, mc, with_grads)
            summed = (carry[0] + out[0], carry[1] + out[1]) + ((carry[2] + out[3],) if with_grads else ())
            return summed, (out[2] if with_grads else None)

        def skip(carry):
            return carry, (jnp.zeros((rows, d), jnp.float32) if with_grads else None)

        return jax.lax.cond(i < live, compute, skip, carry)

    init = (zero, zero) + ((jnp.zeros(kernel.shape, jnp.float32),) if with_grads else ())
    carry, dh = jax.lax.scan(body, init, (jnp.arange(n // rows), split(h), split(y), split(m)))
    if not with_grads:
        return carry
    return carry[0], carry[1], dh.reshape(n, d), carry[2]


@partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused_ce(h, kernel, y, m, live, rows):
    return _over_chunks(h, kernel, y, m, live, rows, with_grads=False)


def _fused_ce_fwd(h, kernel, y, m, live, rows):
    loss, correct, dh, dk = _over_chunks(h, kernel, y, m, live, rows, with_grads=True)
    return (loss, correct), (dh.astype(h.dtype), dk.astype(kernel.dtype))


def _fused_ce_bwd(rows, res, g):
    dh, dk = res
    return (dh * g[0]).astype(dh.dtype), (dk * g[0]).astype(dk.dtype), None, None, None


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def masked_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, mask: jax.Array,
                         chunk: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """hidden (B, T, D), kernel (D, V), targets (B, T) int, mask (B, T) {0, 1}.

    chunk > 0 computes the logits of (B, chunk) tokens at a time (never more fp32 logits than
    that), each row's trained tokens first, and skips the chunks after the last trained token of
    every row: with half of each row trained, the output layer costs half.
    """
    b, t, d = hidden.shape
    mask = mask.astype(jnp.float32)
    kernel = kernel.astype(hidden.dtype)
    if chunk <= 0 or chunk >= t:
        live, rows = jnp.ones((), jnp.int32), b * t
    else:
        if t % chunk:  # pad the rows with untrained positions (they sort last and are skipped)
            pad = chunk - t % chunk
            hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
            targets, mask = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))
            t += pad
        # Trained tokens first within each row (rows stay where the batch sharding put them); the
        # loss is a sum, so the order does not matter. Chunk c holds positions [c*chunk, (c+1)*chunk)
        # of every row and is computed only if some row still has trained tokens there.
        order = jnp.argsort(mask == 0, axis=1, stable=True)
        hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)
        targets, mask = jnp.take_along_axis(targets, order, axis=1), jnp.take_along_axis(mask, order, axis=1)
        live = (jnp.max(jnp.sum(mask > 0, axis=1)) + chunk - 1) // chunk

        def to_chunks(x):  # (B, T, ...) -> (T/chunk * B * chunk, ...), chunk-major
            x = jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)
            return x.reshape(t * b, *x.shape[3:])

        hidden, targets, mask = to_chunks(hidden), to_chunks(targets), to_chunks(mask)
        rows = b * chunk
    loss, correct = _fused_ce(hidden.reshape(b * t, d), kernel, targets.reshape(-1), mask.reshape(-1), live, rows)
    return loss, correct, jnp.sum(mask)
