"""Sampling parameters and the per-row, jit-friendly token sampler (fp32, greedy / temperature /
top-k / top-p, each row with its own settings and its own random stream)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI; the device computes this many whenever any row asks


@dataclasses.dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    stop: list[str] = dataclasses.field(default_factory=list)  # stop strings; EOS / template stop ids always stop
    seed: int = 0
    # Log-probabilities (of the raw model distribution, before temperature / top-k / top-p):
    # None = off; n = each generated token's, plus its n most likely alternatives.
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None  # the same for every prompt token after the first

    def __post_init__(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not 0 <= n <= MAX_LOGPROBS:
                raise ValueError(f"{name}={n} must be in [0, {MAX_LOGPROBS}]")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]


def row_arrays(params: list[SamplingParams], rows: int) -> dict[str, np.ndarray]:
    """The per-row sampler inputs for a batch of `rows` (rows past len(params) are greedy filler)."""
    pad = rows - len(params)
    return {
        "temperature": np.asarray([p.temperature for p in params] + [0.0] * pad, np.float32),
        "top_k": np.asarray([p.top_k for p in params] + [0] * pad, np.int32),
        "top_p": np.asarray([p.top_p for p in params] + [1.0] * pad, np.float32),
        "seed": np.asarray([p.seed for p in params] + [0] * pad, np.uint32),
    }


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits (B, V) scaled by 1/temperature with everything outside the top-k and outside the
    top-p nucleus (the smallest set of most likely tokens whose probability reaches top_p, taken
    after top-k) set to -inf. Ties at a threshold are all kept."""
    x = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)[:, None]
    vocab = x.shape[-1]
    desc = -jnp.sort(-x, axis=-1)
    # top-k: keep values >= the k-th largest.
    kth = jnp.take_along_axis(desc, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    kth = jnp.where(top_k[:, None] > 0, kth, -jnp.inf)
    desc = jnp.where(desc >= kth, desc, -jnp.inf)
    # top-p on what top-k left: a sorted entry is in the nucleus if the mass before it is < top_p.
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    in_nucleus = (before < top_p[:, None]) | (jnp.arange(vocab) == 0)
    cutoff = jnp.min(jnp.where(in_nucleus, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((x >= kth) & (x >= cutoff), x, -jnp.inf)


def sample(logits: jax.Array, step: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array, seed: jax.Array) -> jax.Array:
    """Next token per row (B,) int32. Row i draws with key fold_in(key(seed_i), step_i) (`step`: one
    for all rows, or (B,) per row: continuous batching), so its tokens depend on its own seed and
    position only, not on the batch it was put in."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        steps = jnp.broadcast_to(step, seed.shape)
        keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seed, steps)
        x = filter_logits(logits, temperature, top_k, top_p)
        drawn = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    # An all-greedy batch skips the vocabulary sort entirely.
    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy)


def token_logprobs(logits: jax.Array, tokens: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """log_softmax of fp32 `logits` (..., V) at `tokens` (...), and its k largest values with their ids:
    (chosen (...), top ids (..., k) int32, top logprobs (..., k)), sorted descending."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    top_lp, top_ids = jax.lax.top_k(lp, k)
    return chosen, top_ids.astype(jnp.int32), top_lp
