"""Shared fixtures: synthetic conversations and a tiny SentencePiece tokenizer trained on them."""

from __future__ import annotations

import jax
import pytest

# fp32 references (transformers on the CPU, numpy) are compared at fp32 tolerances; on a GPU XLA's
# default fp32 matmul is TF32 (10-bit mantissa), so ask for full fp32 there. No effect on the CPU.
jax.config.update("jax_default_matmul_precision", "highest")

from imitation_jax.data.tokenizer import train_sentencepiece
from imitation_jax.demo.synthetic import generate_conversations
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
    path = train_sentencepiece(texts, tmp_path_factory.mktemp("tokenizer") / "tiny", vocab_size=512)
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


@pytest.fixture(scope="session", autouse=True)
def _prepared_data_cache(tmp_path_factory):
    """Raw training files are prepared into a cache: keep it in the test session's temp dir (one
    directory shared by the xdist workers; a lock serialises them)."""
    import os

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    old = os.environ.get("IMITATION_JAX_CACHE")
    os.environ["IMITATION_JAX_CACHE"] = str(root / "prepared-cache")
    yield
    if old is None:
        os.environ.pop("IMITATION_JAX_CACHE", None)
    else:
        os.environ["IMITATION_JAX_CACHE"] = old


BPE_SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>"]


def build_bpe_tokenizer(directory, texts, chat_template: str | None = None, vocab_size: int = 600) -> str:
    """A byte-level BPE tokenizer.json (LLaMA-3/GPT-2 style: no dummy prefix) with the special tokens
    of the built-in templates, saved as a Hugging Face tokenizer directory."""
    import json
    import os

    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bpe = HFTok(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=BPE_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(directory, exist_ok=True)
    bpe.save(os.path.join(directory, "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory, demo_conversations) -> Tokenizer:
    """A 600-id byte-level BPE tokenizer (tokenizer.json) loaded through transformers."""
    texts = [m["content"] for c in demo_conversations[:100] for m in c["messages"]]
    texts += ["BEGINNING OF CONVERSATION: USER: GPT: ASSISTANT: [INST] [/INST] <<SYS>> system user assistant"] * 10
    return load_tokenizer(build_bpe_tokenizer(tmp_path_factory.mktemp("bpe"), texts))


# A model small enough that a few training steps compile and run in seconds on 2 cores.
SMALL_MODEL = ["model.hidden_size=64", "model.intermediate_size=160", "model.num_layers=2", "model.num_heads=4",
               "model.num_kv_heads=2"]


@pytest.fixture
def small_overrides(demo_dir, tmp_path) -> list[str]:
    """Overrides of configs/tiny.yaml for a fast run on the small demo data, into tmp_path/run."""
    return small_run_overrides(demo_dir, tmp_path / "run")


def small_run_overrides(demo_dir: str, run_dir) -> list[str]:
    """`small_overrides` for any run dir, for fixtures wider than one test (same list)."""
    return SMALL_MODEL + [
        f"run_dir={run_dir}", f"data.train_files=[{demo_dir}/train.jsonl]",
        f"data.eval_files=[{demo_dir}/eval.jsonl]", f"data.tokenizer={demo_dir}/tokenizer.model",
        "data.seq_len=128", "train.batch_size=8", "train.steps=5", "train.log_every=1", "train.peak_flops=1e12",
        "optim.warmup_steps=2", "eval.every_steps=0", "eval.max_batches=2", "logging.progress=false",
    ]


def run_two_processes(overrides: list[str], log_dir, timeout: int = 600):
    """`launch/local.sh 2 configs/tiny.yaml OVERRIDES` from the repository root: 2 cooperating
    processes x 4 simulated devices, this interpreter's CLI; the other process's logs in log_dir."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, IMITATION_JAX=f"{sys.executable} -m imitation_jax.cli", LOG_DIR=str(log_dir))
    return subprocess.run(["bash", os.path.join(root, "launch", "local.sh"), "2",
                           os.path.join(root, "configs", "tiny.yaml"), *overrides],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=root)


@pytest.fixture(scope="session")
def kd_teacher(demo_dir, tmp_path_factory) -> str:
    """Run dir of a distillation teacher trained once per session (test_kd_train's `teacher_run`:
    the small model, 8 steps at lr 3e-3). Shared: copy it before changing it."""
    from imitation_jax.commands.train import run_training
    from imitation_jax.train.config import load_config

    run_dir = tmp_path_factory.mktemp("kd_teacher") / "teacher"
    cfg = load_config("configs/tiny.yaml", small_run_overrides(demo_dir, run_dir) + [
        "train.steps=8", "optim.lr=3e-3", "logging.tensorboard=false"])
    return run_training(cfg)["run_dir"]


# The longest tests start first: with `pytest -n 2` a minutes-long test collected late (the smoke
# study is near the end of the alphabet) would run alone while the other worker idles.
RUN_FIRST = ("tests/test_study.py::test_smoke_study_runs_resumes_and_recomputes_one_student",
             "tests/test_train.py::test_sharded_and_multiprocess_runs_equal_single_device",
             "tests/test_checkpoint.py::test_sigkill_at_random_moments_then_resume_is_bit_identical")


def pytest_collection_modifyitems(config, items):
    first = {name: i for i, name in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: first.get(item.nodeid, len(first)))  # stable: the rest keep their order
