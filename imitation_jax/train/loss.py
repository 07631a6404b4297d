"""Masked next-token cross entropy, in fp32, from final hidden states.

Returns *sums* (loss, correct predictions, trained tokens); the caller divides by the number of
trained tokens in the whole global batch, so gradient accumulation and data parallelism weight
every trained token the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _token_terms(hidden, kernel, targets, mask):
    logits = jnp.einsum("...d,dv->...v", hidden, kernel, preferred_element_type=jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum((logz - target_logit) * mask), jnp.sum(correct * mask)


def masked_cross_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, mask: jax.Array,
                         chunk: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """hidden (B, T, D), kernel (D, V), targets (B, T) int, mask (B, T) {0, 1}.

    chunk > 0 computes logits `chunk` sequence positions at a time under `jax.checkpoint`, so
    neither pass holds more than (B, chunk, V) fp32 logits.
    """
    mask = mask.astype(jnp.float32)
    kernel = kernel.astype(hidden.dtype)
    t = hidden.shape[1]
    if chunk <= 0 or chunk >= t:
        loss, correct = _token_terms(hidden, kernel, targets, mask)
        return loss, correct, jnp.sum(mask)
    if t % chunk:
        raise ValueError(f"train.loss_chunk={chunk} must divide the sequence length {t}")

    def split(x):  # (B, T, ...) -> (T/chunk, B, chunk, ...)
        return jnp.moveaxis(x.reshape(x.shape[0], t // chunk, chunk, *x.shape[2:]), 1, 0)

    body = jax.checkpoint(lambda h, y, m: _token_terms(h, kernel, y, m))

    def step(carry, xs):
        loss, correct = body(*xs)
        return (carry[0] + loss, carry[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (loss, correct), _ = jax.lax.scan(step, (zero, zero), (split(hidden), split(targets), split(mask)))
    return loss, correct, jnp.sum(mask)
