"""Fast generation: batched, bucketed prefill and decoding under `jax.jit` (`Generator`), the
per-row sampler (`SamplingParams`), incremental text with stop strings, and continuous batching
over the generator's compiled steps (`SlotEngine`, for serving)."""

from imitation_jax.generate.engine import Completion, Generator, PromptTooLong, TokenLogprob
from imitation_jax.generate.sampling import SamplingParams
from imitation_jax.generate.slots import SlotEngine

__all__ = ["Completion", "Generator", "PromptTooLong", "SamplingParams", "SlotEngine", "TokenLogprob"]
