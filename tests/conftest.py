"""Shared fixtures: synthetic conversations and a tiny SentencePiece tokenizer trained on them."""

from __future__ import annotations

import pytest

from imitation_jax.data.synthetic import generate_conversations, train_tokenizer
from imitation_jax.data.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="session")
def demo_conversations() -> list[dict]:
    """200 synthetic teacher conversations in OpenAI-messages form."""
    return generate_conversations(200, seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, demo_conversations) -> Tokenizer:
    """A 512-piece LLaMA-like SentencePiece BPE model (bos=1, eos=2, pad=3), trained in ~0.1 s."""
    texts = [m["content"] for c in demo_conversations for m in c["messages"]]
    texts += ["BEGINNING OF CONVERSATION: USER: GPT:"] * 10  # so the template markers are pieces
    path = train_tokenizer(texts, tmp_path_factory.mktemp("tokenizer") / "tiny", vocab_size=512)
    return load_tokenizer(path)
