"""One entry point for "give me a model to run": `load_model(path)` for generate, eval, serve, export.

`path` may be
  * a run dir (`imitation-jax train`): RUN_DIR/config.yaml (model config, data.template,
    data.turn_tokens), RUN_DIR/tokenizer/ and the newest complete checkpoint (or `step`). A LoRA
    run (model.lora.rank > 0) checkpoints adapters only: its base (init.hf / init.checkpoint of
    the run's config) is loaded, checked against the checkpoint's base hash, and the adapters are
    merged into it (a plain model; `merge=False` keeps them apart);
  * a params checkpoint dir written by `imitation-jax import-hf` (layout in
    `imitation_jax.convert.params_dir`): model.json, params/ (Orbax), tokenizer/;
  * a PEFT LoRA adapter dir (adapter_config.json + adapter_model.safetensors, e.g. written by
    `export-hf --adapter`) whose base_model_name_or_path is a local HF dir: the base with the
    adapters merged (the adapter dir's tokenizer if it has one, else the base's);
  * a Hugging Face LLaMA dir (config.json + safetensors + tokenizer files), streamed in one
    tensor at a time; the template is the built-in one its `chat_template` renders (as written by
    `export-hf`), else the tokenizer's own chat_template ('hf'), else koala.

Errors are one-line CheckpointError / ConfigError naming the path.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from imitation_jax.errors import CheckpointError
from imitation_jax.errors import ConfigError
from imitation_jax.data.tokenizer import Tokenizer
from imitation_jax.model.config import ModelConfig


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig  # resolved: vocab_size filled in, platform that of the mesh it was loaded onto
    graphdef: Any  # nnx.GraphDef of Llama(config)
    params: Any  # parameter tree (nnx pure dict of jax.Arrays, as training uses) matching graphdef
    tokenizer: Tokenizer  # special tokens added by prepare included
    template: Any  # imitation_jax.data.templates AnyTemplate used for chat prompts
    source: str  # what was loaded (path, step)

    def model(self):
        """The Llama module (nnx.merge of graphdef and params)."""
        from flax import nnx

        return nnx.merge(self.graphdef, self.params)


def load_model(path: str, *, step: Optional[int] = None, dtype: Optional[str] = None,
               mesh=None, merge: bool = True) -> LoadedModel:
    """Load a run dir, an import-hf params dir or an HF dir. `dtype` (float32 | bfloat16 |
    float16) casts the parameters and sets the compute dtype; `mesh` places the parameters by the
    sharding rules (default: one device) and decides the platform the model runs as (`config.platform`,
    whatever the saved config says: a model trained on TPUs and served on a CPU takes the CPU path).
    A LoRA run's adapters are merged into its base unless `merge=False` (then the config keeps
    model.lora and the params hold base, adapters and zero dropout keys)."""
    from imitation_jax.convert import params_dir

    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such run, checkpoint or Hugging Face directory")
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={dtype!r} is not one of float32, bfloat16, float16")
    mesh = mesh if mesh is not None else _one_device_mesh()
    if os.path.isfile(os.path.join(path, "config.yaml")):
        return _from_run_dir(path, step, dtype, mesh, merge)
    if step is not None:
        raise ConfigError(f"{path}: step={step} applies to a run dir only (no config.yaml there)")
    if params_dir.is_params_dir(path):
        return _from_params_dir(path, dtype, mesh)
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return _from_peft_dir(path, dtype, mesh)
    if os.path.isfile(os.path.join(path, "config.json")):
        return _from_hf_dir(path, dtype, mesh)
    raise CheckpointError(f"{path}: neither a run dir (config.yaml), an import-hf checkpoint "
                          f"({params_dir.MODEL_FILE}) nor a Hugging Face dir (config.json)")


@dataclasses.dataclass
class SavedModel:
    """What a run dir or import-hf dir holds, without reading its parameters."""

    config: ModelConfig
    tokenizer: Tokenizer
    template: Any
    params_item: str  # the Orbax params item dir
    source: str


def describe(path: str, *, step: Optional[int] = None) -> Optional[SavedModel]:
    """A run dir or import-hf dir, described; None for an HF dir (or anything else)."""
    from imitation_jax.convert import params_dir

    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "config.yaml")):
        cfg, data = read_run_config(path)
        tokenizer = run_tokenizer(path, data)
        item, step = run_params_item(path, step)
        return SavedModel(cfg, tokenizer, _run_template(data, tokenizer), item, f"{path} (step {step})")
    if params_dir.is_params_dir(path):
        cfg, tokenizer, template = params_dir.read(path)
        return SavedModel(cfg, tokenizer, template, os.path.join(path, params_dir.PARAMS_DIR), path)
    return None


def open_model(path: str, *, step: Optional[int] = None) -> "SavedModel | LoadedModel":
    """A run dir or import-hf dir described (its parameters are read later, one at a time, e.g. by
    export), anything else loaded whole (an HF dir, or a LoRA run: its base with the adapters merged)."""
    saved = describe(path, step=step)
    if saved is not None and saved.config.lora.enabled:
        return load_model(path, step=step)
    return saved or load_model(path, step=step)


def _one_device_mesh():
    import jax

    from imitation_jax.sharding import MeshConfig, make_mesh

    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def with_dtype(cfg: ModelConfig, dtype: Optional[str]) -> ModelConfig:
    return cfg if dtype is None else dataclasses.replace(cfg, param_dtype=dtype, dtype=dtype)


def restore_into(item_dir: str, saved_cfg: ModelConfig, dtype: Optional[str], mesh) -> tuple[ModelConfig, Any]:
    """Orbax params saved with `saved_cfg`, placed on `mesh`, cast to `dtype` if given."""
    import jax

    from imitation_jax.checkpoint import restore_params
    from imitation_jax.model.params import abstract_params

    with jax.set_mesh(mesh):
        params = restore_params(item_dir, abstract_params(saved_cfg, mesh))
    cfg = with_dtype(saved_cfg, dtype)
    if dtype is not None and cfg.param_dtype != saved_cfg.param_dtype:
        params = cast_params(params, dtype)
    return cfg, params


def cast_params(params: Any, dtype: str, floats_only: bool = False) -> Any:
    """`params` cast to `dtype` (`floats_only`: integer leaves, e.g. quantized codes, kept)."""
    import jax
    import jax.numpy as jnp

    def cast(x):
        if floats_only and not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x.astype(jnp.dtype(dtype))

    shardings = jax.tree.map(lambda x: x.sharding, params)
    return jax.jit(lambda p: jax.tree.map(cast, p), out_shardings=shardings)(params)


def _on_mesh(cfg: ModelConfig, mesh) -> ModelConfig:
    """`cfg` for where it is loaded: the platform of `mesh`'s devices, not the one it was saved with."""
    from imitation_jax.model.config import with_platform

    return with_platform(dataclasses.replace(cfg, platform=None), mesh)


