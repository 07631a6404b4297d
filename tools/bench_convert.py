"""Peak RSS and wall time of `import-hf` and `export-hf` on a random LLaMA-shaped bf16 checkpoint.

    python tools/bench_convert.py                       # LLaMA-7B shape (~13.5 GB on disk)
    python tools/bench_convert.py --preset llama-7b --layers 4 --workdir /tmp/bench
    python tools/bench_convert.py --shape llama3-8b --layers 2   # 128K vocab: 2.8 GB, 1 GB embedding

Writes random bf16 safetensors shards (5 GB each, HF's default) with the preset's config.json to a
temp dir, then runs each conversion in a child process (`imitation-jax import-hf ... --dtype
bfloat16`, `imitation-jax export-hf ... --dtype bfloat16`) and reads its peak RSS from
/proc/self/status (VmHWM; Linux). Needs the checkpoint's size three times on disk (input, Orbax, output).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def write_random_checkpoint(directory: str, preset: str, layers: int | None, shard_bytes: int) -> int:
    import ml_dtypes

    from imitation_jax.convert import hf_layout
    from imitation_jax.convert.hf_config import hf_config_dict
    from imitation_jax.convert.safetensors_io import ShardedWriter
    from imitation_jax.model.presets import preset as make

    cfg = make(preset, **({"num_layers": layers} if layers else {}))
    rng = np.random.default_rng(0)
    names = [(n, hf_layout.hf_shape(e, cfg, cfg.vocab_size)) for e in hf_layout.iter_layout(cfg)
             for n in hf_layout.hf_names(e, cfg)]
    writer = ShardedWriter(directory, shard_bytes, [(n, s, ml_dtypes.bfloat16) for n, s in names])
    for name, shape in names:
        # Random bits reinterpreted as bf16 would hold NaNs; scaled normals are cheap enough. By
        # row blocks, so a 128K-vocab embedding is not held whole in float32.
        step = max(1, (64 << 20) // (4 * int(np.prod(shape[1:]))))
        writer.add_blocks(name, ((rng.standard_normal((min(step, shape[0] - a), *shape[1:]), dtype=np.float32)
                                  * 0.02).astype(ml_dtypes.bfloat16) for a in range(0, shape[0], step)))
    writer.close()
    write_tokenizer(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config_dict(cfg, "bfloat16", 1, 2, None), f)
    return cfg.num_params()


def write_tokenizer(directory: str) -> None:
    """A small byte-level BPE tokenizer (export needs one; the model's vocab may be larger)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}, f)


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def run_child(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of one conversion in a fresh child process."""
    # VmHWM: this process's own peak. ru_maxrss would not do: Linux carries it across fork+exec,
    # so it reports the parent's peak (the random checkpoint it just wrote) when that is higher.
    code = ("import sys; from imitation_jax.cli import main; rc = main(sys.argv[1:]); "
            "peak = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]; "
            "print('PEAK_RSS_KB', peak, flush=True); sys.exit(rc)")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{argv[0]} failed:\n{proc.stderr[-2000:]}")
    peak_kb = int(proc.stdout.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return wall, peak_kb / 2**20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", "--shape", dest="preset", default="llama-7b",
                   help="a model.presets name (llama-7b, llama3-8b: 128K vocab, ...)")
    p.add_argument("--layers", type=int, default=None, help="fewer layers than the preset (smaller run)")
    p.add_argument("--workdir", default=None, help="where to write (default: a temp dir, removed after)")
    p.add_argument("--max-shard-size", default="5GB")
    args = p.parse_args(argv)

    from imitation_jax.convert.safetensors_io import parse_size

    work = args.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    hf, ckpt, out = (os.path.join(work, n) for n in ("hf", "ckpt", "out"))
    try:
        t0 = time.perf_counter()
        n_params = write_random_checkpoint(hf, args.preset, args.layers, parse_size(args.max_shard_size))
        size = du(hf)
        print(f"{args.preset}{f' ({args.layers} layers)' if args.layers else ''}: {n_params / 1e9:.2f}B params, "
              f"{size / 2**30:.2f} GiB bf16 on disk (written in {time.perf_counter() - t0:.0f} s)", flush=True)
        wall, rss = run_child(["import-hf", hf, "--out", ckpt, "--dtype", "bfloat16"])
        print(f"import-hf: {wall:7.1f} s  peak RSS {rss:6.2f} GiB  (model {size / 2**30:.2f} GiB)", flush=True)
        wall, rss = run_child(["export-hf", ckpt, "--out", out, "--dtype", "bfloat16",
                               "--max-shard-size", args.max_shard_size])
        print(f"export-hf: {wall:7.1f} s  peak RSS {rss:6.2f} GiB  (model {size / 2**30:.2f} GiB)", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
