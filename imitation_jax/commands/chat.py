"""`imitation-jax chat MODEL`: a terminal chat with a model in its own chat template.

The history is kept and sent whole each turn (the oldest exchanges are dropped when it no longer
fits the context); replies are printed as they are generated. /reset starts over, /exit (or
Ctrl-D) leaves.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, TextIO

from imitation_jax.commands import add_model_arguments


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal (run dir, checkpoint or HF dir)",
                       description=__doc__.split("\n\n")[1])
    add_model_arguments(p)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=0.9, help="1: off")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from imitation_jax.errors import ConfigError
    from imitation_jax.generate import Generator, SamplingParams
    from imitation_jax.convert.loading import load_model

    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    loaded = load_model(args.model, step=args.step, dtype=args.dtype)
    print(f"{loaded.source} -- /reset starts over, /exit leaves", file=sys.stderr)
    repl(Generator(loaded, max_batch=1), params, args.system)
    return 0


def repl(gen, params, system: str | None = None, read: Callable[[str], str] | None = None,
         out: TextIO | None = None) -> list[dict]:
    """The chat loop (reading with `input`, writing to stdout by default); returns the history."""
    import dataclasses

    read = read or input
    out = out or sys.stdout

    from imitation_jax.generate import PromptTooLong

    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    turn = 0
    while True:
        try:
            line = read("you> ")
        except EOFError:
            out.write("\n")
            return history
        text = line.strip()
        if text in ("/exit", "/quit"):
            return history
        if text == "/reset":
            history = list(start)
            out.write("(history cleared)\n")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        turn += 1
        while True:
            prompt = gen.encode_chat(history)
            # Drop the oldest exchange while the prompt leaves less than a quarter of the reply room.
            room = gen.max_len - len(prompt)
            if room >= min(params.max_new_tokens, gen.max_len // 4) or len(history) <= len(start) + 1:
                break
            history = start + history[len(start) + 2:]
            out.write("(oldest exchange dropped to fit the context)\n")
        out.write("model> ")
        out.flush()
        step_params = dataclasses.replace(params, seed=params.seed + turn)
        try:
            [reply] = gen.generate([prompt], step_params, on_text=lambda _, delta: (out.write(delta), out.flush()))
        except PromptTooLong:
            history.pop()
            out.write("(that message alone is longer than the context; not sent)\n")
            continue
        out.write("\n")
        history.append({"role": "assistant", "content": reply.text})
