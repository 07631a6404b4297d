"""Load an exported HF dir with transformers and print a greedy continuation of a chat prompt;
with --run, also our own model's continuation of the same prompt ids, and whether they agree; with
--adapter, the HF dir is a base and a PEFT adapter is loaded onto it (peft.PeftModel).

    python tools/hf_greedy.py runs/demo/hf --run runs/demo
    python tools/hf_greedy.py runs/demo/hf --adapter runs/demo-lora/adapter --run runs/demo-lora
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir")
    p.add_argument("--run", help="run dir (or checkpoint) the export came from: compare with our model")
    p.add_argument("--adapter", help="a PEFT adapter dir to load onto HF_DIR (its base)")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--max-new-tokens", type=int, default=24)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.adapter or args.hf_dir)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).eval()
    messages = [{"role": "user", "content": args.prompt}]
    print(f"chat_template prompt: {tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)!r}")
    if args.run:  # the exact ids our template gives (SentencePiece and HF may split a text differently)
        from imitation_jax.data.formats import Message
        from imitation_jax.data.templates import encode_prompt
        from imitation_jax.convert.loading import load_model

        loaded = load_model(args.run)
        prompt = encode_prompt(loaded.tokenizer, [Message(**m) for m in messages], loaded.template).tolist()
    else:
        prompt = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    print(f"transformers greedy: {tok.decode(out, skip_special_tokens=True)!r}")
    if not args.run:
        return 0
    import jax.numpy as jnp
    import numpy as np

    ours, ids = loaded.model(), list(prompt)
    stops = set(np.atleast_1d(model.generation_config.eos_token_id).tolist())
    total = len(prompt) + len(out)  # padded to one length: one compilation (the model is causal)
    for _ in range(len(out)):
        padded = jnp.asarray([ids + [0] * (total - len(ids))])
        ids.append(int(jnp.argmax(ours.logits(ours(padded))[0, len(ids) - 1])))
        if ids[-1] in stops:
            break
    same = ids[len(prompt):] == out
    print(f"imitation_jax greedy: {loaded.tokenizer.decode(ids[len(prompt):])!r}")
    print(f"same continuation: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
