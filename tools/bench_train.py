#!/usr/bin/env python
"""Training-step throughput of our JAX trainer against Hugging Face transformers + torch.

    python tools/bench_train.py                       # ~58M-param LLaMA, seq 512, batch 4
    python tools/bench_train.py --steps 10 --loss-chunk 128 --attention einsum
    python tools/bench_train.py --panel               # every shape of PANEL, each against torch

`--panel` runs each shape of PANEL (the default; a 135M model with 9:3 heads, hidden 576, 30 layers
and a 49K vocabulary; a LLaMA-3.2-1B shape) in its own process, one after the other, prints one line
per shape and finally `panel_min_speedup=<x.xx>` (the slowest shape's ratio; nan if a torch side
could not run on some shape). Other flags pass through to every shape.

Memory: torch workers start one at a time, each sized by an estimate (parameters, gradients and
AdamW moments in fp32, plus activations) or by the peak the started ones reached, whichever is
larger, against the memory available then. A variant that does not fit beside ours runs alone
after ours is timed and released (rounds no longer alternate; the output says so), unless it is
clearly too large even then (reported as not run). Workers volunteer to the kernel's OOM killer,
so one that does not fit after all dies instead of the bench's own process, and is reported as
killed for memory, never a traceback.

Both sides train the same LLaMA configuration on the same batch (random tokens, two examples
packed in each row, about half of the tokens trained): ours is the jitted train step of
`imitation_jax.train.step` (AdamW from `make_optimizer`, our masked cross entropy); theirs is
`LlamaForCausalLM` in fp32 (attention "sdpa" and "eager" are both timed, the faster is reported)
with `torch.optim.AdamW(fused=True)` (what transformers' Trainer uses by default, `adamw_torch_fused`,
on the CPU too) and the same clipping and packed-row mask. Compilation and the first
steps are excluded (`--warmup`), every timed JAX step ends in `block_until_ready` (JAX dispatches
asynchronously), torch uses every core. A side's step time is the median of `--steps` steps, best
over `--rounds` rounds that alternate the sides; the output says how many CPU cores other
processes used meanwhile (on a shared machine, repeat until that is ~0).

Ours runs as `imitation-jax train` does, with `train.host_memory=auto` (`imitation_jax/host_memory.py`:
on CPU, freed host memory stays in the process instead of being faulted back in every step).
Each torch variant runs in its own worker process, so the allocator settings cannot leak between
sides: "default" is torch as it runs out of the box (what the speedup is measured against), and
"kept" is torch under the same allocator settings as ours, printed beside it so the share of the
speedup that comes from the allocator is visible (`--torch-alloc` picks). On a GPU the torch side
runs on CUDA too (fp32 master weights, bf16 autocast); it is skipped, with a message,
without torch/transformers or without a CUDA torch.

MFU = model training FLOPs/token (`ModelConfig.flops_per_token`) x tokens/s / peak, where the
peak is a large fp32 matmul measured in the same run on a CPU, and the chip's published bf16
peak on an accelerator (compute then defaults to bf16). The FLOPs count the output layer at every
position, which ours skips where nothing is trained: `--trained all` trains every position, as the
MFU convention assumes (`tools/device_bench.sh` runs it on a lent GPU). The last line is

    speedup_vs_hf_torch=<x.xx> mfu=<0.xx>

(speedup is nan when the torch side did not run).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (multi-head attention)")
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="rows per step (one micro-batch)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per side and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side after compilation")
    p.add_argument("--rounds", type=int, default=3,
                   help="alternate the sides this many times (each side reports its best round): on a "
                        "shared machine one round can land in a slow phase for one side only")
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "einsum", "cudnn"))
    p.add_argument("--remat", default="none", choices=("none", "full", "save_dots"))
    p.add_argument("--scan-unroll", type=int, default=0,
                   help="model.scan_unroll (0: the number of layers, i.e. the layer loop without a scan)")
    p.add_argument("--loss-chunk", type=int, default=256, help="train.loss_chunk (0: whole sequence at once)")
    p.add_argument("--no-fuse-last-layer", dest="fuse_last_layer", action="store_false",
                   help="train.fuse_last_layer=false: the last layer's MLP runs on every position")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="compute dtype (default float32 on CPU, bfloat16 on accelerators)")
    p.add_argument("--no-torch", action="store_true", help="skip the transformers + torch side")
    p.add_argument("--torch-attn", default="sdpa,eager",
                   help="comma-separated HF attn_implementation values to time (the fastest is reported)")
    p.add_argument("--torch-alloc", default=None,
                   help="comma-separated torch allocator variants: default (glibc as is) and/or kept "
                        "(the host_memory settings ours uses); default: both on CPU, default on accelerators")
    p.add_argument("--torch-worker", default=None, help=argparse.SUPPRESS)  # IMPL:ALLOC:DEVICE:DTYPE, internal
    p.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before JAX starts")
    p.add_argument("--tie-embeddings", action="store_true", help="the output layer is the embedding (LLaMA-3.2)")
    p.add_argument("--trained", default="answers", choices=("answers", "all"),
                   help="which positions the loss trains: each example's second half (imitation data) "
                        "or every position (pretraining style; the MFU convention's full output layer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--panel", action="store_true", help="run every shape of PANEL, each against torch")
    return p.parse_args(argv)


# Shapes users train, not only the default: name -> flags (see the module docstring).
PANEL = {
    "default-58M": [],
    "135M-576h-30L-9:3h-v49k": ["--hidden", "576", "--layers", "30", "--heads", "9", "--kv-heads", "3",
                                "--intermediate", "1536", "--vocab", "49152", "--seq", "512", "--batch", "4"],
    "llama3.2-1B": ["--hidden", "2048", "--layers", "16", "--heads", "32", "--kv-heads", "8",
                    "--intermediate", "8192", "--vocab", "128256", "--seq", "256", "--batch", "2",
                    "--tie-embeddings"],
}


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.panel:
    ARGS = None  # the panel's own process only starts the shapes' processes: no JAX here
    _PANEL = True
else:
    _PANEL = False
if ARGS is not None and ARGS.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + ARGS.xla_flags).strip()
if ARGS is not None and ARGS.torch_worker is None and not ARGS.no_torch:
    # The torch workers share the accelerator with this process, whose JAX would otherwise take 75%
    # of its memory up front: too little is left for torch at ~1B parameters.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
HOST_MEMORY_KEPT = False
if ARGS is not None:
    # As `imitation-jax train` does, before any allocator arena or XLA thread exists; a torch
    # worker applies its own variant instead.
    from imitation_jax import host_memory  # noqa: E402

    HOST_MEMORY_KEPT = host_memory.configure(
        "auto" if ARGS.torch_worker is None else
        ("keep" if ARGS.torch_worker.split(":")[1] == "kept" else "release"))

import jax  # noqa: E402  (XLA_FLAGS must be set first)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


# ---------------------------------------------------------------------------------------- batch

def make_batch(vocab: int, batch: int, seq: int, seed: int, trained: str = "answers") -> dict[str, np.ndarray]:
    """Rows of two packed examples each (a boundary at a random point near the middle); in each
    example the first ~half (the "prompt") is not trained and the rest (the "answer") is, or with
    `trained="all"` every position is."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(batch, seq + 1), dtype=np.int64)
    segment_ids = np.ones((batch, seq), np.int32)
    positions = np.zeros((batch, seq), np.int32)
    loss_mask = np.zeros((batch, seq), np.int32)
    for r in range(batch):
        cut = int(rng.integers(seq // 3, 2 * seq // 3))
        for s, (lo, hi) in enumerate(((0, cut), (cut, seq))):
            segment_ids[r, lo:hi] = s + 1
            positions[r, lo:hi] = np.arange(hi - lo)
            answer = lo + (hi - lo) // 2
            loss_mask[r, answer:hi - 1] = 1  # the last token of an example predicts across the boundary
        loss_mask[r, seq - 1] = 1
    if trained == "all":
        loss_mask[:] = 1
    return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
            "loss_mask": loss_mask, "segment_ids": segment_ids, "positions": positions}


# ----------------------------------------------------------------------------------------- ours

def model_config(args, dtype: str):
    from imitation_jax.model import ModelConfig
    return ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                       max_position_embeddings=max(2048, args.seq), rms_norm_eps=1e-5, rope_theta=10000.0,
                       param_dtype="float32", dtype=dtype, remat=args.remat, attention=args.attention,
                       scan_unroll=args.scan_unroll or args.layers, tie_word_embeddings=args.tie_embeddings)


