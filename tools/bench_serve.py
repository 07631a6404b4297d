"""Load figures of `imitation-jax serve`: continuous batching (`--scheduler continuous`, the default)
against one batch at a time (`--scheduler batch`, the scheduler before it), same model, same run.

    .venv/bin/python tools/bench_serve.py [--model DIR] [--concurrency 1 8 32] [--max-tokens 64]

Requests/s, generated tokens/s and p50/p99 latency under 1, 8 and 32 concurrent clients (each
sends --requests chat requests one after another), and with 32 clients of which half leave
early (a streamed request closed after its first tokens, then the next one; the figures are those
of the requests read to the end). Replies vary in length as real ones do: request i asks for
--max-tokens / 8, / 4, / 2 or all of it (i mod 4), greedy, so most run to their limit.

"one batch" is the time of one burst of --max-batch simultaneous requests on the batch
scheduler: what a batch holding the longest request takes to decode; the issue's goal is a p99 at
32 clients within 1.5x of it, at twice the batch scheduler's requests/s.

Without --model, a randomly initialised `tiny` preset model (~4M params) with a 512-piece
SentencePiece tokenizer is written to a temp dir (its replies are noise; the cost is the same).
Each server runs as its own `imitation-jax serve` process, one after the other, with --max-batch
32; clients are asyncio tasks in this process (the `openai` client; httpx for the streams left
early). The continuous server starts with `--warmup full` (every batch shape compiled before
/health says ready); then each server gets bursts of 1, 2, 4, ... --max-batch requests and each
load once unmeasured, and the compiles that still happen while measured are counted (/health).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

PROMPTS = [f"Question {i}: explain in a few sentences why the number {i} is interesting." for i in range(64)]
SCHEDULERS = ("continuous", "batch")


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


def start_server(model: str, scheduler: str, max_batch: int, max_len: int, warmup: str, log_path: str):
    import httpx

    port = free_port()
    with open(log_path, "wb") as log:  # a file, not a pipe nobody reads (a full pipe blocks the server)
        proc = subprocess.Popen([sys.executable, "-m", "imitation_jax.cli", "serve", model, "--port", str(port),
                                 "--model-name", "m", "--max-batch", str(max_batch), "--max-len", str(max_len),
                                 "--scheduler", scheduler, "--max-queue", "1024", "--warmup", warmup],
                                stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() < t0 + 900:
        if proc.poll() is not None:
            with open(log_path, errors="replace") as f:
                raise RuntimeError(f"server exited: {f.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:  # 503 while warming up
                return proc, url, time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def limit(i: int, max_tokens: int) -> int:
    return max(1, max_tokens >> (3 - i % 4))  # /8, /4, /2, /1


async def load(base_url: str, clients: int, requests: int, max_tokens: int, leave: int = 0) -> dict:
    """`clients` closed-loop clients; the first `leave` of them close each streamed request after
    its first tokens (those are not counted)."""
    import httpx
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=600)
    http = httpx.AsyncClient(timeout=600)
    latencies: list[float] = []
    tokens = 0
    left = 0

    async def one_client(c: int) -> None:
        nonlocal tokens, left
        for r in range(requests):
            i = c * requests + r
            messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
            start = time.perf_counter()
            if c < leave:
                body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
                async with http.stream("POST", base_url + "/chat/completions", json=body) as resp:
                    seen = 0
                    async for line in resp.aiter_lines():
                        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                            seen += 1
                            if seen == 2:
                                break  # leave: the connection closes
                left += 1
                continue
            resp = await client.chat.completions.create(model="m", messages=messages, max_tokens=limit(i, max_tokens),
                                                        temperature=0)
            latencies.append(time.perf_counter() - start)
            tokens += resp.usage.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    await http.aclose()
    latencies.sort()
    return {"rps": len(latencies) / wall, "tps": tokens / wall, "p50": statistics.median(latencies),
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], "left": left}


async def burst(base_url: str, n: int, max_tokens: int) -> float:
    """n simultaneous requests, all asking for max_tokens; seconds until the last is answered."""
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=600)

    async def one(i):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": PROMPTS[i]}],
                                             max_tokens=max_tokens, temperature=0)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    await client.close()
    return time.perf_counter() - start


async def warm_up(base_url: str, max_batch: int, max_tokens: int) -> None:
    """Bursts of 1, 2, 4, ... max_batch simultaneous requests: every batch shape compiled."""
    r = 1
    while r <= max_batch:
        await load(base_url, r, 1, max_tokens)
        r *= 2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir for serve (default: a random tiny model)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64, help="the longest reply (others ask 1/8, 1/4, 1/2 of it)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=256, help="serve --max-len (fewer shapes to compile)")
    ap.add_argument("--schedulers", nargs="+", default=list(SCHEDULERS), choices=SCHEDULERS)
    ap.add_argument("--warmup", default="full", choices=("basic", "full", "none"),
                    help="serve --warmup of the continuous server (default full: every batch shape)")
    args = ap.parse_args(argv)
    loads = [(c, 0) for c in args.concurrency] + [(32, 16)]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_tiny_model(tmp)
        results: dict[tuple[str, int, int], dict] = {}
        one_batch: dict[str, float] = {}
        started: dict[str, float] = {}
        for sched in args.schedulers:
            proc, url, started[sched] = start_server(model, sched, args.max_batch, args.max_len, args.warmup,
                                                     os.path.join(tmp, f"serve-{sched}.log"))
            base = url + "/v1"
            try:
                asyncio.run(warm_up(base, args.max_batch, args.max_tokens))
                asyncio.run(burst(base, args.max_batch, args.max_tokens))
                one_batch[sched] = min(asyncio.run(burst(base, args.max_batch, args.max_tokens)) for _ in range(2))
                import httpx

                for c, leave in loads:
                    asyncio.run(load(base, c, args.requests, args.max_tokens, leave))  # unmeasured
                    before = httpx.get(url + "/health").json()["compiles"]
                    r = results[(sched, c, leave)] = asyncio.run(load(base, c, args.requests, args.max_tokens, leave))
                    r["compiles"] = httpx.get(url + "/health").json()["compiles"] - before
                    print(f"  {sched}, {c} clients ({leave} leaving): {r['rps']:.2f} req/s, p99 {r['p99']:.2f} s, "
                          f"{r['compiles']} compiles while measured", file=sys.stderr)
                print(f"  {sched} /health: {httpx.get(url + '/health').json()}", file=sys.stderr)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    print(f"\nserve load: replies of {args.max_tokens}/8 .. {args.max_tokens} tokens, {args.requests} requests per "
          f"client, --max-batch {args.max_batch}, --max-len {args.max_len}")
    print(f"start to /health 200 (continuous: --warmup {args.warmup}): "
          + ", ".join(f"{s} {started[s]:.1f} s" for s in args.schedulers))
    print("compiles while measured: " + ", ".join(
        f"{s} {sum(results[(s, c, leave)]['compiles'] for c, leave in loads)}" for s in args.schedulers))
    print(f"one batch ({args.max_batch} simultaneous requests of {args.max_tokens} tokens): "
          + ", ".join(f"{s} {one_batch[s]:.2f} s" for s in args.schedulers))
    head = " | ".join(f"{s + ' req/s':>16} {'tok/s':>7} {'p50 s':>6} {'p99 s':>6}" for s in args.schedulers)
    print(f"{'clients':>16} | {head}")
    for c, leave in loads:
        row = " | ".join(f"{results[(s, c, leave)]['rps']:>16.2f} {results[(s, c, leave)]['tps']:>7.1f} "
                         f"{results[(s, c, leave)]['p50']:>6.2f} {results[(s, c, leave)]['p99']:>6.2f}"
                         for s in args.schedulers)
        name = f"{c}" + (f" ({leave} leave)" if leave else "")
        print(f"{name:>16} | {row}")
    if set(SCHEDULERS) <= set(args.schedulers) and 32 in args.concurrency:
        new, old = results[("continuous", 32, 0)], results[("batch", 32, 0)]
        print(f"goal at 32 clients: p99 {new['p99']:.2f} s <= 1.5 x one batch {one_batch['batch']:.2f} s = "
              f"{1.5 * one_batch['batch']:.2f} s: {'yes' if new['p99'] <= 1.5 * one_batch['batch'] else 'NO'}; "
              f"throughput {new['rps'] / old['rps']:.2f}x the batch scheduler's (goal 2x): "
              f"{'yes' if new['rps'] >= 2 * old['rps'] else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
