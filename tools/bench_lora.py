#!/usr/bin/env python
"""LoRA against full fine-tuning on the same model and batch: train-step time, the compiled step's
memory (XLA's memory analysis: arguments, outputs, temporaries) and the process's peak RSS, and the
optimizer state as a share of full fine-tuning's.

    python tools/bench_lora.py                     # the 58M bench model, seq 512, batch 4, rank 16
    python tools/bench_lora.py --rank 8 --steps 5

Each variant runs in its own process (peak RSS is per process); the base is random (the numbers do
not depend on its values). Compilation and the first step are excluded; every timed step ends in
`block_until_ready`; the step time is the median of --steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def run_variant(args) -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from imitation_jax.model import ModelConfig, lora
    from imitation_jax.model.lora import LoraConfig
    from imitation_jax.model.params import base_config, frozen_keys, init_adapters, init_params
    from imitation_jax.sharding import MeshConfig, make_mesh
    from imitation_jax.train.builder import build_program, resolve_model
    from imitation_jax.train.config import Config
    from imitation_jax.train.state import init_opt_state, step_scalar
    from imitation_jax.train.step import compile_with_frozen

    model = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                        num_layers=args.layers, num_heads=args.heads, max_position_embeddings=args.seq_len,
                        scan_unroll=args.layers)
    if args.variant == "lora":
        model = dataclasses.replace(model, lora=LoraConfig(rank=args.rank, alpha=2.0 * args.rank))
    cfg = Config()
    cfg.train.batch_size, cfg.train.steps = args.batch, 1000
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        model = resolve_model(model, mesh)
        program = build_program(cfg, mesh, model, 1000)
        if program.lora:
            params = init_adapters(model, mesh, 0)
            frozen = lora.combine(init_params(base_config(model), mesh, 0), frozen_keys(program.frozen))
            extra = (frozen,)
        else:
            params, extra = init_params(model, mesh, 0), ()
        state = {"params": params, "opt_state": init_opt_state(program.optimizer, params, mesh),
                 "step": step_scalar(0, mesh)}
        rng = np.random.default_rng(0)
        t = args.seq_len
        tokens = rng.integers(0, model.vocab_size, (1, args.batch, t + 1))
        half = t // 2
        batch = {"inputs": tokens[..., :-1], "targets": tokens[..., 1:],
                 "loss_mask": (rng.random((1, args.batch, t)) < 0.5).astype(np.float32),
                 "segment_ids": np.concatenate([np.ones((1, args.batch, half)), 2 * np.ones((1, args.batch, t - half))],
                                               -1).astype(np.int32),
                 "positions": np.concatenate([np.arange(half), np.arange(t - half)])[None, None].repeat(args.batch, 1)}
        batch = {k: jax.device_put(jnp.asarray(v, jnp.float32 if k == "loss_mask" else jnp.int32),
                                   program.batch_sharding) for k, v in batch.items()}
        if program.lora:  # the frozen base takes the layouts the compiler chose, as `train` does
            compiled, frozen = compile_with_frozen(program.train_step, state, batch, frozen)
            extra = (frozen,)
        else:
            compiled = program.train_step.lower(state, batch).compile()
        mem = compiled.memory_analysis()
        state, m = compiled(state, batch, *extra)
        jax.block_until_ready(m)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            state, m = compiled(state, batch, *extra)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - start)
    opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["opt_state"]))
    trained = sum(x.size for x in jax.tree.leaves(state["params"]))
    return {"variant": args.variant, "step_s": statistics.median(times), "tokens_per_s": args.batch * t / statistics.median(times),
            "arg_MiB": mem.argument_size_in_bytes / 2**20, "out_MiB": mem.output_size_in_bytes / 2**20,
            "temp_MiB": mem.temp_size_in_bytes / 2**20, "opt_state_MiB": opt_bytes / 2**20,
            "trained_params": trained, "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loss": float(m["loss"])}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--hidden", type=int, default=512)  # the model: bench_train's default 58M shape
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--variant", choices=("full", "lora"), default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0
    results = {}
    for variant in ("full", "lora"):
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "variant"]
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--variant", variant, *flags],
                             capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(f"{variant:5s} step {r['step_s']:.3f} s ({r['tokens_per_s']:.0f} tokens/s), trained params "
              f"{r['trained_params'] / 1e6:.2f}M, optimizer state {r['opt_state_MiB']:.1f} MiB, compiled step: "
              f"arguments {r['arg_MiB']:.0f} MiB, temporaries {r['temp_MiB']:.0f} MiB; peak RSS {r['peak_rss_MiB']:.0f} MiB")
    full, ad = results["full"], results["lora"]
    print(f"lora/full: step time {ad['step_s'] / full['step_s']:.2f}x, optimizer state "
          f"{ad['opt_state_MiB'] / full['opt_state_MiB']:.2%}, temporaries {ad['temp_MiB'] / full['temp_MiB']:.2f}x, "
          f"peak RSS {ad['peak_rss_MiB'] / full['peak_rss_MiB']:.2f}x (rank {args.rank})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