def setup_ours(args, cfg, batch_np: dict) -> dict:
    """Our jitted train step, compiled; `step()` runs one step and blocks until it is done."""
    from imitation_jax.train.optimizer import OptimConfig
    from imitation_jax.sharding import MeshConfig, make_mesh
    from imitation_jax.train.optimizer import make_optimizer
    from imitation_jax.train.state import init_opt_state, shardings_of, step_scalar
    from imitation_jax.model.params import init_params, model_graph
    from imitation_jax.train.step import accum_batch_sharding, make_train_step

    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1), jax.devices()[:1])
    optimizer, _ = make_optimizer(OptimConfig(warmup_steps=0), total_steps=1000)
    graphdef = model_graph(cfg)[0]
    with jax.set_mesh(mesh):
        params = init_params(cfg, mesh, args.seed)
        state = {"params": params, "opt_state": init_opt_state(optimizer, params, mesh), "step": step_scalar(0, mesh)}
        train_step = make_train_step(graphdef, optimizer, mesh, shardings_of(state), args.loss_chunk,
                                     args.fuse_last_layer)
        batch = {k: jax.device_put(v[None], accum_batch_sharding(mesh)) for k, v in batch_np.items()}
        t0 = time.perf_counter()
        compiled = train_step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
    box = {"state": state}
    losses = []

    def step() -> None:
        box["state"], metrics = compiled(box["state"], batch)
        jax.block_until_ready((box["state"], metrics))  # async dispatch: the step is done only here
        losses.append(float(metrics["loss"]))

    return {"step": step, "losses": losses, "compile_s": compile_s, "compiled": compiled}


