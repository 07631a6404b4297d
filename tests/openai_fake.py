"""Test helpers: run an ASGI app on a free localhost port in a thread, and a scripted fake of the
OpenAI chat API (answers from a function of the request, random 429/500 failures, delays)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


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


def fake_openai(answer, *, fail_rate: float = 0.0, delay: float = 0.0, seed: int = 0):
    """A FastAPI app answering /v1/chat/completions with `answer(body) -> str`; a `fail_rate`
    share of requests get 429 or 500 instead. `app.state.calls` counts requests, `app.state.bodies`
    keeps the successful ones."""
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
        return {"id": f"chatcmpl-{app.state.calls}", "object": "chat.completion", "created": 0,
                "model": body["model"] + "-0613",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": len(text.split()),
                          "total_tokens": 10 + len(text.split())}}

    return app
