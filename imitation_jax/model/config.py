"""Model hyper-parameters: the fields of the HF configs we need (LLaMA and the families in
`model/families.py`), plus how to compute."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from imitation_jax.model import families
from imitation_jax.model.lora import LoraConfig
from imitation_jax.sharding import device_platform, platform_of

REMAT_POLICIES = ("none", "full", "save_dots")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "einsum")
PLATFORMS = ("cpu", "gpu", "tpu")
ROPE_SCALINGS = ("llama3", "linear")


@dataclasses.dataclass
class RopeScaling:
    """LLaMA-3.1 style frequency scaling (HF `rope_scaling` with `rope_type: llama3`), or linear
    position interpolation (`rope_type: linear`: every frequency divided by `factor`; Gemma 3)."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass
class ModelConfig:
    preset: Optional[str] = None  # a name from presets.PRESETS; its fields are the defaults below it
    # Architecture (names follow HF LlamaConfig, so conversion is a field copy).
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: Optional[int] = None  # None: multi-head attention (= num_heads)
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # Family features (model/families.py says which each HF family has; export writes `family` back).
    family: str = "llama"  # llama | qwen2 | qwen3 | mistral | gemma3
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2; HF attention_bias)
    o_bias: bool = False  # a bias on the output projection (HF attention_bias outside Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on queries and keys before RoPE (Qwen3, Gemma 3)
    sliding_window: Optional[int] = None  # sliding layers attend to this many tokens (themselves included)
    # Per layer "full_attention" | "sliding_attention" (HF layer_types); None: every layer sliding
    # when sliding_window is set (Mistral), else every layer full.
    layer_types: Optional[list[str]] = None
    rope_local_theta: Optional[float] = None  # RoPE base of sliding layers, unscaled (Gemma 3); None: as full ones
    hidden_act: str = "silu"  # the gated MLP's activation: silu (SwiGLU) | gelu_pytorch_tanh (GeGLU)
    norm_style: str = "llama"  # llama: w * norm(x); gemma: (1 + w) * norm(x) in fp32, weights start at 0
    post_norms: bool = False  # RMSNorm also after attention and after the MLP, before each residual add (Gemma)
    scale_embeddings: bool = False  # embeddings times sqrt(hidden_size), in the compute dtype (Gemma)
    query_pre_attn_scalar: Optional[float] = None  # attention scores scaled by this ** -0.5; None: head_dim
    # Computation.
    param_dtype: str = "float32"
    dtype: str = "float32"  # activations and matmuls; bfloat16 on accelerators
    remat: str = "none"  # none | full | save_dots (keep matmul outputs, recompute the rest)
    attention: str = "auto"  # auto | xla | cudnn | einsum
    scan_unroll: int = 1  # layers per scan iteration; >= num_layers: straight-line code (faster on CPU, slower compile)
    # cpu | gpu | tpu: which kernels the model is traced with (model/cpu.py holds the CPU-only ones).
    # None/auto: not decided yet; `with_platform` takes it from the mesh's devices.
    platform: Optional[str] = None
    # LoRA adapters (model/lora.py): rank 0 trains the whole model, rank > 0 adapters on a frozen base.
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):  # read back from JSON (model.json, checkpoint configs)
            self.lora = LoraConfig(**self.lora)
        elif self.lora is None:
            self.lora = LoraConfig()
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r} is not one of {', '.join(REMAT_POLICIES)}")
        if self.scan_unroll < 1:
            raise ValueError(f"model.scan_unroll={self.scan_unroll} must be at least 1")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"model.attention={self.attention!r} is not one of {', '.join(ATTENTION_IMPLS)}")
        if self.platform not in (None, "auto", *PLATFORMS):
            raise ValueError(f"model.platform={self.platform!r} is not one of auto, {', '.join(PLATFORMS)}")
        if isinstance(self.rope_scaling, dict):  # read back from JSON
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)

    def validate(self) -> None:
        if self.num_heads % self.kv_heads:
            raise ValueError(f"model.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.kv_heads}")
        if self.dim_per_head % 2:
            source = (f"model.head_dim={self.head_dim}" if self.head_dim else
                      f"model.hidden_size={self.hidden_size} / model.num_heads={self.num_heads}")
            raise ValueError(f"head dim {self.dim_per_head} ({source}) must be even for rotary embeddings")
        if self.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (it is taken from the tokenizer when 0)")
        if self.rope_scaling is not None and self.rope_scaling.rope_type not in ROPE_SCALINGS:
            raise ValueError(f"model.rope_scaling.rope_type={self.rope_scaling.rope_type!r} is not one of "
                             f"{', '.join(ROPE_SCALINGS)}")
        families.check(self)

    def sliding_layers(self) -> list[bool]:
        """Per layer: does it attend within `sliding_window` only?"""
        if self.layer_types is None:
            return [self.sliding_window is not None] * self.num_layers
        return [t == "sliding_attention" for t in self.layer_types]

    def num_params(self) -> int:
        """Parameter count computed from the shapes (embedding and head counted separately unless tied)."""
        d, h, kv, hd = self.hidden_size, self.num_heads, self.kv_heads, self.dim_per_head
        attn = d * h * hd * 2 + d * kv * hd * 2
        attn += (h + 2 * kv) * hd * self.qkv_bias + d * self.o_bias + 2 * hd * self.qk_norm
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + (4 if self.post_norms else 2) * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B style."""
        matmul_params = self.num_params() - self.vocab_size * self.hidden_size * (0 if self.tie_word_embeddings else 1)
        per_layer_other = (4 if self.post_norms else 2) * self.hidden_size + self.hidden_size * self.o_bias + (
            (self.num_heads + 2 * self.kv_heads) * self.dim_per_head * self.qkv_bias + 2 * self.dim_per_head * self.qk_norm)
        matmul_params -= self.num_layers * per_layer_other + self.hidden_size  # norms and biases do no matmuls
        # QK^T and AV (PaLM's 12*L*H*Q*T), a sliding layer's keys at most its window.
        keys = sum(min(seq_len, self.sliding_window) if sliding else seq_len for sliding in self.sliding_layers())
        attn = 2 * self.num_heads * self.dim_per_head * keys
        return 6 * matmul_params + 6 * attn


def with_platform(cfg: ModelConfig, mesh=None) -> ModelConfig:
    """`cfg` with its platform decided: a platform already set is kept, else the mesh's devices' one
    (`sharding.platform_of`). Without a mesh it is the default backend's: the one fallback, which
    `Llama` applies to a config built without a mesh (tests, tools)."""
    if cfg.platform not in (None, "auto"):
        return cfg
    platform = platform_of(mesh) if mesh is not None else device_platform(jax.devices()[0])
    return dataclasses.replace(cfg, platform=platform)


def decided(platform: Optional[str]) -> str:
    """`platform` itself; an error if it was never decided (a config that skipped `with_platform`)."""
    if platform in (None, "auto"):
        raise ValueError("model.platform is not decided: resolve the config with model.config.with_platform")
    return platform
