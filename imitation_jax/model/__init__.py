"""LLaMA-family decoder in Flax NNX and its named sizes."""

from imitation_jax.model.config import ModelConfig, RopeScaling
from imitation_jax.model.llama import Llama
from imitation_jax.model.presets import PRESETS, preset, preset_fields

__all__ = ["Llama", "ModelConfig", "RopeScaling", "PRESETS", "preset", "preset_fields"]
