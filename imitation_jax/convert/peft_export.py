"""A LoRA run's adapters -> a PEFT adapter dir (`export-hf RUN --adapter --out DIR`):
adapter_config.json + adapter_model.safetensors (convert/peft_format.py) that
`peft.PeftModel.from_pretrained(base, DIR)` loads onto the run's base (its HF dir), plus the
tokenizer and chat template as trained.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from imitation_jax.convert.peft_format import adapter_config, peft_tensors
from imitation_jax.errors import CheckpointError


def export_adapter(run_dir: str, out: str, *, step: Optional[int] = None) -> dict:
    """Write a LoRA run's adapters (float32) as a PEFT adapter dir at `out`."""
    import jax
    from safetensors.numpy import save_file

    from imitation_jax import checkpoint
    from imitation_jax.convert.hf_export import save_tokenizer
    from imitation_jax.convert.loading import _one_device_mesh, describe, lora_base
    from imitation_jax.model import lora
    from imitation_jax.model.params import abstract_params

    saved = describe(run_dir, step=step)
    if saved is None or not saved.config.lora.enabled:
        raise CheckpointError(f"{os.path.abspath(run_dir)}: --adapter needs a LoRA run (model.lora.rank > 0); "
                              "export the whole model without --adapter")
    cfg = saved.config
    base, kind, _ = lora_base(run_dir, saved.params_item)
    checkpoint.check_base(os.path.dirname(saved.params_item), checkpoint.base_identity(base, kind))
    if kind == "hf":
        from imitation_jax.convert.hf_config import model_config_from_dir

        base_vocab = model_config_from_dir(base).vocab_size
        if base_vocab != cfg.vocab_size:
            raise CheckpointError(f"{run_dir}: the run's vocabulary ({cfg.vocab_size} ids, tokens added by prepare) "
                                  f"differs from its base's ({base_vocab}); a PEFT adapter cannot carry the new "
                                  "rows: export the merged model without --adapter")
    out = os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, "adapter_config.json")):
        raise CheckpointError(f"{out}: exists and is not a PEFT adapter dir; refusing to write into it")
    os.makedirs(out, exist_ok=True)
    mesh = _one_device_mesh()
    with jax.set_mesh(mesh):
        adapters = checkpoint.restore_params(saved.params_item, lora.split(abstract_params(cfg, mesh))[0])
    tensors = peft_tensors(jax.device_get(adapters), cfg.lora.targets, cfg.num_layers)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(adapter_config(cfg.lora, os.path.abspath(base)), f, indent=2)
    save_tokenizer(saved.tokenizer, saved.template, out)
    return {"out": out, "source": saved.source, "base": os.path.abspath(base), "base_kind": kind,
            "tensors": len(tensors), "params": int(sum(t.size for t in tensors.values()))}
