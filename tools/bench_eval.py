"""lm-eval log-likelihood throughput: our JAX backend vs lm-eval's own HF (transformers + torch)
backend, on the same exported model and the same requests, in one process.

    .venv/bin/python tools/bench_eval.py [--hidden 512 --layers 8 --questions 64 --batch-size 16]

The model is a randomly initialised LLaMA (throughput does not depend on the weights) exported to
a temporary HF dir in float32; both backends load that dir. The requests are multiple-choice
style (a 4-way one-token answer after a context of a few hundred tokens, as MMLU) plus multi-token
continuations (as HellaSwag/ARC). Each backend runs the request set twice; the first pass includes
compilation (ours) / warm-up (torch), the second is the steady-state figure. The last line is
`ours_req_per_s=... hf_req_per_s=... speedup=...`.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def export(cfg, params, tokenizer, template, out: str) -> None:
    import json

    import numpy as np

    from imitation_jax.convert.hf_config import hf_config_dict
    from imitation_jax.convert.hf_export import save_tokenizer, write_weights

    write_weights(cfg, params, out, np.dtype("float32"), 5 << 30)
    save_tokenizer(tokenizer, template, out)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_config_dict(cfg, "float32", tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id), f)


def make_requests(texts: list[str], questions: int, seed: int = 0):
    from lm_eval.api.instance import Instance

    rng = random.Random(seed)
    requests = []
    for q in range(questions):
        context = " ".join(rng.sample(texts, 6))[:1200] + "\nAnswer:"
        for letter in "ABCD":
            requests.append(Instance("loglikelihood", {}, (context, f" {letter}"), len(requests)))
        ending = " ".join(rng.sample(texts, 1))[:160]
        requests.append(Instance("loglikelihood", {}, (context, " " + ending), len(requests)))
    return requests


def timed(lm, requests) -> tuple[float, float, list]:
    start = time.perf_counter()
    first = lm.loglikelihood(requests, disable_tqdm=True)
    t1 = time.perf_counter() - start
    start = time.perf_counter()
    second = lm.loglikelihood(requests, disable_tqdm=True)
    t2 = time.perf_counter() - start
    assert first == second or all(abs(a[0] - b[0]) < 1e-3 for a, b in zip(first, second))
    return t1, t2, second


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=8000, help="SentencePiece vocabulary trained for the bench")
    p.add_argument("--questions", type=int, default=64, help="5 requests each (4 one-token choices + 1 ending)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)

    import jax
    import torch

    from imitation_jax.data.tokenizer import train_sentencepiece
    from imitation_jax.demo.synthetic import generate_conversations
    from imitation_jax.data.templates import get_template
    from imitation_jax.data.tokenizer import load_tokenizer
    from imitation_jax.evaluation import runner
    from imitation_jax.model.config import ModelConfig
    from imitation_jax.sharding import MeshConfig, make_mesh
    from imitation_jax.model.params import init_params

    if args.threads:
        torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="bench_eval_")
    texts = [m["content"] for c in generate_conversations(3000, seed=1) for m in c["messages"]]
    tokenizer = load_tokenizer(train_sentencepiece(texts, os.path.join(work, "sp"), vocab_size=args.vocab))
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                      max_position_embeddings=2048)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    params = init_params(cfg, mesh, 0)
    hf_dir = os.path.join(work, "hf")
    os.makedirs(hf_dir)
    export(cfg, params, tokenizer, get_template("koala", tokenizer), hf_dir)
    requests = make_requests(texts, args.questions)
    lengths = [len(tokenizer.encode(r.args[0] + r.args[1])) for r in requests]
    print(f"model: {cfg.num_params() / 1e6:.1f}M params ({args.layers} layers, hidden {args.hidden}, vocab "
          f"{cfg.vocab_size}); {len(requests)} requests, {sum(lengths) / len(lengths):.0f} tokens on average; "
          f"batch {args.batch_size}; jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)", flush=True)

    ours = runner.make_lm(hf_dir, "ours", batch_size=args.batch_size)
    o1, o2, ours_res = timed(ours, requests)
    print(f"ours: first pass {o1:.1f}s (with compilation), steady {o2:.1f}s = {len(requests) / o2:.1f} req/s", flush=True)
    hf = runner.make_lm(hf_dir, "hf", batch_size=args.batch_size)
    h1, h2, hf_res = timed(hf, requests)
    print(f"hf:   first pass {h1:.1f}s, steady {h2:.1f}s = {len(requests) / h2:.1f} req/s", flush=True)
    diff = max(abs(a[0] - b[0]) for a, b in zip(ours_res, hf_res))
    greedy_same = sum(a[1] == b[1] for a, b in zip(ours_res, hf_res))
    print(f"max |logp ours - hf| = {diff:.2e}; is_greedy equal on {greedy_same}/{len(requests)}")
    print(f"ours_req_per_s={len(requests) / o2:.2f} hf_req_per_s={len(requests) / h2:.2f} speedup={h2 / o2:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