def _graphdef(cfg: ModelConfig):
    from imitation_jax.model.params import model_graph

    return model_graph(cfg)[0]


# ------------------------------------------------------------------------------------ run dirs


def read_run_config(run_dir: str) -> tuple[ModelConfig, dict]:
    """(model config, data section as a dict) of RUN_DIR/config.yaml, without the checks a new
    run's config gets (its data files may be long gone)."""
    from omegaconf import OmegaConf

    path = os.path.join(run_dir, "config.yaml")
    try:
        raw = OmegaConf.load(path)
        model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw.get("model", {})))
        data = OmegaConf.to_container(raw.get("data", {}) or {}, resolve=True)
    except Exception as exc:  # YAML and OmegaConf raise many types
        raise ConfigError(f"{path}: not a readable run config ({str(exc).splitlines()[0][:200]})") from None
    if not model.vocab_size:
        raise ConfigError(f"{path}: model.vocab_size is unresolved (the run never started training)")
    return model, data


def run_params_item(run_dir: str, step: Optional[int]) -> tuple[str, int]:
    """(params item dir, step) of the newest complete checkpoint of a run, or of `step`."""
    from imitation_jax.checkpoint import checkpoint_dir, resolve_params_path

    ckpts = checkpoint_dir(run_dir)
    steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) if os.path.isdir(ckpts) else []
    if not steps:
        raise CheckpointError(f"{run_dir}: the run has no complete checkpoint under {ckpts}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"{run_dir}: no checkpoint for step {step} (have {', '.join(map(str, steps))})")
    return resolve_params_path(os.path.join(ckpts, str(step))), step


def run_tokenizer(run_dir: str, data: dict) -> Tokenizer:
    """RUN_DIR/tokenizer (saved by training), else the prepared set's copy (older runs)."""
    from imitation_jax.data.tokenizer import load_tokenizer

    candidates = [os.path.join(run_dir, "tokenizer")]
    if data.get("path"):
        candidates.append(os.path.join(data["path"], "tokenizer"))
    for candidate in candidates:
        if os.path.isdir(candidate):
            return load_tokenizer(candidate)
    raise CheckpointError(f"{run_dir}: no tokenizer/ directory (written by training) to load")


def _run_template(data: dict, tokenizer: Tokenizer):
    from imitation_jax.data.templates import get_template
    from imitation_jax.data.prepare import DEFAULT_TEMPLATE

    return get_template(data.get("template") or DEFAULT_TEMPLATE, tokenizer, turn_tokens=bool(data.get("turn_tokens")))


def _from_run_dir(run_dir: str, step: Optional[int], dtype: Optional[str], mesh, merge: bool = True) -> LoadedModel:
    saved = describe(run_dir, step=step)
    if saved.tokenizer.vocab_size > saved.config.vocab_size:
        raise CheckpointError(f"{run_dir}: the tokenizer has {saved.tokenizer.vocab_size} tokens but the model "
                              f"only {saved.config.vocab_size}")
    if saved.config.lora.enabled:
        cfg, params = _lora_params(run_dir, saved, dtype, mesh, merge)
    else:
        cfg, params = restore_into(saved.params_item, saved.config, dtype, mesh)
    cfg = _on_mesh(cfg, mesh)
    return LoadedModel(cfg, _graphdef(cfg), params, saved.tokenizer, saved.template, saved.source)


def lora_base(run_dir: str, params_item: Optional[str] = None) -> tuple[str, str, int]:
    """(path, kind "hf" | "checkpoint", train.seed) of a LoRA run's base, from its config.yaml; with
    `params_item`, the absolute path its checkpoint recorded when the config's is relative to
    another working directory."""
    found = _lora_base_from_config(run_dir)
    if params_item is not None and not os.path.exists(found[0]):
        from imitation_jax.checkpoint import read_base

        saved = read_base(os.path.dirname(params_item)) or {}
        if saved.get("path") and os.path.exists(saved["path"]):
            return saved["path"], found[1], found[2]
    return found


def _lora_base_from_config(run_dir: str) -> tuple[str, str, int]:
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(os.path.join(run_dir, "config.yaml")), resolve=True)
    init, seed = raw.get("init") or {}, int((raw.get("train") or {}).get("seed") or 0)
    if init.get("hf"):
        return init["hf"], "hf", seed
    if init.get("checkpoint"):
        return init["checkpoint"], "checkpoint", seed
    raise ConfigError(f"{run_dir}/config.yaml: a LoRA run without init.hf or init.checkpoint (its base)")


