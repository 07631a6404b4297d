"""Never lose a run: resume after SIGKILL equals an uninterrupted run bit for bit, SIGTERM
checkpoints and exits with the documented code, torn or unreadable checkpoints are skipped with a
message, a checkpoint that does not fit the config is an error naming the parameter, and a
checkpoint written by 2 processes x 4 devices restores on other meshes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import run_two_processes
from imitation_jax.train.preemption import EXIT_PREEMPTED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


@pytest.fixture
def base(small_overrides) -> list[str]:
    drop = ("run_dir=", "train.steps=")
    return [o for o in small_overrides if not o.startswith(drop)] + ["data.seq_len=64", "train.steps=10"]


def _cmd(run_dir, base, *extra):
    return [sys.executable, "-m", "imitation_jax.cli", "train", TINY, *base, f"run_dir={run_dir}", *extra]


def _run(run_dir, base, *extra, env=None):
    return subprocess.run(_cmd(run_dir, base, *extra), capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, **(env or {})))


def _params(step_dir):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(step_dir, "params"))


def _assert_identical(a, b):
    import jax

    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _kill_when(proc, ckpt_dir, condition, timeout=300):
    """SIGKILL `proc` as soon as `condition(entries of checkpoints/)` holds; returns what was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        entries = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
        if condition(entries):
            proc.kill()
            proc.wait()
            return entries
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    return None


