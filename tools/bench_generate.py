#!/usr/bin/env python
"""Greedy decoding tokens/s: our KV-cache `Generator` against transformers `generate` on the same weights.

    python tools/bench_generate.py                          # random ~58M-param LLaMA, fp32
    python tools/bench_generate.py --model RUN_OR_HF_DIR    # a trained / imported model
    python tools/bench_generate.py --batch 1,8 --steps-per-call 1,8,32

Both sides decode the same prompts (random ids, `--prompt-len` each) for exactly `--new-tokens`
tokens per row (no EOS stop), greedy, fp32 on a CPU and bf16 on a GPU (torch on CUDA there). The
HF model is built from our parameters (the export's tensor table), so the weights are identical,
and the two outputs are compared token by token. Times include the prefill; each side is warmed up once (compilation, caches) and the
median of `--repeats` runs is reported. tokens/s = rows x new tokens / seconds. On a shared
machine the numbers move with other processes' load: the output reports the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="a run dir, params dir or HF dir (default: random weights)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--steps-per-call", default="8", help="comma-separated decode steps per jitted call (ours)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="parameters and compute on both sides (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class _NoTextTokenizer:
    """Random weights need no real tokenizer: ids only, an EOS that never comes."""

    bos_id, eos_id, pad_id = None, -1, 0

    def decode(self, ids):
        return ""

    def special_id(self, token):
        return None


def build_loaded(args):
    import jax

    from imitation_jax.data.templates import get_template
    from imitation_jax.convert.loading import LoadedModel, _one_device_mesh, load_model
    from imitation_jax.model import ModelConfig
    from imitation_jax.model.params import init_params, model_graph

    if args.model:
        return load_model(args.model, dtype=args.dtype)
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, param_dtype=args.dtype, dtype=args.dtype)
    params = init_params(cfg, _one_device_mesh(), args.seed)
    jax.block_until_ready(params)
    return LoadedModel(cfg, model_graph(cfg)[0], params, _NoTextTokenizer(), get_template("koala"), "random")


def build_hf(loaded, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from imitation_jax.convert.hf_config import hf_config_dict
    from imitation_jax.convert.hf_export import hf_tensors

    cfg = loaded.config
    dtype = getattr(torch, cfg.param_dtype)
    fields = hf_config_dict(cfg, cfg.param_dtype, None, 0, None)
    hf = LlamaForCausalLM(LlamaConfig(**fields, attn_implementation="sdpa")).to(device=device, dtype=dtype).eval()
    # via float32: numpy has no bfloat16 of torch's (the round trip is exact)
    state = {name: torch.from_numpy(arr.astype("float32")).to(device=device, dtype=dtype)
             for name, arr in hf_tensors(cfg, loaded.params)}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise RuntimeError(f"HF state mismatch: missing {missing}, unexpected {unexpected}")
    return hf


def time_runs(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up: compilation / allocator caches
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np

    on_gpu = jax.devices()[0].platform == "gpu"
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")

    from imitation_jax.generate import Generator, SamplingParams

    loaded = build_loaded(args)
    cfg = loaded.config
    hf, device = None, "-"
    if not args.no_torch:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
        hf = build_hf(loaded, device)
    n_params = cfg.num_params()
    print(f"model: {loaded.source}, {n_params / 1e6:.1f}M params, hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
          f"vocab {cfg.vocab_size}; prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, {args.dtype}; "
          f"JAX on {jax.devices()[0].device_kind}, torch on {device}; "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f} at start")
    rng = np.random.default_rng(args.seed)
    params = SamplingParams(max_new_tokens=args.new_tokens)
    print(f"{'batch':>5} {'side':<28} {'s/run':>8} {'tokens/s':>9}  agreement")
    for batch in (int(b) for b in args.batch.split(",")):
        prompts = rng.integers(3, cfg.vocab_size, (batch, args.prompt_len)).tolist()
        ours = {}
        for spc in (int(s) for s in args.steps_per_call.split(",")):
            gen = Generator(loaded, max_batch=batch, steps_per_call=spc)
            gen.stop_ids = frozenset()  # exactly --new-tokens per row on both sides
            sec, out = time_runs(lambda: gen.generate(prompts, params), args.repeats)
            ours[spc] = [c.tokens for c in out]
            print(f"{batch:>5} {'imitation_jax, ' + str(spc) + ' steps/call':<28} {sec:8.3f} "
                  f"{batch * args.new_tokens / sec:9.1f}", flush=True)
        if hf is not None:
            import torch

            ids = torch.tensor(prompts, device=device)

            def run_hf():
                with torch.inference_mode():
                    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                      eos_token_id=None, pad_token_id=0)
                    return out.cpu()

            sec, out = time_runs(run_hf, args.repeats)
            theirs = out[:, args.prompt_len:].tolist()
            first = next(iter(ours.values()))
            same = sum(_common_prefix(a, b) for a, b in zip(first, theirs)) / (batch * args.new_tokens)
            print(f"{batch:>5} {'transformers generate (sdpa)':<28} {sec:8.3f} {batch * args.new_tokens / sec:9.1f}  "
                  f"{same:.0%} of tokens before the first difference", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return 0


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


if __name__ == "__main__":
    raise SystemExit(main())
