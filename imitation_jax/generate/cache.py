"""What the decoder keeps between steps, for rows left-padded into one batch.

Row b's prompt occupies slots [start[b], P) of a P-slot prompt; generated tokens go to slots P,
P+1, ... for every row at once (one write index for the batch), and a row's positions count from
its own start, so padding changes nothing in its result.

INTERIM: until the model gains its KV-cache path, the state is the token buffer and each step
recomputes the whole forward pass over it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class DecodeState(NamedTuple):
    tokens: jax.Array  # (B, S) int32: every slot written so far
    index: jax.Array  # () int32: the next slot to write
    start: jax.Array  # (B,) int32: first slot of each row's prompt


def _positions_segments(start: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
    slots = jnp.arange(length)[None, :]
    positions = jnp.maximum(slots - start[:, None], 0)
    return positions, (slots >= start[:, None]).astype(jnp.int32)


def prefill(model, tokens: jax.Array, start: jax.Array, length: int) -> tuple[jax.Array, DecodeState]:
    """Run the (B, P) left-padded prompts; fp32 logits (B, V) of the last slot and the state for
    decoding into `length` slots in all."""
    b, p = tokens.shape
    positions, segments = _positions_segments(start, p)
    hidden = model(tokens, positions, segments)
    buffer = jnp.zeros((b, length), jnp.int32).at[:, :p].set(tokens)
    return model.logits(hidden[:, -1]), DecodeState(buffer, jnp.int32(p), start)


def extend(model, state: DecodeState, tokens: jax.Array) -> tuple[jax.Array, DecodeState]:
    """Append one token (B,) per row; fp32 logits (B, V) for the next one."""
    buffer = jax.lax.dynamic_update_slice(state.tokens, tokens[:, None], (0, state.index))
    positions, segments = _positions_segments(state.start, buffer.shape[1])
    hidden = model(buffer, positions, segments)
    last = jax.lax.dynamic_index_in_dim(hidden, state.index, axis=1, keepdims=False)
    return model.logits(last), DecodeState(buffer, state.index + 1, state.start)
