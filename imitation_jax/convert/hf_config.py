"""HF `config.json` <-> our ModelConfig, per family (LLaMA, Qwen2/2.5, Qwen3, Mistral, Gemma 3
text), refusing what our model cannot compute with one line naming the field.

Both the transformers-4 keys (`rope_theta`, `rope_scaling`, Gemma's `rope_local_base_freq` and
`sliding_window_pattern`, `torch_dtype`) and the transformers-5 ones (`rope_parameters`, per layer
type for Gemma 3; `layer_types`; `dtype`) are read; export writes both so old and new readers
(vLLM included) agree.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from imitation_jax.errors import CheckpointError
from imitation_jax.model import families
from imitation_jax.model.config import ModelConfig, RopeScaling

# HF architecture -> our family; model_type of each family's config.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "LLaMAForCausalLM": "llama",  # the second: early LLaMA-1 conversions
                 "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "MistralForCausalLM": "mistral",
                 "Gemma3ForCausalLM": "gemma3"}
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral", "gemma3": "gemma3_text"}
ROPE_TYPES = ("default", "llama3", "linear")
# Keys whose presence (non-null, non-false) means something we do not compute, and what it is.
REFUSED = {"num_experts": "mixture of experts", "num_local_experts": "mixture of experts",
           "vision_config": "a vision tower", "final_logit_softcapping": "logit softcapping",
           "attn_logit_softcapping": "attention softcapping", "use_bidirectional_attention": "bidirectional attention",
           "mlp_bias": "MLP biases"}
# Head width when config.json omits head_dim (the HF config classes' defaults).
HEAD_DIM_DEFAULT = {"qwen3": 128, "gemma3": 256}
GEMMA_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


def read_config_json(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return hf


def family_of(hf: dict, where: str) -> str:
    """Our family for an HF config (by architectures, else model_type); one line for anything else."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type", "llama")
    for key, what in REFUSED.items():
        if hf.get(key):
            name = archs[0] if archs else f"model_type {model_type!r}"
            hint = "; save its text model as Gemma3ForCausalLM and import that" if key == "vision_config" else ""
            raise CheckpointError(f"{where}: {key}={_short(hf[key])} ({what}, {name}) is not supported{hint}")
    supported = ", ".join(sorted(set(ARCHITECTURES) - {"LLaMAForCausalLM"}))
    if archs:
        unknown = [a for a in archs if a not in ARCHITECTURES]
        if unknown:
            raise CheckpointError(f"{where}: architecture {unknown[0]} is not supported; supported: {supported}")
        found = {ARCHITECTURES[a] for a in archs}
    else:
        found = {f for f, t in MODEL_TYPES.items() if t == model_type}
        if not found:
            raise CheckpointError(f"{where}: model_type {model_type!r} is not supported; supported: {supported}")
    family = found.pop()
    if found or MODEL_TYPES[family] != model_type:
        raise CheckpointError(f"{where}: architectures {archs} and model_type {model_type!r} disagree")
    return family


def _short(value) -> str:
    return json.dumps(value)[:40] if not isinstance(value, dict) else "{...}"


