"""Load figures of `imitation-jax serve`: requests/s and p50/p99 latency under 1, 8 and 32
concurrent clients, batched (--max-batch 32) vs one request at a time (--max-batch 1).

    .venv/bin/python tools/bench_serve.py [--model DIR] [--concurrency 1 8 32] [--max-tokens 32]

Without --model, a randomly initialised `tiny` preset model (~4M params) with a 512-piece
SentencePiece tokenizer is written to a temp dir (its replies are noise; the cost is the same).
Each server runs as its own `imitation-jax serve` process, one after the other; clients are
asyncio tasks in this process using the `openai` client, each sending --requests requests one after
another. Before timing, each server gets bursts of 1, 2, 4, ... --max-batch simultaneous requests\n(compiling every padded batch size) and each load is run once unmeasured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

PROMPTS = [f"Question {i}: explain in a few sentences why the number {i} is interesting." for i in range(64)]


def make_tiny_model(directory: str) -> str:
    import jax

    from imitation_jax.checkpoint import save_params
    from imitation_jax.convert import params_dir
    from imitation_jax.data.tokenizer import train_sentencepiece
    from imitation_jax.demo.synthetic import generate_conversations
    from imitation_jax.data.tokenizer import load_tokenizer
    from imitation_jax.model.config import ModelConfig
    from imitation_jax.model.presets import preset_fields
    from imitation_jax.sharding import MeshConfig, make_mesh
    from imitation_jax.model.params import init_params

    texts = [m["content"] for c in generate_conversations(200, seed=0) for m in c["messages"]]
    texts += ["BEGINNING OF CONVERSATION: USER: GPT:"] * 10
    tokenizer = load_tokenizer(train_sentencepiece(texts, os.path.join(directory, "spm"), vocab_size=512))
    fields = {**preset_fields("tiny"), "vocab_size": tokenizer.vocab_size, "max_position_embeddings": 1024}
    cfg = ModelConfig(**fields)
    out = os.path.join(directory, "tiny")
    os.makedirs(out)
    params = init_params(cfg, make_mesh(MeshConfig(data=1), devices=jax.devices()[:1]), seed=0)
    save_params(os.path.join(out, params_dir.PARAMS_DIR), params)
    tokenizer.save(os.path.join(out, params_dir.TOKENIZER_DIR))
    params_dir.write_meta(out, cfg, {"name": "koala", "turn_tokens": False}, "random init (bench_serve)")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, log_path: str) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    with open(log_path, "wb") as log:  # a file, not a pipe nobody reads (a full pipe blocks the server)
        proc = subprocess.Popen([sys.executable, "-m", "imitation_jax.cli", "serve", model, "--port", str(port),
                                 "--model-name", "m", "--max-batch", str(max_batch)],
                                stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path, errors="replace") as f:
                raise RuntimeError(f"server exited: {f.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url + "/v1"
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


async def load(base_url: str, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=600)
    latencies: list[float] = []
    tokens = 0

    async def one_client(c: int) -> None:
        nonlocal tokens
        for r in range(requests):
            prompt = PROMPTS[(c * requests + r) % len(PROMPTS)]
            start = time.perf_counter()
            resp = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0)
            latencies.append(time.perf_counter() - start)
            tokens += resp.usage.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    latencies.sort()
    return {"rps": len(latencies) / wall, "tps": tokens / wall, "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


async def warm_up(base_url: str, max_batch: int, max_tokens: int) -> None:
    """Bursts of 1, 2, 4, ... max_batch simultaneous requests, twice: every batch size the
    generator pads to is compiled before anything is timed."""
    sizes, r = [], 1
    while r <= max_batch:
        sizes.append(r)
        r *= 2
    for _ in range(2):
        for r in sizes:
            await load(base_url, r, 1, max_tokens)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir for serve (default: a random tiny model)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32, help="batch size of the batched server")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_tiny_model(tmp)
        results: dict[tuple[str, int], dict] = {}
        for label, max_batch in (("batched", args.max_batch), ("one at a time", 1)):
            proc, url = start_server(model, max_batch, os.path.join(tmp, f"serve-{max_batch}.log"))
            try:
                asyncio.run(warm_up(url, max_batch, args.max_tokens))
                for c in args.concurrency:
                    asyncio.run(load(url, c, args.requests, args.max_tokens))  # warm-up at this load
                    results[(label, c)] = asyncio.run(load(url, c, args.requests, args.max_tokens))
                    r = results[(label, c)]
                    print(f"  {label}, {c} clients: {r['rps']:.2f} req/s", file=sys.stderr)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    print(f"\nserve load, {args.max_tokens} new tokens per request, {args.requests} requests per client "
          f"(batched: --max-batch {args.max_batch}; one at a time: --max-batch 1)")
    print(f"{'clients':>7} | {'batched req/s':>13} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} | "
          f"{'1-at-a-time req/s':>17} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7}")
    for c in args.concurrency:
        b, o = results[("batched", c)], results[("one at a time", c)]
        print(f"{c:>7} | {b['rps']:>13.2f} {b['tps']:>7.1f} {b['p50']:>7.2f} {b['p99']:>7.2f} | "
              f"{o['rps']:>17.2f} {o['tps']:>7.1f} {o['p50']:>7.2f} {o['p99']:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
