"""LoRA under distillation (train.objective=kd, an in-mesh teacher) with adapter dropout: the same
run on one device and on a (2, 2, 2) mesh spread over 2 processes x 4 simulated devices
(launch/local.sh; each process loads the base and teacher itself and its own rows) gives the same
losses, the adapters sharded by their layers' rules. (Accumulation is test_lora_step's: with
grad_accum > 1 each process's micro-batches hold other rows than one device's, docs/train.md.)"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _hf_model(path, seed, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                                 max_position_embeddings=256)).save_pretrained(path)
    shutil.copy(tokenizer, os.path.join(path, "tokenizer.model"))  # the teacher is loaded with its tokenizer
    return str(path)


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_lora_kd_over_two_processes_equals_one_device(demo_dir, tmp_path):
    from conftest import run_two_processes, small_run_overrides
    from imitation_jax.commands.train import run_training
    from imitation_jax.train.config import load_config

    tokenizer = os.path.join(demo_dir, "tokenizer.model")
    base, teacher = _hf_model(tmp_path / "base", 0, tokenizer), _hf_model(tmp_path / "teacher", 1, tokenizer)
    extra = [f"init.hf={base}", "model.lora.rank=4", "model.lora.dropout=0.1", "model.lora.targets=[q,k,o,up,down]",
             "train.objective=kd", "kd.source=teacher", f"kd.teacher={teacher}", "kd.alpha=0.5", "kd.loss=jsd",
             "optim.lr=1e-2", "train.steps=3", "data.seq_len=64", "eval.max_batches=1", "model.scan_unroll=1"]

    def overrides(run):
        return [o for o in small_run_overrides(demo_dir, tmp_path / run) if not o.startswith("train.steps=")] + extra

    one = run_training(load_config(TINY, overrides("one")))
    out = run_two_processes([*overrides("two_procs"), "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], tmp_path / "logs")
    assert out.returncode == 0, out.stderr[-3000:]
    l1, l2x4 = _losses(tmp_path / "one"), _losses(tmp_path / "two_procs")
    assert len(l1) == len(l2x4) == 3 and l1[-1] < l1[0], (l1, l2x4)
    np.testing.assert_allclose(l2x4, l1, rtol=1e-5)
    assert one["eval"] is not None
