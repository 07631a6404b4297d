"""launch/slurm.sbatch through a real Slurm (tests/slurm_cluster.py starts one on this machine):
the job trains to the end with the losses and parameters of the same config run directly, on one
node and on two nodes (one JAX process each, CPU devices standing in for GPUs), and `scancel
--signal=TERM` mid-run makes the trainer checkpoint and exit 75, after which REQUEUE=1 requeues the
job and the rerun resumes and ends with the parameters of an uninterrupted run.

Skipped with the reason when Slurm is not installed (IMITATION_SLURM_INSTALL=1 installs it with
apt-get) or cannot start here."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from imitation_jax.train.preemption import EXIT_PREEMPTED

from slurm_cluster import SlurmUnavailable, free_ports, start_cluster

pytestmark = pytest.mark.slurm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SBATCH = os.path.join(ROOT, "launch", "slurm.sbatch")
STEPS = 40
DEVICES = 2  # in total: one process with 2 CPU devices, or two processes with 1 each


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    # Session-wide: a module fixture would be torn down and restarted whenever xdist hands this
    # worker another module's test in between. Under `-n 2` each worker that gets a Slurm test
    # starts its own cluster (ports and directories of its own; a few seconds).
    try:
        c = start_cluster(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as e:
        pytest.skip(f"no Slurm cluster here: {e}")
    yield c
    c.stop()


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> tuple[str, str]:
    """(demo data dir, run dir of the direct `imitation-jax train` run: one process, DEVICES CPU
    devices), made once for all xdist workers under a lock and shared by them."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    root = root / "slurm-reference"
    root.mkdir(exist_ok=True)
    data, run = root / "demo", root / "direct"
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            shutil.rmtree(data, ignore_errors=True)
            shutil.rmtree(run, ignore_errors=True)
            made = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_demo_data.py"), "--out", str(data),
                                   "--num-conversations", "600", "--vocab-size", "512", "--eval-fraction", "0.1"],
                                  capture_output=True, text=True, cwd=ROOT, timeout=300)
            assert made.returncode == 0, made.stderr[-3000:]
            env = dict(os.environ, JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES} {os.environ.get('XLA_FLAGS', '')}")
            done = subprocess.run([os.path.join(sys.prefix, "bin", "imitation-jax"), "train", TINY,
                                   *small_config(data), f"run_dir={run}"],
                                  capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
            (root / "done").write_text("")
    return str(data), str(run)


def small_config(data) -> list[str]:
    # ~70 ms a step on 2 cores: long enough to land a SIGTERM mid-run, short enough for the suite.
    return ["model.hidden_size=128", "model.intermediate_size=320", "model.num_layers=2", "model.num_heads=4",
            "model.num_kv_heads=2", f"data.train_files=[{data}/train.jsonl]", f"data.eval_files=[{data}/eval.jsonl]",
            f"data.tokenizer={data}/tokenizer.model", "data.seq_len=128", "train.batch_size=8",
            f"train.steps={STEPS}", "train.log_every=1", "train.peak_flops=1e12", "optim.warmup_steps=2",
            "eval.every_steps=0", "eval.max_batches=2", "logging.progress=false", "checkpoint.every_steps=0"]


@pytest.fixture
def overrides(reference) -> list[str]:
    return small_config(reference[0])


@pytest.fixture
def direct(reference) -> str:
    return reference[1]


def submit(cluster, run, overrides, *, nodes=1, **env) -> tuple[str, str]:
    """sbatch launch/slurm.sbatch on CPU devices; returns (job id, path of its output)."""
    out = str(run) + "-%j.out"
    env = dict(cluster.env, IMITATION_CPU="1", DEVICES_PER_NODE=str(DEVICES // nodes), VENV=sys.prefix,
               PORT=str(free_ports(1)[0]), **env)
    job = cluster.sbatch(f"--nodes={nodes}", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={out}",
                         SBATCH, TINY, *overrides, f"run_dir={run}", env=env, cwd=ROOT)
    return job, out.replace("%j", job)


def losses(run) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def params(run, step=STEPS):
    """The checkpoint's parameters, restored on one device of this process."""
    import jax

    from imitation_jax.checkpoint import restore_params
    from imitation_jax.model.params import abstract_params
    from imitation_jax.sharding import MeshConfig, make_mesh
    from imitation_jax.train.config import load_config

    cfg = load_config(os.path.join(run, "config.yaml"), [])
    mesh = make_mesh(MeshConfig(1, 1, 1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        return restore_params(os.path.join(run, "checkpoints", str(step)), abstract_params(cfg.model, mesh))


def assert_identical(a, b):
    import jax

    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def finished(cluster, job, out, timeout=300) -> dict[str, str]:
    fields = cluster.wait(job, timeout)
    log = open(out).read() if os.path.exists(out) else "(no output)"
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, log[-3000:])
    return fields


def test_sbatch_trains_to_the_end_with_the_losses_of_a_direct_run(cluster, direct, overrides, tmp_path):
    run = tmp_path / "run"
    job, out = submit(cluster, run, overrides)
    finished(cluster, job, out)
    log = open(out).read()
    assert f"1 node(s) x {DEVICES} CPU devices" in log, log
    ref = losses(direct)
    assert len(ref) == STEPS
    assert losses(run) == ref  # bit for bit: the same single process, started by slurmstepd
    assert_identical(params(run), params(direct))


def test_two_nodes_one_process_each_train_like_one_process(cluster, direct, overrides, tmp_path):
    if len(cluster.nodes) < 2:
        pytest.skip("this slurmd cannot run twice on one host: one node only")
    run = tmp_path / "run"
    job, out = submit(cluster, run, overrides, nodes=2)
    fields = finished(cluster, job, out)
    log = open(out).read()
    assert fields["NodeList"] == "n[1-2]" and "2 node(s) x 1 CPU devices" in log, (fields, log)
    got, ref = losses(run), losses(direct)
    assert [s for s, _ in got] == [s for s, _ in ref]
    # The same global batches on 2 devices; only the all-reduce between processes may round differently.
    np.testing.assert_allclose([v for _, v in got], [v for _, v in ref], rtol=2e-5)


def test_scancel_term_checkpoints_exits_75_and_the_requeued_job_resumes_to_the_same_params(
        cluster, direct, overrides, tmp_path):
    run = tmp_path / "run"
    job, out = submit(cluster, run, overrides, REQUEUE="1")
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count('"loss"') >= 3):
        assert cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), open(out).read()[-3000:]
        time.sleep(0.05)
    # To the job steps (the trainer), not the batch shell: the script must live to requeue the job.
    cluster.run("scancel", "--signal=TERM", job)
    fields = finished(cluster, job, out, timeout=300)
    log = open(out).read()
    assert "stopped at step" in log, f"the run ended before SIGTERM reached it:\n{log[-3000:]}"
    stopped = int(log.split("stopped at step")[1].split()[0].strip(".,:;"))
    assert 3 <= stopped < STEPS
    assert f"(exit {EXIT_PREEMPTED}); requeueing job {job}" in log, log[-3000:]
    assert fields["Restarts"] == "1" and "restart 1" in log, (fields, log[-3000:])
    assert f"resuming from step {stopped}" in log, log[-3000:]
    assert_identical(params(run), params(direct))
    steps = [s for s, _ in losses(run)]
    assert steps == list(range(1, STEPS + 1)), steps  # every step logged once across the two runs