def setup_torch(args, batch_np: dict, attn_impl: str, device: str = "cpu", dtype: str = "float32") -> dict:
    """LlamaForCausalLM (fp32 params) + AdamW on the same batch and mask; `step()` runs one step.
    On CUDA the forward runs under bf16 autocast when ours computes in bf16 (fp32 master weights,
    as ours)."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    hf_cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads or args.heads,
                         max_position_embeddings=max(2048, args.seq), rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=args.tie_embeddings, attention_bias=False, mlp_bias=False,
                         attn_implementation=attn_impl, dtype=torch.float32)
    model = LlamaForCausalLM(hf_cfg).to(device=device, dtype=torch.float32).train()
    named = list(model.named_parameters())
    decay = [p for n, p in named if p.ndim >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed_tokens" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    autocast = (torch.autocast(device, dtype=torch.bfloat16) if device != "cpu" and dtype == "bfloat16"
                else contextlib.nullcontext())

    inputs = torch.from_numpy(batch_np["inputs"]).long()
    targets = torch.from_numpy(batch_np["targets"]).long().reshape(-1)
    mask = torch.from_numpy(batch_np["loss_mask"]).float().reshape(-1)
    positions = torch.from_numpy(batch_np["positions"]).long()
    seg = torch.from_numpy(batch_np["segment_ids"])
    t = seg.shape[1]
    # The same packed-row mask as ours (causal AND same example) as a 4D mask, which HF passes
    # through untouched: boolean for sdpa; eager *adds* the mask to the scores, so it gets 0 / min.
    attn_mask = ((seg[:, :, None] == seg[:, None, :]) & torch.ones(t, t, dtype=torch.bool).tril())[:, None]
    if attn_impl != "sdpa":
        attn_mask = torch.zeros(attn_mask.shape).masked_fill(~attn_mask, torch.finfo(torch.float32).min)
    inputs, targets, mask, positions, attn_mask = (x.to(device) for x in (inputs, targets, mask, positions, attn_mask))
    losses = []

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            logits = model(input_ids=inputs, position_ids=positions, attention_mask=attn_mask).logits
        per_token = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets, reduction="none")
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())

    return {"step": step, "losses": losses}


class TorchWorker:
    """One torch variant in its own process (`--torch-worker`), so its allocator settings are its
    own: set up and warmed up at construction, then `round(n)` times n steps there."""

    def __init__(self, impl: str, alloc: str, device: str, dtype: str):
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--torch-worker",
               f"{impl}:{alloc}:{device}:{dtype}"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.losses: list[float] = []
        self.cpu_s = 0.0  # its CPU seconds as of its last reply
        reply = self._reply()
        if "error" in reply:
            self.close()
            raise RuntimeError(reply["error"])

    def _reply(self) -> dict:
        for line in self.proc.stdout:  # anything else a library prints to stdout is skipped
            if line.startswith(WORKER_PREFIX):
                reply = json.loads(line[len(WORKER_PREFIX):])
                self.cpu_s = process_cpu_s(self.proc.pid, self.cpu_s)
                self.losses = reply.get("losses", self.losses)
                return reply
        self.cpu_s = process_cpu_s(self.proc.pid, self.cpu_s)  # until it died: a zombie keeps it until waited for
        status = self.proc.wait()
        raise RuntimeError("the worker was killed (SIGKILL: out of memory?)" if status == -9 else
                           f"the worker exited with status {status}")

    def peak(self) -> float:
        """Its peak resident memory so far (bytes; 0 once it has exited or off Linux)."""
        return _proc_bytes(f"/proc/{self.proc.pid}/status", "VmHWM") or 0.0

    def rss(self) -> float:
        return _proc_bytes(f"/proc/{self.proc.pid}/status", "VmRSS") or 0.0

    def round(self, steps: int) -> list[float]:
        try:
            self.proc.stdin.write(f"{steps}\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):  # it died since the last round: say how
            return self._reply()["times"]
        return self._reply()["times"]

    def close(self) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        self.proc.wait(timeout=60)


GiB = 1 << 30


def _proc_bytes(path: str, key: str) -> float | None:
    """A "Key: N kB" line of a /proc file, in bytes (Linux; None elsewhere)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def process_cpu_s(pid, default: float = 0.0) -> float:
    """User + system CPU seconds of process `pid` ("self" for this one) from /proc (default elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return default


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy, all cores (/proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[0] + fields[1] + fields[2] + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")


def mem_available() -> float | None:
    """Bytes the kernel says a new process can use."""
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def torch_need(args, cfg, impl: str) -> float:
    """A rough upper estimate of one torch CPU training worker's memory: fp32 parameters, gradients
    and AdamW's two moments, the activations autograd keeps (per token and layer: the projections'
    inputs and outputs, the MLP's, and for eager attention the score matrices), the logits and
    their gradient, and ~1 GiB of runtime."""
    tokens = args.batch * args.seq
    per_token_layer = 16 * cfg.hidden_size + 5 * cfg.intermediate_size + (
        3 * cfg.num_heads * args.seq if impl == "eager" else 0)
    act = tokens * (cfg.num_layers * per_token_layer + 3 * cfg.vocab_size) * 4
    return cfg.num_params() * 16 + act + GiB


WORKER_PREFIX = "@@bench "


def torch_worker_main(args) -> int:
    """The worker side of `TorchWorker`: one JSON line per request on stdout."""
    impl, alloc, device, dtype = args.torch_worker.split(":")

    def say(**reply) -> None:
        print(WORKER_PREFIX + json.dumps(reply), flush=True)

    try:  # if memory runs out anyway, the kernel kills this worker rather than the bench's own process
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    try:
        import torch
        if device == "cuda" and not torch.cuda.is_available():
            say(error="no CUDA torch for this accelerator")
            return 0
        batch_np = make_batch(args.vocab, args.batch, args.seq, args.seed, args.trained)
        runner = setup_torch(args, batch_np, impl, device, dtype)
        for _ in range(max(args.warmup, 1)):
            runner["step"]()
    except Exception as exc:  # an attn implementation this transformers lacks, ...
        say(error=f"{type(exc).__name__}: {exc}")
        return 0
    say(ready=True, losses=runner["losses"])
    for line in sys.stdin:
        say(times=time_steps(runner, int(line)), losses=runner["losses"])
    return 0


class ForeignLoad:
    """CPU cores used by *other* processes since construction (Linux; None elsewhere): the whole
    machine's busy time from /proc/stat minus this process's own CPU time."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        busy = machine_busy_s()
        own = os.times()
        return None if busy is None else (time.perf_counter(), busy, own.user + own.system)

    def cores(self, own_elsewhere: float = 0.0):
        """own_elsewhere: CPU seconds our own worker processes used meanwhile (not foreign)."""
        end = self._sample()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        return max(0.0, ((end[1] - self.start[1]) - (end[2] - self.start[2]) - own_elsewhere) / wall)


