"""Distillation through the train step (`train.objective=kd`): an in-mesh teacher identical to the
student gives zero loss and zero gradient; a student distilled from a teacher ends closer to it (KL
on held-out rows) than one trained with cross entropy on the same rows for the same steps; a
stored-top-K objective on a set without teacher log-probabilities is a one-line error."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imitation_jax.commands.train import run_training
from imitation_jax.train.config import load_config


def _run(overrides, run_dir, *extra):
    cfg = load_config("configs/tiny.yaml", [o for o in overrides if not o.startswith("run_dir=")] +
                      [f"run_dir={run_dir}", "logging.tensorboard=false", *extra])
    return run_training(cfg)


def _records(run_dir):
    return [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl") if '"loss"' in line]


@pytest.fixture
def teacher_run(kd_teacher):
    return kd_teacher  # trained once per session (conftest); read only here


def test_a_teacher_identical_to_the_student_gives_zero_loss_and_gradient(small_overrides, tmp_path, teacher_run):
    for loss in ("forward_kl", "jsd"):
        _run(small_overrides, tmp_path / loss, "train.steps=1", f"init.checkpoint={teacher_run}",
             "train.objective=kd", "kd.source=teacher", f"kd.teacher={teacher_run}", f"kd.loss={loss}")
        first = _records(tmp_path / loss)[0]
        assert abs(first["loss"]) < 1e-6 and abs(first["kd"]) < 1e-6 and first["grad_norm"] < 1e-6, first
        assert first["ce"] > 0.1  # the cross entropy on the text is not zero: the KD term alone is


def _held_out_kl(teacher_dir, student_dir, rows) -> float:
    """Mean KL(teacher || student) per trained position of `rows`, from the two models' logits."""
    import jax.numpy as jnp

    from imitation_jax.convert.loading import load_model

    out = []
    for path in (teacher_dir, student_dir):
        model = load_model(str(path)).model()
        logits = np.asarray(model.logits(model(jnp.asarray(rows["inputs"]), jnp.asarray(rows["positions"]),
                                                jnp.asarray(rows["segment_ids"]))), np.float64)
        logits -= logits.max(-1, keepdims=True)
        out.append(logits - np.log(np.exp(logits).sum(-1, keepdims=True)))
    log_p, log_q = out
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    mask = rows["loss_mask"] > 0
    return float(kl[mask].mean())


def test_distilled_student_is_closer_to_the_teacher_than_the_sft_student(small_overrides, tmp_path, teacher_run):
    from imitation_jax.data.training import load_training_data
    from imitation_jax.train.config import load_config as load

    steps = ["train.steps=6", "optim.lr=3e-3", "train.seed=1"]
    sft = _run(small_overrides, tmp_path / "sft", *steps)["run_dir"]
    kd = _run(small_overrides, tmp_path / "kd", *steps, "train.objective=kd", "kd.source=teacher",
              f"kd.teacher={teacher_run}")["run_dir"]
    assert {"kd", "ce"} <= set(_records(kd)[0])
    held_out = load_training_data(load(f"{kd}/config.yaml").data, log=None).eval
    rows = held_out.take(np.arange(min(8, len(held_out))))
    kl_sft, kl_kd = _held_out_kl(teacher_run, sft, rows), _held_out_kl(teacher_run, kd, rows)
    assert kl_kd < 0.9 * kl_sft, (kl_kd, kl_sft)


def test_stored_kd_needs_a_set_with_teacher_logprobs(small_overrides, tmp_path):
    from imitation_jax.cli import main

    overrides = [o for o in small_overrides if not o.startswith("run_dir=")]
    rc = main(["train", "configs/tiny.yaml", *overrides, f"run_dir={tmp_path / 'run'}", "train.objective=kd"])
    assert rc == 2


@pytest.mark.parametrize("override, named", [("train.objective=dpo", "train.objective"),
                                             ("kd.loss=l2", "kd.loss"), ("kd.alpha=2", "kd.alpha"),
                                             ("kd.source=teacher", "kd.teacher")])
def test_bad_kd_settings_are_one_line(small_overrides, override, named):
    from imitation_jax.errors import ConfigError

    extra = [] if override.startswith("train.objective") else ["train.objective=kd"]
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config("configs/tiny.yaml", small_overrides + extra + [override])


def test_kd_with_an_in_mesh_teacher_sharded_equals_one_device(small_overrides, tmp_path, teacher_run):
    """The same 3 distillation steps on 1 device and on a (2, 2, 2) mesh of 8 simulated devices: the
    teacher is placed by the same rules as the student, and the losses agree."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = [o for o in small_overrides if not o.startswith(("run_dir=", "train.steps="))]
    base += ["train.steps=3", "train.objective=kd", "kd.source=teacher", f"kd.teacher={teacher_run}", "kd.alpha=0.2",
             "logging.tensorboard=false"]
    losses = {}
    for name, devices, mesh in (("one", 1, []), ("eight", 8, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])):
        done = subprocess.run([sys.executable, "-m", "imitation_jax.cli", "train", "configs/tiny.yaml", *base,
                               f"run_dir={tmp_path / name}", *mesh], capture_output=True, text=True, cwd=root,
                              timeout=600, env=dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"))
        assert done.returncode == 0, done.stderr[-3000:]
        losses[name] = [(r["loss"], r["kd"], r["ce"]) for r in _records(tmp_path / name)]
    assert len(losses["one"]) == 3
    np.testing.assert_allclose(losses["eight"], losses["one"], rtol=1e-5)
