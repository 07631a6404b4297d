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


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> str:
    """A small copy of the demo data set (train/eval JSONL + 512-piece tokenizer) made by the tool."""
    import importlib.util
    import pathlib

    spec = importlib.util.spec_from_file_location(
        "make_demo_data", pathlib.Path(__file__).parent.parent / "tools" / "make_demo_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = str(tmp_path_factory.mktemp("demo"))
    assert tool.main(["--out", out, "--num-conversations", "600", "--vocab-size", "512", "--eval-fraction", "0.1"]) == 0
    return out


# A model small enough that a few training steps compile and run in seconds on 2 cores.
SMALL_MODEL = ["model.hidden_size=64", "model.intermediate_size=160", "model.num_layers=2", "model.num_heads=4",
               "model.num_kv_heads=2"]


@pytest.fixture
def small_overrides(demo_dir, tmp_path) -> list[str]:
    """Overrides of configs/tiny.yaml for a fast run on the small demo data, into tmp_path/run."""
    return SMALL_MODEL + [
        f"run_dir={tmp_path / 'run'}", f"data.train_files=[{demo_dir}/train.jsonl]",
        f"data.eval_files=[{demo_dir}/eval.jsonl]", f"data.tokenizer={demo_dir}/tokenizer.model",
        "data.seq_len=128", "train.batch_size=8", "train.steps=5", "train.log_every=1", "train.peak_flops=1e12",
        "optim.warmup_steps=2", "eval.every_steps=0", "eval.max_batches=2", "logging.progress=false",
    ]