def _lora_params(run_dir: str, saved: SavedModel, dtype: Optional[str], mesh, merge: bool) -> tuple[ModelConfig, Any]:
    """A LoRA run's base (checked against the checkpoint's base hash) with its adapters: merged
    into a plain model's params, or kept apart (`merge=False`)."""
    import jax

    from imitation_jax import checkpoint
    from imitation_jax.model import lora, quant
    from imitation_jax.model.params import abstract_params, base_config, frozen_keys

    path, kind, seed = lora_base(run_dir, saved.params_item)
    checkpoint.check_base(os.path.dirname(saved.params_item), checkpoint.base_identity(path, kind))
    cfg = saved.config
    base_cfg = base_config(cfg)
    adapters_abstract, frozen_abstract = lora.split(abstract_params(cfg, mesh))
    mode = cfg.lora.base_quant
    with jax.set_mesh(mesh):
        base = start_params(path if kind == "hf" else None, path if kind == "checkpoint" else None, base_cfg, mesh,
                            abstract_params(base_cfg, mesh), seed)
        adapters = checkpoint.restore_params(saved.params_item, adapters_abstract)
        if mode:  # the adapters were trained on the quantized base: run on that one
            shardings = jax.tree.map(lambda x: x.sharding, base)
            quantized = jax.tree.map(lambda x: x.sharding, lora.base_only(frozen_abstract))
            if merge:
                base = jax.jit(lambda b: quant.dequantize_tree(quant.quantize_tree(b, mode), mode,
                                                               base_cfg.weight_dtype), out_shardings=shardings)(base)
            else:
                base = jax.jit(lambda b: quant.quantize_tree(b, mode), out_shardings=quantized)(base)
        if merge:
            shardings = jax.tree.map(lambda x: x.sharding, base)
            params = jax.jit(lambda b, a: lora.merged(lora.combine(b, a), cfg.lora), out_shardings=shardings)(
                base, adapters)
            cfg = base_cfg
        else:
            params = lora.combine(base, adapters, frozen_keys(frozen_abstract))
    if dtype is not None and dtype != cfg.param_dtype:  # the base's floating weights (not quantized codes)
        params = cast_params(params, dtype) if merge else lora.combine(
            cast_params(lora.base_only(params), dtype, floats_only=True), lora.split(params)[0],
            lora.keys_only(params))
    return with_dtype(cfg, dtype), params