def _scaling(scaling: Optional[dict], where: str, key: str) -> Optional[RopeScaling]:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise CheckpointError(f"{where}: {key} rope_type {kind!r} is not supported (only {', '.join(ROPE_TYPES)})")
    try:
        if kind == "default":
            return None
        if kind == "linear":
            return RopeScaling(rope_type="linear", factor=float(scaling["factor"]))
        return RopeScaling(rope_type="llama3", factor=float(scaling["factor"]),
                           low_freq_factor=float(scaling["low_freq_factor"]),
                           high_freq_factor=float(scaling["high_freq_factor"]),
                           original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
    except KeyError as exc:
        raise CheckpointError(f"{where}: {key} ({kind}) lacks {exc.args[0]!r}") from None


def _rope(hf: dict, where: str) -> tuple[float, Optional[RopeScaling]]:
    """(theta, scaling) of a one-table config: top-level (transformers 4) or rope_parameters (5)."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    return float(theta), _scaling(scaling, where, "rope_scaling")


def _gemma_rope(hf: dict, where: str) -> tuple[float, Optional[RopeScaling], float]:
    """(global theta, global scaling, local theta): per layer type in rope_parameters (transformers 5)
    or rope_theta / rope_scaling / rope_local_base_freq (transformers 4)."""
    params = hf.get("rope_parameters") or {}
    full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    if _scaling(local, where, "rope_parameters.sliding_attention") is not None:
        raise CheckpointError(f"{where}: rope scaling on sliding layers is not supported")
    theta = full.get("rope_theta", hf.get("rope_theta", GEMMA_THETA["full_attention"]))
    local_theta = local.get("rope_theta", hf.get("rope_local_base_freq", GEMMA_THETA["sliding_attention"]))
    scaling = _scaling(full if full.get("rope_type", "default") != "default" else hf.get("rope_scaling"),
                       where, "rope_scaling")
    return float(theta), scaling, float(local_theta)


def _layer_types(hf: dict, family: str, layers: int) -> tuple[Optional[int], Optional[list[str]]]:
    """(sliding_window, layer_types) as our config holds them."""
    if family == "llama":
        return None, None
    if family == "mistral":  # every layer, when set (HF ignores layer_types for Mistral)
        return hf.get("sliding_window"), None
    if family in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
            return None, None
        types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28)
                                          else "full_attention" for i in range(layers)]
        return hf["sliding_window"], types
    pattern = hf.get("sliding_window_pattern", 6)  # gemma3
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                      for i in range(layers)]
    return hf.get("sliding_window", 4096), types


def model_fields_from_hf(hf: dict, where: str) -> dict:
    """Our ModelConfig architecture fields from an HF config dict of a supported family."""
    family = family_of(hf, where)
    act_key = "hidden_activation" if family == "gemma3" and "hidden_activation" in hf else "hidden_act"
    fields = families.features(family)
    act = hf.get(act_key, fields["hidden_act"])
    if act != fields["hidden_act"]:
        raise CheckpointError(f"{where}: {act_key}={act!r} is not supported ({family}: {fields['hidden_act']})")
    try:
        d, heads = hf["hidden_size"], hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or HEAD_DIM_DEFAULT.get(family) or d // heads
        window, types = _layer_types(hf, family, hf["num_hidden_layers"])
        if family == "gemma3":
            theta, scaling, local_theta = _gemma_rope(hf, where)
            fields.update(rope_local_theta=local_theta,
                          query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)))
        else:
            theta, scaling = _rope(hf, where)
        if family not in ("qwen2", "mistral"):  # HF attention_bias: q, k, v and o (Qwen2's q/k/v ones are fixed)
            fields.update(qkv_bias=bool(hf.get("attention_bias")), o_bias=bool(hf.get("attention_bias")))
        fields.update(
            family=family, vocab_size=hf["vocab_size"], hidden_size=d, intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=None if head_dim == d // heads else head_dim,  # the default: keep HF and preset configs equal
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", family == "gemma3")),
            initializer_range=hf.get("initializer_range", 0.02), sliding_window=window, layer_types=types)
        return fields
    except KeyError as exc:
        raise CheckpointError(f"{where}: missing key {exc.args[0]!r}") from None


def check_supported(hf: dict, where: str) -> None:
    """One-line CheckpointError for an architecture or option our model does not implement."""
    model_fields_from_hf(hf, where)


def model_config_from_dir(directory: str, param_dtype: str = "float32") -> ModelConfig:
    hf = read_config_json(directory)
    where = os.path.join(directory, "config.json")
    try:
        cfg = ModelConfig(**model_fields_from_hf(hf, where), param_dtype=param_dtype, dtype=param_dtype)
        cfg.validate()
    except CheckpointError:
        raise  # already names the file (CheckpointError is a ValueError)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return cfg


def hf_config_dict(cfg: ModelConfig, torch_dtype: str, bos_id: Optional[int], eos_id: int,
                   pad_id: Optional[int]) -> dict[str, Any]:
    """config.json for `cfg`: transformers' own serialisation of the family's config class, plus the
    transformers-4 keys (top-level rope fields, torch_dtype) and `architectures`."""
    import transformers

    cfg.validate()
    family = cfg.family
    scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        scaling = {"rope_type": "linear", "factor": s.factor} if s.rope_type == "linear" else {
            "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor, "original_max_position_embeddings": s.original_max_position_embeddings}
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta} if scaling is None else {
        **scaling, "rope_theta": cfg.rope_theta}
    kwargs = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        initializer_range=cfg.initializer_range, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters=rope, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    extra: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_scaling": scaling}
    if family in ("llama", "qwen3"):
        if cfg.qkv_bias != cfg.o_bias:
            raise CheckpointError(f"model.qkv_bias={cfg.qkv_bias} and model.o_bias={cfg.o_bias} differ: "
                                  f"{ARCH[family]} has one attention_bias for both")
        kwargs.update(attention_bias=cfg.qkv_bias)
    if family == "llama":
        kwargs.update(hidden_act="silu", mlp_bias=False)
    if family in ("qwen2", "qwen3"):
        types = cfg.layer_types or ["full_attention"] * cfg.num_layers
        kwargs.update(hidden_act="silu", use_sliding_window=cfg.sliding_window is not None,
                      sliding_window=cfg.sliding_window, layer_types=types,
                      max_window_layers=next((i for i, t in enumerate(types) if t == "sliding_attention"),
                                             cfg.num_layers))
    if family == "mistral":
        kwargs.update(hidden_act="silu", sliding_window=cfg.sliding_window)
    if family == "gemma3":
        if cfg.qkv_bias != cfg.o_bias:
            raise CheckpointError(f"model.qkv_bias={cfg.qkv_bias} and model.o_bias={cfg.o_bias} differ: "
                                  "Gemma3ForCausalLM has one attention_bias for both")
        if cfg.rope_local_theta is None and scaling is not None:
            raise CheckpointError("model.rope_local_theta=null with model.rope_scaling set: Gemma3ForCausalLM's "
                                  "sliding layers have their own unscaled RoPE (set model.rope_local_theta)")
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}
        types = cfg.layer_types or ["full_attention"] * cfg.num_layers
        kwargs.update(hidden_activation="gelu_pytorch_tanh", attention_bias=cfg.qkv_bias,
                      query_pre_attn_scalar=_int(cfg.query_pre_attn_scalar or cfg.dim_per_head),
                      sliding_window=cfg.sliding_window or 4096, layer_types=types,
                      rope_parameters={"full_attention": rope, "sliding_attention": local})
        extra.update(rope_local_base_freq=cfg.rope_local_theta, final_logit_softcapping=None,
                     attn_logit_softcapping=None)
    hf = getattr(transformers, CONFIG_CLASS[family])(**kwargs)
    out = hf.to_dict()
    out.update(extra)
    out["architectures"] = [ARCH[family]]
    out["model_type"] = MODEL_TYPES[family]
    out["dtype"] = out["torch_dtype"] = torch_dtype
    return out


def _int(x: float):
    return int(x) if float(x).is_integer() else x


ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
        "mistral": "MistralForCausalLM", "gemma3": "Gemma3ForCausalLM"}
CONFIG_CLASS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "MistralConfig",
                "gemma3": "Gemma3TextConfig"}