def time_steps(runner: dict, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        runner["step"]()
        times.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------------------- main

def main(args) -> int:
    from imitation_jax.train.flops import measured_matmul_flops, peak_flops_per_device

    device = jax.devices()[0]
    on_cpu = device.platform == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    cfg = model_config(args, dtype)
    cfg.validate()
    batch_np = make_batch(args.vocab, args.batch, args.seq, args.seed, args.trained)
    flops_tok = cfg.flops_per_token(args.seq)
    print(f"device: {device.device_kind} ({device.platform}), {os.cpu_count()} CPU cores, jax {jax.__version__}")
    print(f"model: {cfg.num_params() / 1e6:.1f}M params, hidden {cfg.hidden_size}, layers {cfg.num_layers}, "
          f"heads {cfg.num_heads}/{cfg.kv_heads}, mlp {cfg.intermediate_size}, vocab {cfg.vocab_size}; "
          f"batch {args.batch} x seq {args.seq}, {dtype}; trained tokens "
          f"{int(batch_np['loss_mask'].sum())}/{batch_np['loss_mask'].size}")
    print(f"ours: attention={cfg.attention} remat={cfg.remat} loss_chunk={args.loss_chunk} "
          f"fuse_last_layer={args.fuse_last_layer} "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)

    runners = {"ours": setup_ours(args, cfg, batch_np)}
    # Warm-up (after compilation): first steps allocate, fill caches (the workers warm up theirs).
    for _ in range(max(args.warmup, 1)):
        runners["ours"]["step"]()
    workers, later, failed = {}, [], {}  # later: variants that fit only once ours is released
    torch_device = "cpu" if on_cpu else "cuda"
    if args.no_torch:
        print("torch: skipped (--no-torch)")
    elif missing := [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]:
        print(f"torch: skipped ({missing[0]} is not installed)")
    else:
        # One worker at a time, each sized by the estimate or by what the started ones peaked at
        # (their VmHWM), whichever is larger, against what is available now less the started
        # workers' headroom back to their peak (torch's default allocator hands memory back between
        # steps). A misjudged worker is the one the kernel kills (oom_score_adj), not ours.
        for impl in [x.strip() for x in args.torch_attn.split(",") if x.strip()]:
            allocs = args.torch_alloc or ("default,kept" if on_cpu else "default")
            for alloc in [x.strip() for x in allocs.split(",") if x.strip()]:
                name = f"torch/{impl}/{alloc}"
                need = max([torch_need(args, cfg, impl)] + [w.peak() for n, w in workers.items()
                                                            if n.split("/")[1] == impl])
                free = mem_available() if on_cpu else None
                if free is not None:
                    free -= sum(w.peak() - w.rss() for w in workers.values())
                if free is not None and need > free - GiB:
                    later.append((name, impl, alloc, need))
                    continue
                try:
                    workers[name] = TorchWorker(impl, alloc, torch_device, dtype)
                except RuntimeError as exc:  # no CUDA torch, an attn implementation this transformers lacks
                    failed[name] = f"skipped: {exc}"
    # Peak: a large f32 matmul measured on CPU in this run (same load); the bf16 figure elsewhere.
    matmul_flops = measured_matmul_flops(n=4096 if on_cpu else 8192,
                                         dtype=jnp.float32 if on_cpu else jnp.bfloat16, repeats=5)
    peak = matmul_flops if on_cpu else peak_flops_per_device()
    peak_what = "measured f32 matmul" if on_cpu else f"{device.device_kind} bf16 peak"
    # Rounds alternate the sides, so a neighbour's load hits both alike; each side's figure is its
    # best round's median step.
    times = {name: [] for name in [*runners, *workers]}
    load = ForeignLoad()
    # Our workers' CPU time is not "other processes": those started before the window count from
    # here, later ones from their start (their set-up and warm-up included), killed ones until death.
    cpu_base = {name: w.cpu_s for name, w in workers.items()}
    started = dict(workers)
    losses = {}

    def rounds_of(named: dict) -> None:
        for _ in range(args.rounds):
            if "ours" in named:
                times["ours"].append(time_steps(runners["ours"], args.steps))
            for name, worker in list(named.items()):
                if name == "ours":
                    continue
                try:
                    times[name].append(worker.round(args.steps))
                except RuntimeError as exc:  # killed mid-run
                    failed[name] = f"stopped: {exc}"
                    del named[name], workers[name]
                    times.pop(name)
                    worker.close()

    rounds_of({"ours": None, **workers})
    losses["ours"] = runners["ours"]["losses"]
    losses.update({n: w.losses for n, w in workers.items()})
    for worker in workers.values():
        worker.close()
    sequential = bool(later)
    if later:  # ours is timed: release it, then each remaining variant alone
        compile_s = runners["ours"]["compile_s"]
        runners.clear()
        import gc
        gc.collect()
        host_memory.trim()
        for name, impl, alloc, need in later:
            # The estimate is rough (within ~1 GiB of the peaks measured), and a worker that does not
            # fit after all is killed and reported, so it is tried unless clearly too large.
            free = mem_available()
            if need > free + GiB:
                failed[name] = f"not run: needs ~{need / GiB:.1f} GiB, {free / GiB:.1f} GiB available"
                continue
            print(f"{name}: timed alone, after ours (it does not fit beside it)", flush=True)
            try:
                worker = TorchWorker(impl, alloc, torch_device, dtype)
            except RuntimeError as exc:
                failed[name] = f"skipped: {exc}"
                continue
            workers[name], times[name], started[name] = worker, [], worker
            rounds_of({name: worker})
            if name in workers:
                losses[name] = worker.losses
                worker.close()
        runners["ours"] = {"compile_s": compile_s}
    foreign = load.cores(own_elsewhere=sum(w.cpu_s - cpu_base.get(n, 0.0) for n, w in started.items()))
    step_s = {name: min(statistics.median(r) for r in rounds) for name, rounds in times.items()}
    best_s = {name: min(min(r) for r in rounds) for name, rounds in times.items()}

    def tps(name):
        return args.batch * args.seq / step_s[name]

    # The reference is the fastest torch variant as torch runs out of the box (default allocator).
    ref = max([n for n in workers if n.endswith("/default")], key=tps, default=None)
    ref_kept = max([n for n in workers if n.endswith("/kept")], key=tps, default=None)
    print()
    print(f"compile {runners['ours']['compile_s']:.1f}s; loss " + "; ".join(
        f"{n} {v[0]:.4f}->{v[-1]:.4f}" for n, v in losses.items()))
    print(f"matmul ({'f32, 4096^3' if on_cpu else 'bf16, 8192^3'}) measured: {matmul_flops / 1e9:.1f} GFLOP/s; "
          f"peak for MFU ({peak_what}): {peak / 1e9:.1f} GFLOP/s; model train FLOPs/token {flops_tok / 1e6:.1f}M")
    if foreign is not None:
        print(f"timing: {args.rounds} round(s) x {args.steps} steps; other processes used {foreign:.2f} CPU cores "
              f"meanwhile" + (" -- the machine was shared, repeat when it is quiet" if foreign > 0.2 else ""))
    for name, why in failed.items():
        print("hf torch ({}, {} alloc): {}".format(*name.split("/")[1:], why))
    if sequential:
        print("note: some torch variants ran after ours was released, not in alternating rounds")
    kept = "kept" if HOST_MEMORY_KEPT else "default"
    labels = {"ours": f"ours jax ({cfg.attention}, loss_chunk {args.loss_chunk}, {kept} alloc)"}
    labels.update({n: "hf torch ({}, {} alloc)".format(*n.split("/")[1:]) + (" *" if n == ref else "")
                   for n in workers})
    print(f"{'':48s} {'tokens/s':>9s} {'ms/step':>9s} {'best ms':>9s} {'MFU':>6s} {'vs torch':>9s}")
    for name, label in labels.items():
        ratio = f"{tps(name) / tps(ref):8.2f}x" if ref else f"{'-':>9s}"
        print(f"{label:48s} {tps(name):9.1f} {1e3 * step_s[name]:9.1f} {1e3 * best_s[name]:9.1f} "
              f"{flops_tok * tps(name) / peak:6.3f} {ratio}")
    if ref_kept:
        print(f"vs torch under the same allocator settings as ours: {tps('ours') / tps(ref_kept):.2f}x")
    speedup = tps("ours") / tps(ref) if ref else float("nan")
    print(f"speedup_vs_hf_torch={speedup:.2f} mfu={flops_tok * tps('ours') / peak:.2f} "
          f"ours_tokens_s={tps('ours'):.1f} torch_tokens_s={tps(ref) if ref else float('nan'):.1f}")
    return 0


def panel_main(argv: list[str]) -> int:
    """Each PANEL shape in its own process (its memory is its own), one after the other."""
    passthrough = [a for a in argv if a != "--panel"]
    results = {}
    for name, flags in PANEL.items():
        print(f"=== {name}: tools/bench_train.py {' '.join(flags + passthrough)}", flush=True)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *flags, *passthrough],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        print(proc.stdout, flush=True)
        last = [line for line in proc.stdout.splitlines() if line.startswith("speedup_vs_hf_torch=")]
        if proc.returncode or not last:
            results[name] = {"error": f"exit status {proc.returncode}"}
            continue
        results[name] = {k: float(v) for k, v in (kv.split("=") for kv in last[-1].split())}
    print("panel:")
    for name, r in results.items():
        if "error" in r:
            print(f"  {name:28s} failed ({r['error']})")
        else:
            print(f"  {name:28s} ours {r['ours_tokens_s']:8.1f} tok/s  hf torch {r['torch_tokens_s']:8.1f} tok/s  "
                  f"speedup {r['speedup_vs_hf_torch']:.2f}x  mfu {r['mfu']:.3f}")
    speedups = [r.get("speedup_vs_hf_torch", float("nan")) for r in results.values()]
    print(f"panel_min_speedup={float('nan') if any(x != x for x in speedups) else min(speedups):.2f}")
    return 0


if __name__ == "__main__":
    if _PANEL:
        sys.exit(panel_main(sys.argv[1:]))
    sys.exit(torch_worker_main(ARGS) if ARGS.torch_worker else main(ARGS))
