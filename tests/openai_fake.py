"""Test helpers: run an ASGI app on a free localhost port in a thread, and a scripted fake of the
OpenAI chat API (answers from a function of the request, random 429/500 failures, delays, and
OpenAI-shaped logprobs from a deterministic toy distribution)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response


@contextlib.contextmanager
def serve_in_thread(app):
    """Yields the base URL (http://127.0.0.1:PORT) of `app` served by uvicorn in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # log_config=None: uvicorn's default logging.config.dictConfig shuts down every existing
    # handler, and absl's handler then closes the stream it holds (pytest's captured stderr).
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", log_config=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def toy_logprobs(text: str, k: int, chunk: int = 3) -> list[dict]:
    """OpenAI-shaped `choices[0].logprobs.content` for `text`. Tokens are runs of `chunk` UTF-8
    bytes; one that splits a character is named `bytes:\\xNN...` (as OpenAI names such tokens) and
    only its `bytes` are exact. Every other whole token leaves `bytes` out (null), as some servers
    do. At each position the distribution is a softmax over the sampled token and k + 1 made-up
    ones, logits drawn from a generator seeded by the position and the bytes; `top_logprobs` is its
    k most probable entries, so the sampled token is sometimes not among them."""
    data = text.encode("utf-8")
    out = []
    for n, pos in enumerate(range(0, len(data), chunk)):
        piece = data[pos:pos + chunk]
        try:
            token, whole = piece.decode("utf-8"), True
        except UnicodeDecodeError:
            token, whole = "bytes:" + "".join(f"\\x{b:02x}" for b in piece), False
        names = [token] + [f" alt{pos}_{j}é" for j in range(k + 1)]
        raw = [list(piece)] + [list(name.encode("utf-8")) for name in names[1:]]
        rng = random.Random(f"{pos}:{piece.hex()}")
        logits = [rng.gauss(0.0, 2.0) for _ in names]
        logits[0] += 2.0  # the sampled token is usually, not always, the most probable
        top = max(logits)
        lse = top + math.log(sum(math.exp(x - top) for x in logits))
        logprobs = [x - lse for x in logits]
        best = sorted(range(len(names)), key=lambda i: -logprobs[i])[:k]
        out.append({"token": token, "bytes": None if whole and n % 2 else list(piece),
                    "logprob": logprobs[0],
                    "top_logprobs": [{"token": names[i], "bytes": raw[i], "logprob": logprobs[i]}
                                     for i in best]})
    return out


def fake_openai(answer, *, fail_rate: float = 0.0, delay: float = 0.0, seed: int = 0,
                logprobs=None):
    """A FastAPI app answering /v1/chat/completions with `answer(body) -> str`; a `fail_rate`
    share of requests get 429 or 500 instead. `app.state.calls` counts requests, `app.state.bodies`
    keeps the successful ones. A request with `logprobs: true` gets `toy_logprobs(answer,
    top_logprobs)`, passed through `logprobs(body, content) -> content or None` when given (to
    corrupt them; None leaves them out). Responses are serialised with NaN allowed."""
    app = FastAPI()
    rng = random.Random(seed)
    app.state.calls = 0
    app.state.bodies = []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.calls += 1
        if delay:
            await asyncio.sleep(delay)
        if rng.random() < fail_rate:
            code = rng.choice([429, 500])
            return JSONResponse({"error": {"message": "scripted failure", "type": "server_error",
                                           "param": None, "code": None}}, status_code=code,
                                headers={"retry-after-ms": "10"})
        app.state.bodies.append(body)
        text = answer(body)
        choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        if body.get("logprobs"):
            content = toy_logprobs(text, body.get("top_logprobs") or 0)
            if logprobs is not None:
                content = logprobs(body, content)
            choice["logprobs"] = None if content is None else {"content": content, "refusal": None}
        payload = {"id": f"chatcmpl-{app.state.calls}", "object": "chat.completion", "created": 0,
                   "model": body["model"] + "-0613", "choices": [choice],
                   "usage": {"prompt_tokens": 10, "completion_tokens": len(text.split()),
                             "total_tokens": 10 + len(text.split())}}
        return Response(json.dumps(payload, ensure_ascii=False), media_type="application/json")

    return app
