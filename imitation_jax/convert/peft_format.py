"""PEFT's LoRA adapter format, both ways: our stacked adapters <-> PEFT tensors
(adapter_model.safetensors) and LoraConfig <-> adapter_config.json.

PEFT's LoRA layer computes lora_B(lora_A(dropout(x))) * lora_alpha / r with nn.Linear weights
lora_A (r, in_features) and lora_B (out_features, r); ours are A (in..., r) and B (r, out...) per
layer, so each is a reshape to 2-D and a transpose (in/out features flattened in HF's order: heads
major, as hf_layout's q/k/v/o kinds).
"""

from __future__ import annotations

import json
import os

import numpy as np

from imitation_jax.errors import CheckpointError

# Our block -> the HF module path of each target inside `model.layers.{i}`.
_MODULE = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn",
           "gate": "mlp", "up": "mlp", "down": "mlp"}
_BLOCK = {"self_attn": "attn", "mlp": "mlp"}


def peft_tensors(adapters: dict, targets, num_layers: int) -> dict[str, np.ndarray]:
    """{PEFT key: float32 array} for our stacked adapters (numpy or jax arrays)."""
    from imitation_jax.model import lora

    out = {}
    for target in targets:
        module = _MODULE[target]
        block = adapters["layers"][_BLOCK[module]]
        a = np.asarray(block[target + lora.SUFFIX_A], np.float32)
        b = np.asarray(block[target + lora.SUFFIX_B], np.float32)
        rank = a.shape[-1]
        for i in range(num_layers):
            name = f"base_model.model.model.layers.{i}.{module}.{lora.PEFT_MODULES[target]}"
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, rank).T)
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(rank, -1).T)
    return out


def adapter_config(lora_cfg, base_path: str) -> dict:
    from imitation_jax.model import lora

    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path,
            "r": lora_cfg.rank, "lora_alpha": lora_cfg.alpha, "lora_dropout": lora_cfg.dropout,
            "target_modules": [lora.PEFT_MODULES[t] for t in lora_cfg.targets], "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None}


# ------------------------------------------------------------------------------------ reading


def read_adapter_config(directory: str):
    """(our LoraConfig, the base's path) of a PEFT LoRA adapter dir; one-line CheckpointError for
    what our adapters cannot represent (DoRA, rsLoRA, per-module ranks, biases, extra modules)."""
    from imitation_jax.model import lora

    path = os.path.join(directory, "adapter_config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable PEFT adapter config ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type {config.get('peft_type')!r}, only LORA adapters are read")
    unsupported = [key for key in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save",
                                   "layers_to_transform") if config.get(key)]
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']}")
    if unsupported:
        raise CheckpointError(f"{path}: {', '.join(unsupported)} is not supported (plain LoRA on "
                              f"{', '.join(lora.PEFT_MODULES.values())} only)")
    modules = config.get("target_modules") or []
    modules = [modules] if isinstance(modules, str) else list(modules)
    by_peft = {v: k for k, v in lora.PEFT_MODULES.items()}
    bad = [m for m in modules if m not in by_peft]
    if bad or not modules:
        raise CheckpointError(f"{path}: target_modules {modules} must be among {', '.join(by_peft)}")
    cfg = lora.LoraConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                          dropout=float(config.get("lora_dropout") or 0.0),
                          targets=[t for t in lora.TARGETS if lora.PEFT_MODULES[t] in modules])
    return cfg, config.get("base_model_name_or_path")


def read_adapter_dir(directory: str):
    """(our LoraConfig, the base's path, the weights file) of a PEFT LoRA adapter dir."""
    lora_cfg, base = read_adapter_config(directory)
    weights = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise CheckpointError(f"{directory}: no adapter_model.safetensors")
    return lora_cfg, base, weights


def load_adapters(weights: str, lora_cfg, model, adapter_shapes: dict | None = None) -> dict:
    """Our stacked adapters (numpy float32) for `model` (a ModelConfig: the base's) from a PEFT
    adapter_model.safetensors; a tensor that does not fit the base is a one-line CheckpointError.
    `adapter_shapes`: our adapters' abstract shapes when the caller has them (else derived)."""
    from safetensors.numpy import load_file

    if adapter_shapes is None:
        import dataclasses

        from imitation_jax.model import lora
        from imitation_jax.model.params import model_graph

        adapter_shapes = lora.split(model_graph(dataclasses.replace(model, lora=lora_cfg))[1])[0]
    return adapters_from_peft(load_file(weights), lora_cfg, adapter_shapes, model.num_layers)


def adapters_from_peft(tensors: dict, lora_cfg, adapter_shapes: dict, num_layers: int) -> dict:
    """Our stacked adapters (numpy float32) from PEFT tensors: the inverse of `peft_tensors`;
    `adapter_shapes`: our adapters' abstract shapes (model.params.model_graph, lora.split). A tensor
    left over (a layer the base does not have) is a one-line CheckpointError."""
    from imitation_jax.model import lora

    prefix = "base_model.model.model.layers"
    out: dict = {"layers": {}}
    used = set()
    for target in lora_cfg.targets:
        module = _MODULE[target]
        block = _BLOCK[module]
        node = out["layers"].setdefault(block, {})
        for suffix, peft_name in ((lora.SUFFIX_A, "lora_A"), (lora.SUFFIX_B, "lora_B")):
            shape = adapter_shapes["layers"][block][target + suffix].shape  # (layers, ...)
            per_layer = []
            for i in range(num_layers):
                key = f"{prefix}.{i}.{module}.{lora.PEFT_MODULES[target]}.{peft_name}.weight"
                if key not in tensors:
                    raise CheckpointError(f"PEFT adapter: tensor {key} is missing")
                used.add(key)
                w = np.asarray(tensors[key], np.float32).T  # A: (in, r); B: (r, out)
                if w.size != int(np.prod(shape[1:])):
                    raise CheckpointError(f"PEFT adapter: {key} has shape {tuple(w.T.shape)}, which does not fit "
                                          f"the base's {'input' if peft_name == 'lora_A' else 'output'} size")
                per_layer.append(w.reshape(shape[1:]))
            node[target + suffix] = np.stack(per_layer)
    extra = sorted(set(tensors) - used)
    if extra:
        raise CheckpointError(f"PEFT adapter: tensor {extra[0]} has no place in this {num_layers}-layer base")
    return out
