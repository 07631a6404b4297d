"""Training: the masked loss against numpy, gradient accumulation against one large batch, the
optimizer's decay mask and schedule, and whole runs through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import run_two_processes
from imitation_jax.train.config import load_config
from imitation_jax.errors import ConfigError
from imitation_jax.data.build import build_rows
from imitation_jax.data.tokenizer import load_tokenizer
from imitation_jax.model import Llama, ModelConfig
from imitation_jax.sharding import MeshConfig, make_mesh
from imitation_jax.train.loss import masked_cross_entropy
from imitation_jax.train.optimizer import decay_mask, learning_rate_schedule, make_optimizer
from imitation_jax.train.state import init_opt_state, shardings_of, step_scalar
from imitation_jax.model.params import init_params, model_graph
from imitation_jax.train.step import accum_batch_sharding, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SMALL = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                    num_kv_heads=2)


def _rows(demo_dir, n=16, seq_len=128):
    tok = load_tokenizer(f"{demo_dir}/tokenizer.model")
    rows = build_rows([f"{demo_dir}/train.jsonl"], tok, "koala", seq_len)
    return {k: getattr(rows, k)[:n] for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}


def _numpy_loss(logits, targets, mask):
    logits = logits.astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    correct = (logits.argmax(-1) == targets)
    return (nll * mask).sum() / mask.sum(), (correct * mask).sum() / mask.sum()


@pytest.mark.parametrize("chunk", [0, 32])
def test_masked_loss_equals_numpy(demo_dir, chunk):
    batch = _rows(demo_dir, n=4)
    model = Llama(SMALL, rngs=nnx.Rngs(0))
    hidden = model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"]))
    logits = np.asarray(model.logits(hidden))
    loss, correct, tokens = masked_cross_entropy(hidden, model.output_kernel(), jnp.asarray(batch["targets"]),
                                                 jnp.asarray(batch["loss_mask"]), chunk)
    ref_loss, ref_acc = _numpy_loss(logits, batch["targets"], batch["loss_mask"])
    assert tokens == batch["loss_mask"].sum() > 0
    np.testing.assert_allclose(loss / tokens, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(correct / tokens, ref_acc, rtol=1e-6)
    # Only trained tokens count: corrupting an untrained target changes nothing.
    targets = batch["targets"].copy()
    untrained = np.argwhere(batch["loss_mask"] == 0)[0]
    targets[tuple(untrained)] = (targets[tuple(untrained)] + 1) % SMALL.vocab_size
    loss2, _, _ = masked_cross_entropy(hidden, model.output_kernel(), jnp.asarray(targets),
                                       jnp.asarray(batch["loss_mask"]), chunk)
    assert float(loss2) == float(loss)


def _one_step(batch, grad_accum):
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    optimizer, _ = make_optimizer(load_config(None, ["run_dir=x", "data.tokenizer=x", "data.train_files=[x]",
                                                     "train.steps=1"]).optim, 10)
    graphdef = model_graph(SMALL)[0]
    with jax.set_mesh(mesh):
        params = init_params(SMALL, mesh, seed=0)
        state = {"params": params, "opt_state": init_opt_state(optimizer, params, mesh), "step": step_scalar(0, mesh)}
        step = make_train_step(graphdef, optimizer, mesh, shardings_of(state))
        shaped = {k: jax.device_put(v.reshape(grad_accum, -1, v.shape[-1]), accum_batch_sharding(mesh))
                  for k, v in batch.items()}
        state, metrics = step(state, shaped)
    return jax.device_get(state["params"]), jax.device_get(metrics)


def test_grad_accumulation_equals_large_batch(demo_dir):
    batch = _rows(demo_dir, n=8)
    # Micro-batches with different numbers of trained tokens: per-micro-batch means would differ.
    assert batch["loss_mask"][:2].sum() != batch["loss_mask"][2:4].sum()
    params1, m1 = _one_step(batch, 1)
    params4, m4 = _one_step(batch, 4)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
    assert m4["loss_tokens"] == m1["loss_tokens"] == batch["loss_mask"].sum()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params1, params4)


def test_decay_mask_skips_norms_and_embeddings():
    _, shapes, _ = model_graph(SMALL)
    mask = decay_mask(shapes)
    assert mask["embed"] is False and mask["norm"]["weight"] is False
    assert mask["layers"]["attn_norm"]["weight"] is False and mask["layers"]["mlp_norm"]["weight"] is False
    assert mask["layers"]["attn"]["q"] is True and mask["layers"]["mlp"]["down"] is True and mask["lm_head"] is True


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_schedule_warms_up_then_decays_to_end_ratio(kind):
    cfg = load_config(None, ["run_dir=x", "data.tokenizer=x", "data.train_files=[x]", "train.steps=1",
                             "optim.lr=1.0", "optim.warmup_steps=10", "optim.end_lr_ratio=0.1",
                             f"optim.schedule={kind}"]).optim
    sched = learning_rate_schedule(cfg, 110)
    assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0)
    assert float(sched(110)) == pytest.approx(0.1, abs=1e-6)
    mid = float(sched(60))
    assert mid == pytest.approx(0.55, abs=1e-6)  # both schedules pass the midpoint at (1 + 0.1) / 2
    assert all(float(sched(s)) >= float(sched(s + 1)) for s in range(10, 110))


def _cli(args, env_extra=None, timeout=600):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "imitation_jax.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_cli_train_writes_run_dir_and_restarts_from_checkpoint(small_overrides, tmp_path):
    out = _cli(["train", TINY, *small_overrides])
    assert out.returncode == 0, out.stderr
    run = tmp_path / "run"
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5]
    for key in ("step", "loss", "accuracy", "lr", "grad_norm", "loss_tokens", "tokens_per_s", "mfu"):
        assert all(key in r for r in train_records), key
    assert any("eval_loss" in r for r in records)
    assert (run / "config.yaml").exists() and (run / "checkpoints" / "5").is_dir()
    assert load_config(str(run / "config.yaml"), []).model.num_layers == 2  # the resolved config reloads
    assert "first loss" in out.stdout and "checkpoint" in out.stdout

    # init.checkpoint: a new run starting from the trained params starts where the first ended.
    again = [o if not o.startswith("run_dir=") else f"run_dir={tmp_path / 'run2'}" for o in small_overrides]
    out2 = _cli(["train", TINY, *again, f"init.checkpoint={run}", "train.steps=1"])
    assert out2.returncode == 0, out2.stderr
    assert _losses(tmp_path / "run2")[0] < _losses(run)[0] - 0.2  # fresh init: ~ln(512) = 6.24


def test_sharded_and_multiprocess_runs_equal_single_device(small_overrides, tmp_path):
    """The same 5 steps on 1 device and on a (2, 2, 2) mesh spread over 2 processes x 4 simulated
    devices (launch/local.sh: each process loads its own rows). The same mesh in one process is
    checked by test_kd_train and test_on_policy (whole runs) and test_kd_modes (the step)."""
    def at(name):
        return [o if not o.startswith("run_dir=") else f"run_dir={tmp_path / name}" for o in small_overrides]

    r1 = _cli(["train", TINY, *at("one")], {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert r1.returncode == 0, r1.stderr
    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    r2x4 = run_two_processes([*at("two_procs"), *mesh], tmp_path / "logs")
    assert r2x4.returncode == 0, r2x4.stderr[-3000:]
    l1, l2x4 = (_losses(tmp_path / n) for n in ("one", "two_procs"))
    assert len(l1) == len(l2x4) == 5 and l1[-1] < l1[0]
    np.testing.assert_allclose(l2x4, l1, rtol=1e-5)
    assert (tmp_path / "two_procs" / "checkpoints" / "5").is_dir()


SHARDING_PROBE = r"""
import jax
from jax.sharding import PartitionSpec as P
from imitation_jax.model import ModelConfig
from imitation_jax.sharding import MeshConfig, make_mesh
from imitation_jax.train.optimizer import make_optimizer
from imitation_jax.train.optimizer import OptimConfig
from imitation_jax.train.state import init_opt_state
from imitation_jax.model.params import init_params
cfg = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2)
mesh = make_mesh(MeshConfig(2, 2, 2))
with jax.set_mesh(mesh):
    params = init_params(cfg, mesh, 0)
    opt = init_opt_state(make_optimizer(OptimConfig(), 10)[0], params, mesh)
