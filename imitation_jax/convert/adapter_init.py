"""`init.adapter`: a LoRA run that continues from existing adapters instead of B = 0.

The source is a PEFT LoRA adapter dir (`export-hf --adapter`, PEFT's `save_pretrained`, or the
`adapter/` that `import-hf` writes for one) or a LoRA run dir (its newest checkpoint). Its rank,
alpha and targets become the run's `model.lora` (a different one set by hand is a one-line error);
its base becomes the run's `init.hf` / `init.checkpoint` unless one is set. The base's content is
not compared: like `init.checkpoint`, this is a starting point, and its shapes are checked.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from imitation_jax.errors import CheckpointError, ConfigError
from imitation_jax.model.config import ModelConfig


@dataclasses.dataclass
class AdapterSource:
    path: str
    lora: Any  # model.lora.LoraConfig
    base: str | None  # the base it was trained on
    base_kind: str  # "hf" | "checkpoint"
    peft: bool  # a PEFT dir (else a LoRA run dir)


def describe_adapter(path: str) -> AdapterSource:
    """What `init.adapter=path` holds; a one-line CheckpointError when it holds no adapters."""
    from imitation_jax.convert.loading import lora_base, read_run_config

    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        from imitation_jax.convert.peft_format import read_adapter_dir

        lora_cfg, base, _ = read_adapter_dir(path)
        kind = "checkpoint" if base and os.path.isfile(os.path.join(base, "model.json")) else "hf"
        return AdapterSource(path, lora_cfg, base, kind, peft=True)
    if os.path.isfile(os.path.join(path, "config.yaml")):
        model, _ = read_run_config(path)
        if not model.lora.enabled:
            raise CheckpointError(f"init.adapter={path}: a run without LoRA adapters (model.lora.rank 0); "
                                  "start from its weights with init.checkpoint")
        base, kind, _ = lora_base(path)
        return AdapterSource(path, model.lora, base, kind, peft=False)
    raise CheckpointError(f"init.adapter={path}: neither a PEFT adapter dir (adapter_config.json) nor a LoRA "
                          "run dir (config.yaml)")


def apply_adapter_source(cfg: Any) -> AdapterSource | None:
    """Take `model.lora` (rank, alpha, targets) and, when unset, `init.hf` / `init.checkpoint` from
    `cfg.init.adapter` (None when it is unset). Dropout and base_quant stay the run's choice."""
    if not cfg.init.adapter:
        return None
    source = describe_adapter(cfg.init.adapter)
    mine, theirs = cfg.model.lora, source.lora
    if mine.enabled and (mine.rank, mine.alpha, sorted(mine.targets)) != (theirs.rank, theirs.alpha, sorted(theirs.targets)):
        raise ConfigError(f"config: model.lora (rank {mine.rank}, alpha {mine.alpha}, targets {list(mine.targets)}) "
                          f"differs from init.adapter's (rank {theirs.rank}, alpha {theirs.alpha}, targets "
                          f"{list(theirs.targets)}); leave model.lora.rank unset to take the adapter's")
    cfg.model.lora = dataclasses.replace(mine, rank=theirs.rank, alpha=theirs.alpha, targets=list(theirs.targets))
    if not (cfg.init.hf or cfg.init.checkpoint):
        if not source.base or not os.path.exists(source.base):
            raise ConfigError(f"config: init.adapter={source.path} names its base {source.base!r}, which is not "
                              "here; set init.hf or init.checkpoint to the base")
        if source.base_kind == "hf":
            cfg.init.hf = source.base
        else:
            cfg.init.checkpoint = source.base
    return source


def initial_adapters(source: AdapterSource, model: ModelConfig, abstract_adapters: Any) -> Any:
    """The adapters of `source` placed like `abstract_adapters` (the run's, with shardings)."""
    import jax

    if source.peft:
        from imitation_jax.convert.peft_format import load_adapters

        try:
            adapters = load_adapters(os.path.join(source.path, "adapter_model.safetensors"), model.lora, model,
                                     abstract_adapters)
        except CheckpointError as exc:
            raise CheckpointError(f"init.adapter={source.path}: {exc}") from None
        return jax.device_put(adapters, jax.tree.map(lambda x: x.sharding, abstract_adapters))
    from imitation_jax import checkpoint
    from imitation_jax.convert.loading import run_params_item

    item, _ = run_params_item(source.path, None)
    # check_fits inside names the first adapter whose shape differs
    return checkpoint.restore_params(item, abstract_adapters)


def import_adapter(directory: str, out: str, *, base: str | None = None, dtype: str = "float32",
                   allow_pickle: bool = False) -> dict:
    """`import-hf ADAPTER_DIR --out OUT [--base HF_DIR]`: the adapter's base imported into OUT as
    `import-hf` does, and the adapter, checked against the base's shapes, copied to OUT/adapter
    (its base_model_name_or_path the HF base, so PEFT still loads it there). Continue training
    with init.checkpoint=OUT init.adapter=OUT/adapter."""
    import json
    import shutil

    from imitation_jax.convert.hf_import import import_hf
    from imitation_jax.convert.peft_format import load_adapters, read_adapter_dir
    from imitation_jax.model import lora

    directory = os.path.abspath(directory)
    lora_cfg, named, weights = read_adapter_dir(directory)
    base = os.path.abspath(base or named or "")
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise CheckpointError(f"{directory}: its base {base!r} is not a local HF dir (config.json); "
                              "pass --base HF_DIR")
    result = import_hf(base, out, dtype=dtype, allow_pickle=allow_pickle)
    try:
        adapters = load_adapters(weights, lora_cfg, result["config"])
    except CheckpointError as exc:
        raise CheckpointError(f"{directory}: {exc} ({base})") from None
    target = os.path.join(result["out"], "adapter")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(directory, target)
    with open(os.path.join(directory, "adapter_config.json")) as f:
        config = json.load(f)
    with open(os.path.join(target, "adapter_config.json"), "w") as f:
        json.dump({**config, "base_model_name_or_path": base}, f, indent=2)
    return {**result, "adapter": target, "base": base, "lora": lora_cfg, "adapter_params": lora.count(adapters)}
