"""Model families over the shared layers: each is the set of ModelConfig features its HF class
always has. The features themselves (biases, q/k norm, sliding windows, Gemma's norms) are
ModelConfig fields the layers read; the HF side of a family (config.json mapping and tensor
names) lives in convert/hf_config.py and convert/hf_layout.py. docs/families.md: adding one.

`check` keeps a config exportable: a family's fixed features must hold (a `qwen3` without q/k norm
is no Qwen3ForCausalLM), the free ones (biases where HF has `attention_bias`, windows) may vary.
"""

from __future__ import annotations

# The ModelConfig fields that make up a family's architecture beyond LLaMA's (architecture fields:
# `init.hf` / `init.checkpoint` take them from the source, convert/init_params.py).
FIELDS = ("family", "qkv_bias", "o_bias", "qk_norm", "sliding_window", "layer_types", "rope_local_theta",
          "hidden_act", "norm_style", "post_norms", "scale_embeddings", "query_pre_attn_scalar")
LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
NORM_STYLES = ("llama", "gemma")

_PLAIN = dict(qk_norm=False, hidden_act="silu", norm_style="llama", post_norms=False, scale_embeddings=False,
              query_pre_attn_scalar=None, rope_local_theta=None)

# family -> features its HF class fixes (ModelConfig field -> value).
FAMILIES: dict[str, dict] = {
    "llama": dict(_PLAIN, sliding_window=None),
    "qwen2": dict(_PLAIN, qkv_bias=True, o_bias=False),
    "qwen3": dict(_PLAIN, qk_norm=True),
    "mistral": dict(_PLAIN, qkv_bias=False, o_bias=False, layer_types=None),
    "gemma3": dict(qk_norm=True, hidden_act="gelu_pytorch_tanh", norm_style="gemma", post_norms=True,
                   scale_embeddings=True),
}


def features(family: str) -> dict:
    """The fixed features of `family` (what a preset or an HF config of that family starts from)."""
    if family not in FAMILIES:
        raise ValueError(f"model.family={family!r} is not one of {', '.join(FAMILIES)}")
    return dict(FAMILIES[family])


def check(cfg) -> None:
    """ValueError (one line, naming the field) for a config its family cannot express."""
    for key, value in features(cfg.family).items():
        if getattr(cfg, key) != value:
            raise ValueError(f"model.{key}={getattr(cfg, key)!r}: model.family={cfg.family} has {key}={value!r}")
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"model.hidden_act={cfg.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}")
    if cfg.norm_style not in NORM_STYLES:
        raise ValueError(f"model.norm_style={cfg.norm_style!r} is not one of {', '.join(NORM_STYLES)}")
    if cfg.sliding_window is not None and cfg.sliding_window < 1:
        raise ValueError(f"model.sliding_window={cfg.sliding_window} must be at least 1 (or null)")
    if cfg.layer_types is not None:
        if len(cfg.layer_types) != cfg.num_layers:
            raise ValueError(f"model.layer_types has {len(cfg.layer_types)} entries for {cfg.num_layers} layers")
        bad = [t for t in cfg.layer_types if t not in LAYER_TYPES]
        if bad:
            raise ValueError(f"model.layer_types: {bad[0]!r} is not one of {', '.join(LAYER_TYPES)}")
        if "sliding_attention" in cfg.layer_types and cfg.sliding_window is None:
            raise ValueError("model.layer_types has sliding_attention layers but model.sliding_window is null")
