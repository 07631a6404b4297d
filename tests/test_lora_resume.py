"""A LoRA run resumed from a mid-run checkpoint (what a kill after step 2's checkpoint leaves: the
later checkpoints and metrics gone) ends with the same adapters and optimizer state, bit for bit,
as the uninterrupted run (adapter dropout and gradient accumulation on); its checkpoints hold
adapters, optimizer state and the base's identity only, and a changed base is a one-line
CheckpointError on resume. (Kills at random moments, torn writes included, are
tests/test_checkpoint.py's: the same Checkpointer.)"""

from __future__ import annotations

import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _hf_base(path, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                                 max_position_embeddings=256)).save_pretrained(path)


def _item(step_dir, name):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(step_dir, name))


def test_resume_is_bit_identical_and_a_changed_base_is_refused(demo_dir, tmp_path):
    import jax

    from conftest import small_run_overrides
    from imitation_jax.commands.train import run_training
    from imitation_jax.errors import CheckpointError
    from imitation_jax.train.config import load_config

    base = tmp_path / "base"
    _hf_base(base)
    extra = [f"init.hf={base}", "model.lora.rank=4", "model.lora.dropout=0.1", "train.grad_accum=2",
             "optim.lr=1e-2", "train.steps=4", "checkpoint.every_steps=1", "data.seq_len=64", "eval.max_batches=1",
             "checkpoint.async_save=false"]

    def overrides(run):
        return [o for o in small_run_overrides(demo_dir, tmp_path / run) if not o.startswith("train.steps=")] + extra

    run_training(load_config(TINY, overrides("ref")))

    shutil.copytree(tmp_path / "ref", tmp_path / "killed")
    killed = tmp_path / "killed" / "checkpoints"
    for step in ("3", "4"):
        shutil.rmtree(killed / step)
    summary = run_training(load_config(TINY, overrides("killed")))
    assert summary["start_step"] == 2

    ref, got = tmp_path / "ref" / "checkpoints" / "4", killed / "4"
    assert sorted(os.listdir(got)) == sorted(os.listdir(ref))
    for item in ("params", "opt_state"):
        a, b = _item(ref, item), _item(got, item)
        assert jax.tree.structure(a) == jax.tree.structure(b)
        jax.tree.map(np.testing.assert_array_equal, a, b)
    # Adapters only: no base weight in the checkpoint.
    names = {k for layer in _item(got, "params")["layers"].values() for k in layer}
    assert names and all(n.endswith(("_lora_a", "_lora_b")) for n in names), names

    _hf_base(base, seed=1)  # the base changes under the run
    with pytest.raises(CheckpointError, match="the base changed") as err:
        run_training(load_config(TINY, overrides("killed") + ["train.steps=5"]))
    assert "\n" not in str(err.value)
