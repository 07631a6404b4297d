"""The chat_template written by export-hf, tokenized by the exported transformers tokenizer, gives
exactly our training ids (and mask) and inference prompts: every built-in template, with and without
turn tokens, on a SentencePiece (dummy prefix) and a byte-level BPE tokenizer.

transformers (its tokenizer.json conversion, its Jinja renderer, its special-token splitting) is the
independent reference here; only the tokenizer files are written by our export code.
"""

from __future__ import annotations

import os

import pytest

from imitation_jax.convert.hf_export import save_tokenizer
from imitation_jax.data.formats import Message
from imitation_jax.data.templates import TEMPLATES, encode_conversation, encode_prompt, get_template
from imitation_jax.data.tokenizer import load_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SYSTEM = {"role": "system", "content": "You are terse.  Answer in one line."}
# Spaces where segments meet, a newline-led reply, an empty turn. (Not a message ending in a space
# before more text: with SentencePiece, training encodes that space as a token of its own, which no
# text makes the whole-text tokenizer produce, as it merges it with the next word's "▁".)
EDGE = [
    {"role": "user", "content": " leading  and inner  spaces"},
    {"role": "assistant", "content": "\nstarts on a new line"},
    {"role": "user", "content": ""},
    {"role": "assistant", "content": "ok."},
]


def chats(demo_conversations) -> list[list[dict]]:
    """Multi-turn demo chats (some with a system prompt), the same with one added, and edge cases."""
    demo = [c["messages"] for c in demo_conversations[:12]]
    with_system = [[SYSTEM] + m for m in demo[:4] if m[0]["role"] != "system"]
    return demo + with_system + [EDGE, [SYSTEM] + EDGE]


def exported(tokenizer, name: str, turn_tokens: bool, out):
    """Our tokenizer (plus the template's special tokens, as prepare adds them) and the transformers
    tokenizer that export-hf writes for it, loaded back from disk."""
    from transformers import AutoTokenizer

    ours = load_tokenizer(tokenizer.path)
    template = get_template(name, turn_tokens=turn_tokens)
    ours.add_special_tokens(template.special_tokens)
    save_tokenizer(ours, template, str(out))
    return ours, template, AutoTokenizer.from_pretrained(str(out), local_files_only=True)


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
@pytest.mark.parametrize("turn_tokens", [False, True], ids=["plain", "turn_tokens"])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_exported_chat_template_gives_training_ids(name, turn_tokens, kind, tiny_tokenizer, bpe_tokenizer,
                                                   demo_conversations, tmp_path):
    base = tiny_tokenizer if kind == "sentencepiece" else bpe_tokenizer
    tok, template, hf = exported(base, name, turn_tokens, tmp_path / "hf")
    for messages in chats(demo_conversations):
        ex = encode_conversation(tok, [Message(**m) for m in messages], template)
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
        assert out["input_ids"] == ex.ids.tolist(), hf.convert_ids_to_tokens(out["input_ids"])
        assert out["assistant_masks"] == ex.loss_mask.astype(int).tolist()
        text = hf.apply_chat_template(messages, tokenize=False)
        assert hf(text, add_special_tokens=False)["input_ids"] == ex.ids.tolist()
        for k, m in enumerate(messages):  # the prompt before each reply: our inference prompt
            if m["role"] == "assistant":
                prompt = hf.apply_chat_template(messages[:k], tokenize=True, return_dict=True,
                                                add_generation_prompt=True)["input_ids"]
                assert prompt == encode_prompt(tok, [Message(**x) for x in messages[:k]], template).tolist()


def test_import_recognises_exported_templates(tiny_tokenizer, bpe_tokenizer, tmp_path):
    """import-hf maps an exported chat_template back to its built-in template, for either kind."""
    from imitation_jax.convert.hf_import import template_of

    for base in (tiny_tokenizer, bpe_tokenizer):
        for turn_tokens in (False, True):
            _, _, hf = exported(base, "chatml", turn_tokens, tmp_path / f"{base.kind}{turn_tokens}")
            assert template_of(type("T", (), {"hf": hf})()) == ("chatml", turn_tokens)
