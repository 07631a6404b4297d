"""Prefill and one decode step over the model's KV cache, for rows left-padded into one batch.

Row b's prompt occupies slots [start[b], P) of a P-slot prompt; generated tokens go to slots P,
P+1, ... for every row at once, and a row's positions count from its own start, so padding
changes nothing in its result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from imitation_jax.model.kv_cache import KVCache


def prefill(model, tokens: jax.Array, start: jax.Array, slots: int) -> tuple[jax.Array, KVCache]:
    """Run the (B, P) left-padded prompts into a fresh cache of `slots` slots; returns the fp32
    logits (B, V) after each prompt and the cache."""
    hidden, cache = prefill_hidden(model, tokens, start, slots)
    return model.logits(hidden[:, -1]), cache


def prefill_hidden(model, tokens: jax.Array, start: jax.Array, slots: int) -> tuple[jax.Array, KVCache]:
    """As `prefill`, but the final hidden states (B, P, hidden) of every prompt slot."""
    slot = jnp.arange(tokens.shape[1])[None, :]
    positions = jnp.maximum(slot - start[:, None], 0)
    segments = (slot >= start[:, None]).astype(jnp.int32)  # padding is segment 0: no row sees it
    return model.decode(tokens, positions, KVCache.create(model.cfg, start, slots), segments)


def extend(model, cache: KVCache, tokens: jax.Array) -> tuple[jax.Array, KVCache]:
    """Append one token (B,) per row; fp32 logits (B, V) for the next one."""
    positions = (cache.index - cache.start)[:, None]
    hidden, cache = model.decode(tokens[:, None], positions, cache)
    return model.logits(hidden[:, 0]), cache
