#!/usr/bin/env python
"""A/B train steps of model shapes and step variants in ONE process, steps alternating.

    python tools/profile_train.py 135m 135m+unroll1                 # a variant of one shape
    python tools/profile_train.py 58m 58m,hidden_size=576,num_heads=9 # one dimension changed
    python tools/profile_train.py 135m --trace /tmp/t                 # + a jax.profiler trace

An arm is `SHAPE[,field=value...][+VARIANT...]`: a shape of SHAPES, ModelConfig fields (and seq,
batch) over it, and variants of VARIANTS. Every arm compiles its own train step
(`train.step.make_train_step`, as tools/bench_train.py builds it); arms of the same model shape share
one training state (passed from arm to arm), so memory holds one model per shape. Steps run
A, B, C, A, B, C, ...; each arm reports tokens/s from its median step, its median time per step
relative to the first arm (the median of per-round ratios: neighbouring steps see nearly the same
load on a shared machine), and the same per FLOP of the compiled step (XLA's cost analysis), which
compares shapes. `--trace DIR` writes, per arm, a jax.profiler trace of one step and its optimized
HLO (the op names in the trace are the HLO's instructions).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = {  # tools/bench_train.py's shapes as ModelConfig fields, plus seq and batch
    "58m": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=None, intermediate_size=1376,
                vocab_size=32000, seq=512, batch=4),
    "135m": dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                 vocab_size=49152, seq=512, batch=4),
}

# name -> (ModelConfig overrides, train-step overrides, compiler options)
VARIANTS = {
    "unroll1": ({"scan_unroll": 1}, {}, {}),
    "unroll2": ({"scan_unroll": 2}, {}, {}),
    "xla": ({"attention": "xla"}, {}, {}),
    "chunk0": ({}, {"loss_chunk": 0}, {}),
    "chunk128": ({}, {"loss_chunk": 128}, {}),
    "chunk512": ({}, {"loss_chunk": 512}, {}),
    "nofuse": ({}, {"fuse_last_layer": False}, {}),
    "save_dots": ({"remat": "save_dots"}, {}, {}),
    "remat_full": ({"remat": "full"}, {}, {}),
    "vw256": ({}, {}, {"xla_cpu_prefer_vector_width": 256}),
    "eigen": ({}, {}, {"xla_cpu_experimental_ynn_fusion_type": ""}),  # no YNNPACK: Eigen dots
    "ynn_dot": ({}, {}, {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}),
    "ynn_dot_elt": ({}, {}, {"xla_cpu_experimental_ynn_fusion_type":
                             "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"}),
    "concurrency_sched": ({}, {}, {"xla_cpu_enable_concurrency_optimized_scheduler": True}),
}


@dataclasses.dataclass
class Arm:
    name: str
    shape: dict
    model: dict
    step: dict
    options: dict
    patches: dict  # "module.attr" -> object set there while the arm's step is traced


def parse_arm(text: str, patches: dict) -> Arm:
    head, *variants = text.split("+")
    shape_name, *fields = head.split(",")
    shape = dict(SHAPES[shape_name])
    for kv in fields:
        k, v = kv.split("=")
        shape[k] = None if v == "None" else int(v)
    model, step, options, patch = {}, {}, {}, {}
    for v in variants:
        if v.startswith("@"):  # a patch of --patches FILE
            patch.update(patches[v[1:]])
            continue
        m, s, o = VARIANTS[v]
        model.update(m), step.update(s), options.update(o)
    return Arm(text, shape, model, step, options, patch)


class patched:
    """Set module attributes ("pkg.module.attr" -> value) for the duration of a with block."""

    def __init__(self, patches: dict):
        import importlib
        self.items = [(importlib.import_module(k.rpartition(".")[0]), k.rpartition(".")[2], v)
                      for k, v in patches.items()]

    def __enter__(self):
        self.saved = [(m, a, getattr(m, a)) for m, a, _ in self.items]
        for m, a, v in self.items:
            setattr(m, a, v)

    def __exit__(self, *exc):
        for m, a, v in self.saved:
            setattr(m, a, v)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("arms", nargs="+")
    p.add_argument("--steps", type=int, default=4, help="timed rounds (one step per arm each)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--loss-chunk", type=int, default=256)
    p.add_argument("--trace", default=None)
    p.add_argument("--trace-tries", type=int, default=1,
                   help="trace up to this many steps per arm, stopping at one with other processes quiet")
    p.add_argument("--host-memory", default="auto", help="train.host_memory for this process (auto|keep|release)")
    p.add_argument("--patches", default=None,
                   help="a Python file defining PATCHES = {name: {'pkg.module.attr': value}}; arm variant @name "
                        "applies one while that arm's step is traced (experimental kernels)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from imitation_jax import host_memory
    host_memory.configure(args.host_memory)  # as `imitation-jax train` and tools/bench_train.py run
    import jax
    from bench_train import machine_busy_s, make_batch
    from imitation_jax.model import ModelConfig
    from imitation_jax.model import cpu
    from imitation_jax.model.params import init_params, model_graph
    from imitation_jax.sharding import MeshConfig, make_mesh
    from imitation_jax.train.optimizer import OptimConfig, make_optimizer
    from imitation_jax.train.state import init_opt_state, shardings_of, step_scalar
    from imitation_jax.train.step import accum_batch_sharding, make_train_step

    patches = {}
    if args.patches:
        namespace = {}
        sys.path.insert(0, os.path.dirname(os.path.abspath(args.patches)))
        exec(compile(open(args.patches).read(), args.patches, "exec"), namespace)
        patches = namespace["PATCHES"]
    arms = [parse_arm(a, patches) for a in args.arms]
    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1), jax.devices()[:1])
    optimizer, _ = make_optimizer(OptimConfig(warmup_steps=0), total_steps=1000)
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", flush=True)
    states, batches, compiled, tokens, flops = {}, {}, {}, {}, {}
    with jax.set_mesh(mesh):
        for arm in arms:
            shape = dict(arm.shape)
            seq, batch = shape.pop("seq"), shape.pop("batch")
            key = tuple(sorted(arm.shape.items()))
            cfg = ModelConfig(**shape, max_position_embeddings=max(2048, seq), rms_norm_eps=1e-5,
                              param_dtype="float32", dtype="float32", scan_unroll=shape["num_layers"],
                              platform="cpu")
            if key not in states:
                params = init_params(cfg, mesh, 0)
                states[key] = {"params": params, "opt_state": init_opt_state(optimizer, params, mesh),
                               "step": step_scalar(0, mesh)}
                batches[key] = {k: jax.device_put(v[None], accum_batch_sharding(mesh))
                                for k, v in make_batch(cfg.vocab_size, batch, seq, 0).items()}
            cfg = dataclasses.replace(cfg, **arm.model)
            kw = {"loss_chunk": args.loss_chunk, "fuse_last_layer": True, **arm.step}
            saved = dict(cpu.COMPILER_OPTIONS)
            cpu.COMPILER_OPTIONS.update(arm.options)  # read when the step is made (train.step.compiler_options)
            fn = make_train_step(model_graph(cfg)[0], optimizer, mesh, shardings_of(states[key]), kw["loss_chunk"],
                                 kw["fuse_last_layer"], "cpu")
            cpu.COMPILER_OPTIONS.clear(), cpu.COMPILER_OPTIONS.update(saved)
            t0 = time.perf_counter()
            with patched(arm.patches):
                compiled[arm.name] = fn.lower(states[key], batches[key]).compile()
            cost = compiled[arm.name].cost_analysis()
            flops[arm.name] = (cost[0] if isinstance(cost, list) else cost).get("flops", float("nan"))
            tokens[arm.name] = seq * batch
            print(f"{arm.name}: {cfg.num_params() / 1e6:.1f}M params, compiled in {time.perf_counter() - t0:.1f}s, "
                  f"{flops[arm.name] / 1e9:.0f} GFLOP/step", flush=True)
    names = [a.name for a in arms]
    keys = {a.name: tuple(sorted(a.shape.items())) for a in arms}
    times = {n: [] for n in names}
    cpu_s = {n: [] for n in names}  # this process's CPU seconds per step: the work, less load-dependent

    foreign = {n: [] for n in names}  # other processes' CPU cores during each step

    def run(name):
        key = keys[name]
        # process_time: all this process's threads, in ns (os.times ticks 10 ms, longer than a tiny step)
        b0, t0, c0 = machine_busy_s(), time.perf_counter(), time.process_time()
        states[key], metrics = compiled[name](states[key], batches[key])
        jax.block_until_ready((states[key], metrics))
        b1, t1, c1 = machine_busy_s(), time.perf_counter(), time.process_time()
        own = c1 - c0
        cpu_s[name].append(own)
        foreign[name].append(max(0.0, (b1 - b0 - own) / (t1 - t0)))
        return t1 - t0

    for _ in range(args.warmup):
        for n in names:
            run(n)
    if args.trace:  # a traced step per arm, and its optimized HLO (op names -> source lines)
        for i, n in enumerate(names):
            for attempt in range(args.trace_tries):  # until other processes leave the machine alone
                where = os.path.join(args.trace, str(i) if attempt == 0 else f"{i}.{attempt}")
                os.makedirs(where, exist_ok=True)
                with open(os.path.join(where, "hlo.txt"), "w") as f:
                    f.write(compiled[n].as_text())
                with jax.profiler.trace(where):
                    took = run(n)
                print(f"{n}: traced step {1e3 * took:.0f} ms, other processes {foreign[n][-1]:.1f} cores -> {where}",
                      flush=True)
                if foreign[n][-1] < QUIET:
                    break
    for r in range(args.steps):
        for n in names:
            times[n].append(run(n))
        print(f"round {r}: " + "  ".join(f"{1e3 * times[n][-1]:.0f}ms ({foreign[n][-1]:.1f})" for n in names)
              + f"  (foreign cores); load {os.getloadavg()[0]:.1f}", flush=True)
    ref = names[0]
    print(f"{'arm':40s} {'tokens/s':>9s} {'median ms':>10s} {'time/ref':>9s} {'time/FLOP/ref':>14s} "
          f"{'cpu s':>7s} {'cpu/ref':>8s}")
    for n in names:
        med = statistics.median(times[n])
        ratio = statistics.median(a / b for a, b in zip(times[n], times[ref]))
        own, ref_own = sum(cpu_s[n][-args.steps:]), sum(cpu_s[ref][-args.steps:])
        cpu_ratio = own / ref_own if ref_own > 0 else float("nan")
        print(f"{n:40s} {tokens[n] / med:9.1f} {1e3 * med:10.0f} {ratio:9.3f} {ratio * flops[ref] / flops[n]:14.3f} "
              f"{statistics.median(cpu_s[n][-args.steps:]):7.2f} {cpu_ratio:8.3f}")
    quiet = [r for r in range(args.steps) if all(foreign[n][-args.steps:][r] < QUIET for n in names)]
    if quiet:
        print(f"quiet rounds (other processes < {QUIET} cores in every step of the round): {len(quiet)}")
        for n in names:
            ts = [times[n][r] for r in quiet]
            ratio = statistics.median(times[n][r] / times[ref][r] for r in quiet)
            print(f"{n:40s} {tokens[n] / statistics.median(ts):9.1f} {1e3 * statistics.median(ts):10.0f} {ratio:9.3f}")
    else:
        print("no quiet round")
    return 0


QUIET = 0.3


if __name__ == "__main__":
    sys.exit(main())
