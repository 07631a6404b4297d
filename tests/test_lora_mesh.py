"""LoRA under distillation (train.objective=kd, an in-mesh teacher) with adapter dropout and
gradient accumulation: the same run on this process's devices and on a (2, 2, 2) mesh of 8
simulated devices gives the same losses (the adapters sharded by their layers' rules)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

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


def test_lora_kd_on_eight_devices_equals_one(demo_dir, tmp_path):
    from conftest import small_run_overrides
    from imitation_jax.commands.train import run_training
    from imitation_jax.train.config import load_config

    tokenizer = os.path.join(demo_dir, "tokenizer.model")
    base, teacher = _hf_model(tmp_path / "base", 0, tokenizer), _hf_model(tmp_path / "teacher", 1, tokenizer)
    extra = [f"init.hf={base}", "model.lora.rank=4", "model.lora.dropout=0.1", "model.lora.targets=[q,k,o,up,down]",
             "train.objective=kd", "kd.source=teacher", f"kd.teacher={teacher}", "kd.alpha=0.5", "kd.loss=jsd",
             "train.grad_accum=2", "optim.lr=1e-2", "train.steps=3", "data.seq_len=64", "eval.max_batches=1",
             "model.scan_unroll=1"]

    def overrides(run):
        return [o for o in small_run_overrides(demo_dir, tmp_path / run) if not o.startswith("train.steps=")] + extra

    one = run_training(load_config(TINY, overrides("one")))
    out = subprocess.run([sys.executable, "-m", "imitation_jax.cli", "train", TINY, *overrides("eight"),
                          "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    l1, l8 = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
    assert len(l1) == len(l8) == 3 and l1[-1] < l1[0], (l1, l8)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    assert one["eval"] is not None