def start_params(hf: Optional[str], checkpoint_path: Optional[str], model: ModelConfig, mesh, abstract: Any,
                 seed: int) -> dict:
    """A run's starting params (`init.hf` or `init.checkpoint`; a LoRA run dir: its base with the
    adapters merged) on `mesh`, grown to `model.vocab_size` when prepare added special tokens."""
    from imitation_jax import checkpoint
    from imitation_jax.model.params import abstract_params, grow_params

    if hf:
        from imitation_jax.convert.hf_import import load_hf_params, read_hf_config

        return load_hf_params(hf, model, mesh, hf_vocab=read_hf_config(hf).vocab_size, seed=seed)
    if os.path.isfile(os.path.join(checkpoint_path, "config.yaml")) and read_run_config(checkpoint_path)[0].lora.enabled:
        loaded = load_model(checkpoint_path, mesh=mesh, dtype=model.param_dtype)  # adapters merged
        if loaded.config.vocab_size > model.vocab_size:
            raise CheckpointError(f"{checkpoint_path}: its vocabulary ({loaded.config.vocab_size}) is larger than "
                                  f"this run's ({model.vocab_size})")
        return grow_params(loaded.params, model, loaded.config.vocab_size, seed)
    item = checkpoint.resolve_params_path(checkpoint_path)
    saved = checkpoint.saved_param_shapes(item)
    rows = tuple(saved["embed"].shape)[0] if "embed" in saved else model.vocab_size
    if rows >= model.vocab_size:
        return checkpoint.restore_params(item, abstract)
    small = dataclasses.replace(model, vocab_size=rows)
    params = checkpoint.restore_params(item, abstract_params(small, mesh))
    return grow_params(params, model, rows, seed)


# ------------------------------------------------------------------------------------ import-hf dirs


def _from_params_dir(path: str, dtype: Optional[str], mesh) -> LoadedModel:
    from imitation_jax.convert import params_dir

    saved_cfg, tokenizer, template = params_dir.read(path)
    cfg, params = restore_into(os.path.join(path, params_dir.PARAMS_DIR), saved_cfg, dtype, mesh)
    cfg = _on_mesh(cfg, mesh)
    return LoadedModel(cfg, _graphdef(cfg), params, tokenizer, template, path)


# ------------------------------------------------------------------------------------ PEFT adapter dirs


def _from_peft_dir(path: str, dtype: Optional[str], mesh) -> LoadedModel:
    import jax

    from imitation_jax.convert.hf_import import hf_template, hf_tokenizer, load_hf_params, read_hf_config
    from imitation_jax.convert.peft_format import load_adapters, read_adapter_dir
    from imitation_jax.model import lora
    from imitation_jax.model.params import param_shardings

    lora_cfg, base, weights = read_adapter_dir(path)
    if not base or not os.path.isfile(os.path.join(base, "config.json")):
        raise CheckpointError(f"{path}: its base_model_name_or_path {base!r} is not a local HF dir (config.json)")
    cfg = read_hf_config(base)
    adapted = dataclasses.replace(cfg, lora=lora_cfg)
    adapters = load_adapters(weights, lora_cfg, cfg)
    has_tokenizer = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))
    tokenizer = hf_tokenizer(path if has_tokenizer else base)
    template = hf_template(tokenizer)
    with jax.set_mesh(mesh):
        params = load_hf_params(base, cfg, mesh)
        shardings = jax.tree.map(lambda x: x.sharding, params)
        adapters = jax.device_put(adapters, lora.split(param_shardings(adapted, mesh))[0])
        params = jax.jit(lambda b, a: lora.merged(lora.combine(b, a), lora_cfg), out_shardings=shardings)(
            params, adapters)
    if dtype is not None and dtype != cfg.param_dtype:
        params = cast_params(params, dtype)
    cfg = _on_mesh(with_dtype(cfg, dtype), mesh)
    return LoadedModel(cfg, _graphdef(cfg), params, tokenizer, template, f"{path} (PEFT adapter on {base})")


# ------------------------------------------------------------------------------------ HF dirs


def _from_hf_dir(path: str, dtype: Optional[str], mesh) -> LoadedModel:
    from imitation_jax.convert.hf_import import hf_template, hf_tokenizer, load_hf_params, read_hf_config

    cfg = with_dtype(read_hf_config(path), dtype)
    tokenizer = hf_tokenizer(path)
    template = hf_template(tokenizer)
    params = load_hf_params(path, cfg, mesh)
    cfg = _on_mesh(cfg, mesh)
    return LoadedModel(cfg, _graphdef(cfg), params, tokenizer, template, path)
