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
        "/v1/models, /health. Concurrent requests are decoded together in batches. Binds to "
        "localhost unless --host says otherwise.")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("IMITATION_JAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $IMITATION_JAX_API_KEY, if set)")
    p.add_argument("--model-name", default=None, help="name clients ask for (default: MODEL's basename)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a lone request waits for others to join its batch (default 5)")
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
    loaded = load_model(args.model, step=args.step, dtype=args.dtype)
    generator = Generator(loaded, max_batch=args.max_batch, max_len=args.max_len)
    name = args.model_name or os.path.basename(os.path.normpath(args.model))
    app = create_app(generator, name, api_key=args.api_key, max_batch=args.max_batch,
                     batch_wait_ms=args.batch_wait_ms, default_max_tokens=args.default_max_tokens)
    if args.host not in LOCAL_HOSTS and not args.api_key:
        print(f"serve: warning: listening on {args.host} without --api-key: anyone who can reach "
              f"this port can use the model", file=sys.stderr)
    print(f"serve: {loaded.source} as '{name}' on http://{args.host}:{args.port}/v1 "
          f"(context {generator.max_len}, batches of up to {args.max_batch})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
