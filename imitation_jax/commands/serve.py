"""`imitation-jax serve MODEL`: an OpenAI-compatible API for a trained model."""

from __future__ import annotations

import argparse
import os
import sys

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

from imitation_jax.commands import add_model_arguments


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model through an OpenAI-compatible API (chat, completions, streaming, logprobs)",
        description="FastAPI + uvicorn: /v1/chat/completions and /v1/completions (streaming too), "
        "/v1/models, /health. Concurrent requests are decoded together by continuous batching (a "
        "request joins the running batch at its next decode call); a full queue answers 429 with "
        "Retry-After. Binds to localhost unless --host says otherwise.")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("IMITATION_JAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $IMITATION_JAX_API_KEY, if set)")
    p.add_argument("--model-name", default=None, help="name clients ask for (default: MODEL's basename)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a request arriving at an idle server waits for others to join it (default 5)")
    p.add_argument("--scheduler", choices=("continuous", "batch"), default="continuous",
                   help="continuous: requests join and leave the decoding batch between decode calls "
                   "(default); batch: one batch at a time, arrivals wait for it to finish")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting beyond --max-batch before new ones get 429 + Retry-After (default 256)")
    p.add_argument("--warmup", choices=("basic", "full", "none"), default="basic",
                   help="compile before /health reports ready (continuous scheduler): basic = the prefill of "
                   "every prompt bucket and the one-request decode of every cache length (default); full = "
                   "also the decode of every batch bucket; none = every shape at its first use")
    p.add_argument("--max-len", type=int, default=None, help="context limit (default: the model's)")
    p.add_argument("--default-max-tokens", type=int, default=512,
                   help="reply limit of chat requests that give no max_tokens (default 512)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import uvicorn

    from imitation_jax.errors import ConfigError
    from imitation_jax.generate import Generator
    from imitation_jax.convert.loading import load_model
    from imitation_jax.serving.app import create_app

    if args.max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_queue < 1:
        raise ConfigError(f"--max-queue must be >= 1, got {args.max_queue}")
    loaded = load_model(args.model, step=args.step, dtype=args.dtype)
    generator = Generator(loaded, max_batch=args.max_batch, max_len=args.max_len)
    name = args.model_name or os.path.basename(os.path.normpath(args.model))
    app = create_app(generator, name, api_key=args.api_key, max_batch=args.max_batch,
                     batch_wait_ms=args.batch_wait_ms, default_max_tokens=args.default_max_tokens,
                     scheduler=args.scheduler, max_queue=args.max_queue,
                     warmup=args.warmup if args.scheduler == "continuous" else "none")
    if args.host not in LOCAL_HOSTS and not args.api_key:
        print(f"serve: warning: listening on {args.host} without --api-key: anyone who can reach "
              f"this port can use the model", file=sys.stderr)
    print(f"serve: {loaded.source} as '{name}' on http://{args.host}:{args.port}/v1 "
          f"(context {generator.max_len}, {args.scheduler} batching of up to {args.max_batch}, queue "
          f"{args.max_queue}{f', warm-up {args.warmup}' if args.scheduler == 'continuous' else ''})",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