def test_sigkill_at_random_moments_then_resume_is_bit_identical(base, tmp_path):
    ref = _run(tmp_path / "ref", base, "checkpoint.every_steps=1")
    assert ref.returncode == 0, ref.stderr

    run = tmp_path / "killed"
    ckpt = run / "checkpoints"
    steps_done = lambda entries: {int(e) for e in entries if e.isdigit()}
    kills = [
        ("after step 2's checkpoint", lambda e: 2 in steps_done(e)),
        ("during a checkpoint write", lambda e: any("tmp" in x for x in e) and len(steps_done(e)) >= 1),
        ("after step 8's checkpoint", lambda e: 8 in steps_done(e)),
    ]
    seen = []
    for what, condition in kills:
        proc = subprocess.Popen(_cmd(run, base, "checkpoint.every_steps=1"), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen.append((what, _kill_when(proc, ckpt, condition)))
    final = _run(run, base, "checkpoint.every_steps=1")
    assert final.returncode == 0, final.stderr
    assert "resuming from step" in final.stdout, (seen, final.stdout)
    print(seen)
    assert all(entries is not None for _, entries in seen), seen  # every kill happened mid-run
    _assert_identical(_params(ckpt / "10"), _params(tmp_path / "ref" / "checkpoints" / "10"))
    # Every step's metrics logged once, as in the uninterrupted run.
    steps = [r.split(",")[0] for r in open(run / "metrics.jsonl") if '"loss"' in r]
    assert len(steps) == len(set(steps)) == 10, steps


def test_sigterm_checkpoints_and_exits_with_documented_code(base, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run, base, "train.steps=10000", "checkpoint.every_steps=0"), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    steps = sorted(int(s) for s in os.listdir(run / "checkpoints") if s.isdigit())
    assert len(steps) == 1 and 3 <= steps[0] < 10000
    assert f"stopped at step {steps[0]}" in out
    resumed = _run(run, base, "train.steps=" + str(steps[0] + 2), "checkpoint.every_steps=0")
    assert resumed.returncode == 0 and f"resuming from step {steps[0]}" in resumed.stdout, resumed.stderr


def test_torn_and_unreadable_checkpoints_are_skipped_with_a_message(base, tmp_path):
    run = tmp_path / "run"
    first = _run(run, base, "train.steps=4", "checkpoint.every_steps=2")
    assert first.returncode == 0, first.stderr
    ckpt = run / "checkpoints"
    (ckpt / "6.orbax-checkpoint-tmp-1234").mkdir()  # what a kill during a write leaves
    for f in (ckpt / "4" / "params").rglob("*"):  # step 4's files lost (disk trouble)
        if f.is_file() and "d" == f.parent.name:
            f.write_bytes(b"garbage")
    out = _run(run, base, "train.steps=5", "checkpoint.every_steps=2")
    assert out.returncode == 0, out.stderr
    assert "6.orbax-checkpoint-tmp-1234: an incomplete write" in out.stderr
    assert "step 4 is unreadable" in out.stderr and "resuming from step 2" in out.stdout


def test_checkpoint_not_fitting_the_config_names_the_parameter(base, tmp_path):
    run = tmp_path / "run"
    assert _run(run, base, "train.steps=2").returncode == 0
    out = _run(run, base, "train.steps=4", "model.intermediate_size=96")
    assert out.returncode == 2
    assert "'layers/mlp/down'" in out.stderr or "'layers/mlp/gate'" in out.stderr, out.stderr
    assert "(2, 160, 64)" in out.stderr or "(2, 64, 160)" in out.stderr
    # --restart starts over and keeps the old checkpoints under another name.
    again = _run(run, base, "train.steps=2", "model.intermediate_size=96", "--restart")
    assert again.returncode == 0, again.stderr
    assert any(p.startswith("checkpoints.replaced-") for p in os.listdir(run))


RESHARD_PROBE = r"""
import sys, jax, numpy as np
import orbax.checkpoint as ocp
from imitation_jax.train.config import load_config
from imitation_jax.checkpoint import restore_params
from imitation_jax.sharding import MeshConfig, make_mesh
from imitation_jax.model.params import abstract_params
import dataclasses
cfg = load_config(sys.argv[2] + "/config.yaml", [])
ref = None
for shape, devices in (((1, 1, 1), jax.devices()[:1]), ((1, 4, 2), jax.devices())):
    mesh = make_mesh(MeshConfig(*shape), devices)
    with jax.set_mesh(mesh):
        params = restore_params(sys.argv[1], abstract_params(cfg.model, mesh))
    q = params["layers"]["attn"]["q"]
    assert q.sharding.mesh.devices.shape == shape, q.sharding
    values = [np.asarray(a) for a in jax.tree.leaves(params)]
    ref = values if ref is None else ref
    for a, b in zip(values, ref):
        np.testing.assert_array_equal(a, b)
print("OK")
"""


def test_checkpoint_from_two_processes_restores_on_other_meshes(base, tmp_path):
    run = tmp_path / "run"
    out = run_two_processes([*base, f"run_dir={run}", "train.steps=3", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
                            tmp_path / "logs")
    assert out.returncode == 0, out.stderr[-3000:]
    probe = subprocess.run([sys.executable, "-c", RESHARD_PROBE, str(run / "checkpoints" / "3"), str(run)],
                           capture_output=True, text=True, cwd=ROOT, timeout=300,
                           env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert probe.returncode == 0 and "OK" in probe.stdout, probe.stderr[-3000:]


def test_a_dead_peer_ends_the_survivor_within_bounded_time(base, tmp_path):
    env = dict(os.environ, IMITATION_JAX=f"{sys.executable} -m imitation_jax.cli", LOG_DIR=str(tmp_path / "logs"))
    run = tmp_path / "run"
    launcher = subprocess.Popen(["bash", os.path.join(ROOT, "launch", "local.sh"), "2", TINY, *base,
                                 f"run_dir={run}", "train.steps=100000", "checkpoint.every_steps=0"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.1)
    assert metrics.exists(), "training never started"
    # Kill process 1 only (the one whose JAX_PROCESS_ID is 1).
    victim = None
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read()
            except OSError:
                continue
            if f"run_dir={run}".encode() in open(f"/proc/{pid}/cmdline", "rb").read() \
                    and b"JAX_PROCESS_ID=1\x00" in environ:
                victim = int(pid)
    assert victim is not None
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    try:
        launcher.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        pytest.fail("the surviving process hung after its peer died")
    assert launcher.returncode != 0
    assert time.monotonic() - killed_at < 90


def test_resume_on_changed_data_with_the_same_row_count_fails_with_one_line(base, demo_dir, tmp_path):
    """The checkpoint holds the loader's state (seed, batch size, rows, data fingerprint): resuming on a
    prepared set whose rows differ, even with the same row count, stops before training a step."""
    import json

    import re

    conversations = [json.loads(line) for line in open(os.path.join(demo_dir, "train.jsonl"))]
    # One digit of one answer changed: digits are single tokens, so every row keeps its length and
    # mask and only its content differs.
    answer = next(m for c in conversations for m in c["messages"]
                  if m["role"] == "assistant" and re.search(r"[0-8]", m["content"]))
    answer["content"] = re.sub(r"[0-8]", lambda d: str(int(d.group()) + 1), answer["content"], count=1)
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    sets = {}
    for name, source in (("a", os.path.join(demo_dir, "train.jsonl")), ("b", str(changed))):
        out = str(tmp_path / name)
        done = subprocess.run([sys.executable, "-m", "imitation_jax.cli", "prepare", source, "--tokenizer",
                               os.path.join(demo_dir, "tokenizer.model"), "--template", "koala", "--seq-len", "64",
                               "--out", out, "--quiet"], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert done.returncode == 0, done.stderr
        sets[name] = json.load(open(os.path.join(out, "stats.json")))
    assert sets["a"]["splits"]["train"]["rows"] == sets["b"]["splits"]["train"]["rows"]
    index_a, index_b = np.load(tmp_path / "a" / "index.npz"), np.load(tmp_path / "b" / "index.npz")
    for key in ("train_trained", "train_tokens", "train_examples"):
        np.testing.assert_array_equal(index_a[key], index_b[key])
    assert sets["a"]["fingerprint"] != sets["b"]["fingerprint"]

    no_files = [o for o in base if not o.startswith(("data.train_files=", "data.eval_files=", "data.tokenizer="))]
    no_files += ["data.train_files=[]", "data.eval_files=[]", "data.tokenizer=null"]
    run = tmp_path / "run"
    first = _run(run, no_files, f"data.path={tmp_path / 'a'}", "train.steps=2")
    assert first.returncode == 0, first.stderr
    resumed = _run(run, no_files, f"data.path={tmp_path / 'b'}", "train.steps=4")
    assert resumed.returncode == 2, resumed.stderr
    lines = [line for line in resumed.stderr.splitlines() if not line.startswith("WARNING:absl")]  # Orbax's
    assert len(lines) == 1 and lines[0].startswith("imitation-jax train: error: resume:"), resumed.stderr
    assert "fingerprint" in lines[0] and "--restart" in lines[0] and "Traceback" not in resumed.stderr
    assert sorted(os.listdir(run / "checkpoints")) == ["2"]  # nothing trained, nothing lost


def test_restoring_a_steps_params_item_warns_of_nothing(tmp_path, caplog):
    """A step's params item has no step metadata of its own (the step has it); Orbax's warning of
    that on every load of a run (generate, eval, export) is not passed on."""
    import logging

    import jax
    import jax.numpy as jnp

    from imitation_jax.checkpoint import restore_params, save_params

    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    item = save_params(str(tmp_path / "7" / "params"), params)
    os.remove(os.path.join(item, "_CHECKPOINT_METADATA"))  # as inside a step of a run
    with caplog.at_level(logging.WARNING):
        got = restore_params(str(tmp_path), jax.eval_shape(lambda: params))
    np.testing.assert_array_equal(got["w"], params["w"])
    assert not [r for r in caplog.records if "Metadata file does not exist" in r.getMessage()], caplog.text
