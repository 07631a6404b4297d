#!/usr/bin/env python
"""Step time and memory of distillation next to SFT, in one process, on the same batch.

    python tools/bench_kd.py                          # a 16M student, seq 512, batch 4, vocab 32000
    python tools/bench_kd.py --hidden 2048 --layers 16 --heads 32 --kv-heads 8 --intermediate 8192 \
        --vocab 128256 --seq 2048 --batch 8 --dtype bfloat16     # an accelerator

Three train steps of `imitation_jax.train.step` (the program `imitation-jax train` runs), each
compiled once and timed over alternating rounds (median step, best round):
  sft      cross entropy (train.objective=sft);
  stored   train.objective=kd kd.source=stored with top-`--top-k` teacher ids and logprobs per
           position (random, distinct ids), the cross entropy mixed in (kd.alpha);
  teacher  train.objective=kd kd.source=teacher with a frozen in-mesh teacher of `--teacher-layers`
           layers (default twice the student's: about twice its size).
Peak memory is the compiled step's temporaries + arguments (XLA's memory analysis). The goals of
issue 17: stored <= 1.15x SFT; teacher <= 1 + teacher forward FLOPs / student step FLOPs + 0.10.
The last line is `stored_vs_sft=<x.xx> teacher_vs_sft=<x.xx> teacher_goal=<x.xx>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--teacher-layers", type=int, default=None, help="default: twice --layers")
    p.add_argument("--loss-chunk", type=int, default=256)
    p.add_argument("--alpha", type=float, default=0.1, help="kd.alpha: weight of the cross entropy")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="compute dtype (default: float32 on CPU, bfloat16 on accelerators)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np

    from imitation_jax.model.config import ModelConfig, with_platform
    from imitation_jax.model.params import init_params, model_graph
    from imitation_jax.sharding import MeshConfig, make_mesh
    from imitation_jax.train.objectives import KDConfig, make_loss_fn
    from imitation_jax.train.optimizer import OptimConfig, make_optimizer
    from imitation_jax.train.state import init_opt_state, shardings_of, step_scalar
    from imitation_jax.train.step import accum_batch_sharding, make_train_step
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_train import make_batch

    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1), jax.devices()[:1])
    platform = mesh.devices.flat[0].platform
    dtype = args.dtype or ("float32" if platform == "cpu" else "bfloat16")
    student = with_platform(ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_layers=args.layers,
        num_heads=args.heads, num_kv_heads=args.kv_heads, max_position_embeddings=max(2048, args.seq),
        param_dtype="float32", dtype=dtype, scan_unroll=args.layers), mesh)
    t_layers = args.teacher_layers or 2 * args.layers
    teacher = dataclasses.replace(student, num_layers=t_layers, scan_unroll=t_layers)
    optimizer, _ = make_optimizer(OptimConfig(warmup_steps=0), total_steps=1000)

    rng = np.random.default_rng(args.seed)
    batch_np = make_batch(args.vocab, args.batch, args.seq, args.seed)
    ids = np.argsort(rng.random((args.batch, args.seq, args.vocab), np.float32), axis=-1)[..., :args.top_k]
    logp = np.sort(np.log(rng.dirichlet(np.ones(args.top_k + 1), (args.batch, args.seq))[..., :args.top_k]), -1)[..., ::-1]
    kd_batch = dict(batch_np, teacher_ids=ids.astype(np.int32), teacher_logprobs=logp.astype(np.float32))

    results = {}
    with jax.set_mesh(mesh):
        graphdef = model_graph(student)[0]
        t_graphdef = model_graph(teacher)[0]
        t_params = init_params(teacher, mesh, args.seed + 1)
        variants = {"sft": ("sft", KDConfig(), batch_np, ()),
                    "stored": ("kd", KDConfig(source="stored", alpha=args.alpha), kd_batch, ()),
                    "teacher": ("kd", KDConfig(source="teacher", teacher="-", alpha=args.alpha), batch_np, (t_params,))}
        for name, (objective, kd, host_batch, extra) in variants.items():
            params = init_params(student, mesh, args.seed)  # the step donates its state: a fresh copy each
            state = {"params": params, "opt_state": init_opt_state(optimizer, params, mesh), "step": step_scalar(0, mesh)}
            loss_fn = make_loss_fn(graphdef, objective, kd, args.loss_chunk, True,
                                   t_graphdef if extra else None) if objective != "sft" else None
            step = make_train_step(graphdef, optimizer, mesh, shardings_of(state), args.loss_chunk, True,
                                   student.platform, loss_fn, shardings_of(t_params) if extra else None)
            batch = {k: jax.device_put(v[None], accum_batch_sharding(mesh)) for k, v in host_batch.items()}
            compiled = step.lower(state, batch, *extra).compile()
            mem = compiled.memory_analysis()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            box = {"state": state}

            def run(compiled=compiled, box=box, batch=batch, extra=extra):
                box["state"], metrics = compiled(box["state"], batch, *extra)
                jax.block_until_ready((box["state"], metrics))

            run()  # warm-up
            results[name] = {"run": run, "times": [], "mem": mem.temp_size_in_bytes + mem.argument_size_in_bytes,
                             "flops": cost.get("flops", 0.0), "exps": cost.get("transcendentals", 0.0)}
        for _ in range(args.rounds):
            for name, r in results.items():
                times = []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    r["run"]()
                    times.append(time.perf_counter() - t0)
                r["times"].append(statistics.median(times))

    step_flops = student.flops_per_token(args.seq)
    teacher_fwd = teacher.flops_per_token(args.seq) / 3  # forward only
    goal = 1 + teacher_fwd / step_flops + 0.10
    sft = min(results["sft"]["times"])
    print(f"student {student.num_params() / 1e6:.1f}M, teacher {teacher.num_params() / 1e6:.1f}M ({t_layers} layers), "
          f"seq {args.seq}, batch {args.batch}, vocab {args.vocab}, top-{args.top_k}, {dtype} on {platform}")
    print(f"{'variant':10} {'best ms':>9} {'vs sft':>7} {'peak MiB':>9} {'GFLOP':>7} {'G transc.':>9}")
    for name, r in results.items():
        best = min(r["times"])
        print(f"{name:10} {best * 1e3:9.1f} {best / sft:7.2f} {r['mem'] / 2**20:9.1f} {r['flops'] / 1e9:7.1f} "
              f"{r['exps'] / 1e9:9.3f}")
    stored, teach = min(results["stored"]["times"]) / sft, min(results["teacher"]["times"]) / sft
    print(f"stored_vs_sft={stored:.2f} teacher_vs_sft={teach:.2f} teacher_goal={goal:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
