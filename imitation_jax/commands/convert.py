"""`imitation-jax import-hf` and `imitation-jax export-hf`: Hugging Face LLaMA dirs in and out."""

from __future__ import annotations

import argparse


def _import_hf(args: argparse.Namespace) -> int:
    import os

    from imitation_jax.convert.hf_import import import_hf

    if os.path.isfile(os.path.join(args.hf_dir, "adapter_config.json")):
        from imitation_jax.convert.adapter_init import import_adapter

        result = import_adapter(args.hf_dir, args.out, base=args.base, dtype=args.dtype, allow_pickle=args.allow_pickle)
        lora = result["lora"]
        print(f"imported the PEFT adapter {os.path.abspath(args.hf_dir)} (rank {lora.rank}, alpha {lora.alpha:g}, "
              f"{result['adapter_params'] / 1e6:.2f}M params on {', '.join(lora.targets)}) -> {result['adapter']} "
              f"and its base {result['base']} -> {result['out']}; continue training with "
              f"init.checkpoint={result['out']} init.adapter={result['adapter']}")
        return 0
    if args.base:
        from imitation_jax.errors import ConfigError

        raise ConfigError(f"import-hf: --base applies to a PEFT adapter dir; {args.hf_dir} has no adapter_config.json")
    result = import_hf(args.hf_dir, args.out, dtype=args.dtype, allow_pickle=args.allow_pickle)
    cfg = result["config"]
    print(f"imported {args.hf_dir} -> {result['out']} ({cfg.num_params() / 1e6:.1f}M params, {cfg.param_dtype}"
          f"{'' if result['tokenizer'] else ', no tokenizer'}); train from it with init.checkpoint={result['out']}")
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from imitation_jax.convert.hf_export import export_hf
    from imitation_jax.convert.loading import open_model

    if args.adapter:
        from imitation_jax.convert.peft_export import export_adapter
        from imitation_jax.errors import ConfigError

        if args.dtype is not None:
            raise ConfigError("export-hf: --dtype does not apply with --adapter (adapters are written in float32)")

        result = export_adapter(args.source, args.out, step=args.step)
        print(f"exported the LoRA adapters of {result['source']} -> {result['out']} (PEFT, {result['tensors']} "
              f"tensors, {result['params'] / 1e6:.2f}M params, float32) for the base {result['base']}")
        return 0
    dtype = args.dtype or "bfloat16"
    result = export_hf(open_model(args.source, step=args.step), args.out, dtype=dtype,
                       max_shard_size=args.max_shard_size)
    print(f"exported {result['source']} -> {result['out']} ({len(result['shards'])} shard(s), "
          f"vocab {result['vocab_size']}, {dtype})")
    return 0


def _size(text: str) -> str:
    from imitation_jax.convert.safetensors_io import parse_size

    try:
        parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def register(sub) -> None:
    p = sub.add_parser("import-hf", help="HF LLaMA dir (or PEFT adapter) -> Orbax params checkpoint + model config",
                       description="Reads config.json, safetensors weights (one file or sharded with an "
                       "index; fp32/fp16/bf16) and the tokenizer, one tensor at a time, and writes "
                       "OUT/params (Orbax), OUT/model.json and OUT/tokenizer. Train from it with "
                       "init.checkpoint=OUT, or skip this step with init.hf=HF_DIR.")
    p.add_argument("hf_dir", metavar="HF_DIR", help="an HF model dir, or a PEFT LoRA adapter dir (its base is "
                   "imported, the adapter kept beside it in CKPT_DIR/adapter)")
    p.add_argument("--out", required=True, metavar="CKPT_DIR")
    p.add_argument("--base", metavar="HF_DIR", help="a PEFT adapter's base when not its base_model_name_or_path")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="parameter dtype to store (default float32, as training keeps params)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read legacy pytorch_model*.bin files; loading them runs pickled code from "
                   "the file, so use it only for files you trust")
    p.set_defaults(func=_import_hf)

    p = sub.add_parser("export-hf", help="run dir or params checkpoint -> HF LLaMA dir (or a PEFT adapter)",
                       description="Writes config.json, generation_config.json, "
                       "model-0000k-of-0000n.safetensors + model.safetensors.index.json, the tokenizer "
                       "(added special tokens included) and the training template as chat_template. A LoRA "
                       "run is written with its adapters merged into the base; with --adapter, its "
                       "adapters alone as a PEFT adapter dir (adapter_config.json, adapter_model.safetensors).")
    p.add_argument("source", metavar="RUN_DIR_OR_CKPT")
    p.add_argument("--out", required=True, metavar="HF_DIR")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run dir (default: newest)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float16", "float32"),
                   help="weights' dtype (default bfloat16; not with --adapter: adapters are written in float32)")
    p.add_argument("--adapter", action="store_true",
                   help="a LoRA run's adapters only, as a PEFT adapter for its base (peft.PeftModel.from_pretrained)")
    p.add_argument("--max-shard-size", default="5GB", type=_size, help="e.g. 5GB (default), 500MB, 2GiB")
    p.set_defaults(func=_export_hf)

