"""`imitation-jax generate MODEL --prompt TEXT | --prompts FILE --out OUT.jsonl`: batched generation
with a run dir, params checkpoint or HF dir.

Prompts: JSONL records `{"id", "prompt"}` (the Koala test set's form) or `{"id", "messages"}`,
or a text file with one prompt per line. Records with messages are always rendered with the
model's chat template; `--chat` renders plain prompts as a user turn too (else they are continued
as raw text after BOS). Each output line is an "answer" in OpenAI-messages form, as `judge` and
`prepare` read them:

    {"id", "messages": [..., {"role": "assistant", "content": COMPLETION}], "prompt", "completion",
     "finish_reason", "prompt_tokens", "completion_tokens", "model", "params"}
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from imitation_jax.commands import add_model_arguments


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate completions with a model (run dir, checkpoint or HF dir)",
                       description=__doc__.split("\n\n")[1])
    add_model_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", metavar="FILE", help="JSONL ({id, prompt} or {id, messages}) or one prompt a line")
    p.add_argument("--out", required=True, help="output JSONL (replaced)")
    p.add_argument("--chat", action="store_true", help="render plain prompts as a user turn of the chat template")
    p.add_argument("--system", default=None, help="system message for chat prompts that have none")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    p.set_defaults(func=run)


def read_requests(args) -> list[dict]:
    """[{"id", "prompt" (str or None), "messages" (list or None)}] from --prompt / --prompts."""
    from imitation_jax.collect.collect import read_prompts

    if args.prompt is not None:
        texts = [("prompt-0", args.prompt)]
    else:
        path = args.prompts
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--prompts {path}: no such file")
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
        if lines and lines[0].lstrip().startswith("{"):
            out = []
            # read_prompts checks the records (and gives ids); whether a record had messages of
            # its own decides chat vs raw text without --chat.
            records = read_prompts(path, args.system)
            has_messages = ["messages" in json.loads(line) for line in lines]
            for p, chat in zip(records, has_messages, strict=True):
                plain = not (chat or args.chat)
                out.append({"id": p.id, "prompt": p.messages[-1]["content"] if plain else None,
                            "messages": None if plain else list(p.messages)})
            return out
        texts = [(f"{path}:{i}", line) for i, line in enumerate(lines, 1)]
    if not args.chat:
        return [{"id": i, "prompt": t, "messages": None} for i, t in texts]
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [{"id": i, "prompt": t, "messages": system + [{"role": "user", "content": t}]} for i, t in texts]


def run(args: argparse.Namespace) -> int:
    from imitation_jax.errors import ConfigError
    from imitation_jax.generate import Generator, PromptTooLong, SamplingParams
    from imitation_jax.convert.loading import load_model

    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, stop=list(args.stop), seed=args.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch {args.max_batch}: must be at least 1")
    requests = read_requests(args)
    loaded = load_model(args.model, step=args.step, dtype=args.dtype)
    gen = Generator(loaded, max_batch=args.max_batch)
    tok = loaded.tokenizer
    prompts = []
    for r in requests:
        if r["messages"] is not None:
            prompts.append(gen.encode_chat(r["messages"]))
        else:
            prompts.append(([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(r["prompt"]))
    record_params = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                     "top_k": params.top_k, "top_p": params.top_p, "stop": params.stop, "seed": params.seed}
    chunk = args.max_batch * 8  # written as they finish, so a long file shows progress
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    generated = 0
    with open(args.out, "w", encoding="utf-8") as f:
        for lo in range(0, len(requests), chunk):
            try:
                completions = gen.generate(prompts[lo:lo + chunk], params)
            except PromptTooLong as exc:
                raise ConfigError(f"{exc} (request ids from {requests[lo]['id']!r})") from None
            for r, c in zip(requests[lo:lo + chunk], completions):
                asked = r["messages"] if r["messages"] is not None else [{"role": "user", "content": r["prompt"]}]
                record = {"id": r["id"], "messages": [*asked, {"role": "assistant", "content": c.text}],
                          "prompt": r["prompt"], "completion": c.text, "finish_reason": c.finish_reason,
                          "prompt_tokens": c.prompt_tokens, "completion_tokens": len(c.tokens),
                          "model": loaded.source, "params": record_params}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                generated += len(c.tokens)
            f.flush()
            print(f"generate: {min(lo + chunk, len(requests))}/{len(requests)} requests", file=sys.stderr)
    print(f"wrote {len(requests)} completions ({generated} tokens) to {args.out}")
    return 0
