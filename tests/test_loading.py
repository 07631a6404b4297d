"""load_model on a run dir, an import-hf checkpoint dir and an HF dir of the same student."""

from __future__ import annotations

import numpy as np
import pytest

from imitation_jax.errors import CheckpointError
from imitation_jax.cli import main as cli
from imitation_jax.convert.loading import load_model


def logits(loaded, tokens):
    import jax.numpy as jnp

    model = loaded.model()
    return np.asarray(model.logits(model(jnp.asarray(tokens))))


def test_run_ckpt_and_hf_dirs_load_the_same_model(small_overrides, tmp_path):
    from imitation_jax.train.config import load_config
    from imitation_jax.commands.train import run_training as train

    # scan_unroll=1: the compute path the HF and checkpoint dirs load with (defaults), so the
    # logits can be compared bit for bit.
    run = train(load_config("configs/tiny.yaml", small_overrides + ["train.steps=2", "logging.tensorboard=false",
                                                                    "model.scan_unroll=1"]))
    run_dir = run["run_dir"]
    hf, ckpt = tmp_path / "hf", tmp_path / "ckpt"
    assert cli(["export-hf", run_dir, "--out", str(hf), "--dtype", "float32"]) == 0
    assert cli(["import-hf", str(hf), "--out", str(ckpt)]) == 0

    loaded = [load_model(run_dir), load_model(str(ckpt)), load_model(str(hf))]
    tokens = np.random.default_rng(0).integers(0, loaded[0].config.vocab_size, (2, 24))
    ref = logits(loaded[0], tokens)
    for other in loaded[1:]:
        assert other.config.vocab_size == loaded[0].config.vocab_size
        assert other.tokenizer.vocab_size == loaded[0].tokenizer.vocab_size
        assert other.template.name == loaded[0].template.name
        np.testing.assert_array_equal(logits(other, tokens), ref)
    assert "step 2" in loaded[0].source

    # The exported tokenizer + chat_template give exactly the ids we trained on.
    import json

    from transformers import AutoTokenizer

    from imitation_jax.data.formats import Message
    from imitation_jax.data.templates import encode_conversation

    tok = AutoTokenizer.from_pretrained(hf)
    train_file = next(o.split("[", 1)[1].rstrip("]") for o in small_overrides if o.startswith("data.train_files"))
    with open(train_file) as f:
        for line in list(f)[:20]:
            messages = json.loads(line)["messages"]
            ours = encode_conversation(loaded[0].tokenizer, [Message(**m) for m in messages], loaded[0].template)
            assert tok.apply_chat_template(messages, return_dict=True)["input_ids"] == ours.ids.tolist()

    half = load_model(run_dir, dtype="bfloat16")
    assert str(half.params["embed"].dtype) == "bfloat16" and half.config.param_dtype == "bfloat16"
    with pytest.raises(CheckpointError, match="no checkpoint for step 7"):
        load_model(run_dir, step=7)
    with pytest.raises(CheckpointError, match="neither a run dir"):
        load_model(str(tmp_path))
