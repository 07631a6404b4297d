"""Fast generation: batched, bucketed prefill and decoding under `jax.jit` (`Generator`), the
per-row sampler (`SamplingParams`) and incremental text with stop strings."""

from imitation_jax.generate.engine import Completion, Generator, PromptTooLong, TokenLogprob
from imitation_jax.generate.sampling import SamplingParams

__all__ = ["Completion", "Generator", "PromptTooLong", "SamplingParams", "TokenLogprob"]