spec = lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
expect = {
    ("embed",): ("tensor", "fsdp"), ("lm_head",): ("fsdp", "tensor"), ("norm", "weight"): (None,),
    ("layers", "attn", "q"): (None, "fsdp", "tensor", None), ("layers", "attn", "k"): (None, "fsdp", "tensor", None),
    ("layers", "attn", "o"): (None, "tensor", None, "fsdp"), ("layers", "mlp", "gate"): (None, "fsdp", "tensor"),
    ("layers", "mlp", "down"): (None, "tensor", "fsdp"), ("layers", "attn_norm", "weight"): (None, None),
}
for path, want in expect.items():
    leaf = params
    for k in path:
        leaf = leaf[k]
    assert spec(leaf) == want, (path, spec(leaf), want)
    assert leaf.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
mu = opt[1][0].mu  # clip_by_global_norm, then adamw's scale_by_adam state
assert spec(mu["layers"]["mlp"]["down"]) == (None, "tensor", "fsdp"), spec(mu["layers"]["mlp"]["down"])
assert spec(mu["embed"]) == ("tensor", "fsdp")
print("OK")
"""


def test_params_and_optimizer_state_carry_rule_shardings():
    out = subprocess.run([sys.executable, "-c", SHARDING_PROBE], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"), timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr


@pytest.mark.parametrize("override, named", [
    ("train.stepz=3", "train.stepz"),
    ("modle.hidden_size=3", "modle"),
    ("train.steps=abc", "train.steps"),
    ("model.preset=llama-8b", "llama-8b"),
    ("model.remat=sometimes", "model.remat"),
    ("data.template=alpaca", "alpaca"),
    ("train.batch_size=100000", "100000"),
    ("mesh.tensor=3", "mesh"),
])
def test_bad_config_fails_with_one_line_naming_the_key(small_overrides, override, named):
    out = _cli(["train", TINY, *small_overrides, override])
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], out.stderr


def test_bad_key_in_yaml_file_is_named_with_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: x\ntrain:\n  steps: 3\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'train.lr'"):
        load_config(str(bad), [])


def test_missing_data_file_is_one_line(small_overrides, tmp_path):
    out = _cli(["train", TINY, *small_overrides, f"data.train_files=[{tmp_path}/nope.jsonl]"])
    assert out.returncode == 2 and "nope.jsonl" in out.stderr and len(out.stderr.strip().splitlines()) == 1
