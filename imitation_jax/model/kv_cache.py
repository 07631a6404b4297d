"""Keys and values of the tokens seen so far, so that decoding runs only the new tokens.

Rows are left-padded: row b's tokens fill slots [start[b], index) and every row writes its next
tokens at the same slot `index`, so a write is one dynamic slice for the whole batch. Positions
(RoPE) are the caller's, counted from each row's start, so padding never changes a result.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from imitation_jax.model.config import ModelConfig
from imitation_jax.sharding import constrain

_LAYOUT = ("batch", "seq", "act_kv_heads", None)


class KVCache(NamedTuple):
    k: jax.Array  # (layers, batch, slots, kv_heads, head_dim), compute dtype
    v: jax.Array
    index: jax.Array  # () int32: slot of the next token written, the same for every row
    start: jax.Array  # (batch,) int32: first slot holding a token of the row

    @classmethod
    def create(cls, cfg: ModelConfig, start: jax.Array, slots: int) -> KVCache:
        shape = (cfg.num_layers, start.shape[0], slots, cfg.kv_heads, cfg.dim_per_head)
        zeros = jnp.zeros(shape, cfg.compute_dtype)
        return cls(zeros, zeros, jnp.zeros((), jnp.int32), start.astype(jnp.int32))

    def mask(self, new: int) -> jax.Array:
        """(batch, 1, new, slots) boolean: slot visible to each of the `new` queries written at
        index, index+1, ... (a padding slot's query sees itself only, so no row is empty)."""
        query = self.index + jnp.arange(new)[:, None]
        key = jnp.arange(self.k.shape[2])[None, :]
        visible = (key >= self.start[:, None, None]) & (key <= query)
        return (visible | (key == query))[:, None]


class LayerCache(NamedTuple):
    """One layer's slice of a KVCache, with the shared write index and mask."""

    k: jax.Array  # (batch, slots, kv_heads, head_dim)
    v: jax.Array
    index: jax.Array
    mask: jax.Array | None  # None: a prefill, the new tokens attend to each other only

    def write(self, k: jax.Array, v: jax.Array) -> LayerCache:
        """The cache with k, v (batch, new, kv_heads, head_dim) stored at slots index, index+1, ..."""
        at = (0, self.index, 0, 0)
        k = jax.lax.dynamic_update_slice(self.k, k.astype(self.k.dtype), at)
        v = jax.lax.dynamic_update_slice(self.v, v.astype(self.v.dtype), at)
        return self._replace(k=constrain(k, _LAYOUT), v=constrain(v, _LAYOUT))
