"""The launchers that cannot run here show what they would do, and that is right: `DRY_RUN=1
launch/tpu_pod.sh` prints its gcloud commands (the scripts it sends to the workers are then run
here, on a stub trainer: they start it detached with the overrides intact, record its exit code, and
`stop` makes it exit 75), and launch/k8s/render.py fills in the JobSet manifests with every value that
must agree (pod counts, coordinator DNS name, TPU hosts from the topology) written from one option.
launch/slurm.sbatch itself runs through a real Slurm in tests/test_slurm.py."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(ROOT, "launch", "tpu_pod.sh")
RENDER = os.path.join(ROOT, "launch", "k8s", "render.py")
OVERRIDES = ["run_dir=/mnt/bucket/runs/r1", "data.train_files=[/mnt/bucket/my data.jsonl]", "optim.lr=3e-4"]

# A stand-in for .venv/bin/imitation-jax on a worker: records its arguments; with STUB_WAIT it runs
# until SIGTERM and then exits 75 like the trainer.
STUB = """#!/usr/bin/env bash
printf '%s\\n' "$@" > argv.txt
if [ -n "${STUB_WAIT:-}" ]; then
  sleep 60 & s=$!
  trap 'kill $s; exit 75' TERM
  wait
fi
"""


def tpu_pod(*args, **env):
    done = subprocess.run(["bash", TPU_POD, *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env=dict(os.environ, DRY_RUN="1", **env))
    assert done.returncode == 0, done.stderr
    return [bash_words(line) for line in done.stdout.splitlines() if line.startswith("gcloud ")]


def bash_words(line: str) -> list[str]:
    """The argv bash makes of a printed command line (printf %q may write $'...' quoting)."""
    done = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line],
                          capture_output=True, text=True, timeout=10, check=True)
    return done.stdout.split("\0")[:-1]


def option(cmd, name):
    """The value of `name VALUE` or `name=VALUE` in an argv."""
    for i, a in enumerate(cmd):
        if a == name:
            return cmd[i + 1]
        if a.startswith(name + "="):
            return a[len(name) + 1:]
    raise KeyError(f"{name} not in {cmd}")


def test_tpu_pod_dry_run_prints_every_gcloud_command(tmp_path):
    cmds = tpu_pod("run", "my-v5e", "us-west4-a", "configs/tiny.yaml", *OVERRIDES, WORKERS="2", PROJECT="proj")
    assert all(c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] for c in cmds)
    assert all(option(c, "--zone") == "us-west4-a" and option(c, "--project") == "proj" for c in cmds)
    verbs = [(c[4], option(c, "--worker") if "ssh" in c or "scp" in c else None) for c in cmds]
    # start everywhere, follow worker 0, list the workers, fetch each worker's log, read worker 0's exit code
    assert verbs == [("ssh", "all"), ("ssh", "0"), ("describe", None), ("scp", "0"), ("scp", "1"), ("ssh", "0")]
    assert [c[-2:] for c in cmds if c[4] == "scp"] == [
        ["my-v5e:imitation_jax/logs/train.log", f"tpu-logs/my-v5e/worker-{i}.log"] for i in (0, 1)]
    assert not os.path.exists(os.path.join(ROOT, "tpu-logs", "my-v5e"))  # a dry run writes nothing

    setup = tpu_pod("setup", "my-v5e", "us-west4-a")
    assert [(c[4], option(c, "--worker")) for c in setup] == [("scp", "all"), ("ssh", "all")]
    assert "pip install -q -e '.[tpu]'" in option(setup[1], "--command")


def _stub_worker(home):
    bin_dir = home / "imitation_jax" / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    stub = bin_dir / "imitation-jax"
    stub.write_text(STUB)
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return home / "imitation_jax"


def _on_worker(home, cmd, **env):
    """Run an `ssh --command` script as a worker would, in `home`."""
    return subprocess.run(["bash", "-c", option(cmd, "--command")], cwd=home, capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, **env))


def _wait_for(path, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (path.exists() and path.read_text().strip()):
        time.sleep(0.05)
    return path.read_text().strip()


def test_tpu_pod_worker_scripts_start_the_trainer_detached_and_stop_it_with_exit_75(tmp_path):
    run, follow, *_, read_exit = tpu_pod("run", "my-v5e", "us-west4-a", "configs/tiny.yaml", *OVERRIDES)
    worker = _stub_worker(tmp_path)
    started = _on_worker(tmp_path, run)
    assert started.returncode == 0 and "started pid" in started.stdout, started.stderr
    assert _wait_for(worker / "logs" / "train.exit") == "0"
    # The overrides reach the trainer as they were typed, spaces and brackets included.
    assert (worker / "argv.txt").read_text().splitlines() == [
        "train", "configs/tiny.yaml", *OVERRIDES, "distributed.auto_detect=true"]
    assert _on_worker(tmp_path, read_exit).stdout.strip() == "0"

    (worker / "logs" / "train.exit").unlink()
    started = _on_worker(tmp_path, run, STUB_WAIT="1")
    assert started.returncode == 0, started.stderr
    (stop,) = tpu_pod("stop", "my-v5e", "us-west4-a")
    assert option(stop, "--worker") == "all"
    stopped = _on_worker(tmp_path, stop)
    assert "SIGTERM sent" in stopped.stdout, stopped.stderr
    assert _wait_for(worker / "logs" / "train.exit") == "75"
    assert "not running" in _on_worker(tmp_path, stop).stdout


def render(*args):
    return subprocess.run([sys.executable, RENDER, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def _pod(doc):
    rjob = doc["spec"]["replicatedJobs"][0]
    return rjob, rjob["template"]["spec"], rjob["template"]["spec"]["template"]["spec"]


def test_k8s_gpu_manifest_rendered_with_agreeing_counts_and_coordinator():
    done = render("gpu", "configs/llama7b_gpu8.yaml", *OVERRIDES, "--image", "reg/imitation-jax-gpu:1",
                  "--claim", "team-rwx", "--nodes", "3", "--name", "r1")
    assert done.returncode == 0, done.stderr
    assert "FILL_IN" not in done.stdout
    doc = yaml.safe_load(done.stdout)
    template = yaml.safe_load(open(os.path.join(ROOT, "launch", "k8s", "jobset.yaml")))
    rjob, job, pod = _pod(doc)
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert doc["metadata"]["name"] == doc["spec"]["network"]["subdomain"] == "r1"
    assert job["parallelism"] == job["completions"] == int(env["JAX_NUM_PROCESSES"]) == 3
    # JobSet's pod DNS name: <jobset>-<replicatedJob>-<job index>-<pod index>.<subdomain>
    assert env["JAX_COORDINATOR_ADDRESS"] == f"r1-{rjob['name']}-0-0.r1:{c['ports'][0]['containerPort']}"
    assert env["JAX_PROCESS_ID"] == {"fieldRef": {"fieldPath":
                                                  "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert c["command"] == ["imitation-jax", "train", "configs/llama7b_gpu8.yaml"] and c["args"] == OVERRIDES
    assert c["image"] == "reg/imitation-jax-gpu:1"
    assert {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}["shared"] == \
        "team-rwx"
    # What the template fixes stays: grace period for the checkpoint, no pod restarts, restarts of the set.
    _, tjob, tpod = _pod(template)
    assert pod["terminationGracePeriodSeconds"] == tpod["terminationGracePeriodSeconds"] == 600
    assert pod["restartPolicy"] == "Never" and job["completionMode"] == "Indexed"
    assert doc["spec"]["failurePolicy"] == template["spec"]["failurePolicy"]


def test_k8s_tpu_manifest_takes_its_host_count_from_the_topology():
    done = render("tpu", "configs/llama7b_tpu_v5e.yaml", *OVERRIDES, "--image", "reg/tpu:1", "--claim", "rwx",
                  "--accelerator", "tpu-v5-lite-podslice", "--topology", "4x8", "--chips-per-host", "4")
    assert done.returncode == 0, done.stderr
    doc = yaml.safe_load(done.stdout)
    _, job, pod = _pod(doc)
    (c,) = pod["containers"]
    assert job["parallelism"] == job["completions"] == 8  # 32 chips / 4 per host
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                   "cloud.google.com/gke-tpu-topology": "4x8"}
    assert c["resources"]["limits"]["google.com/tpu"] == 4
    assert c["args"] == ["distributed.auto_detect=true", *OVERRIDES]

    again = yaml.safe_load(render("tpu", "c.yaml", "distributed.auto_detect=true", "--image", "i", "--claim", "c")
                           .stdout)
    assert _pod(again)[2]["containers"][0]["args"] == ["distributed.auto_detect=true"]


@pytest.mark.parametrize("args, message", [
    (["tpu", "c.yaml", "--image", "i", "--claim", "c", "--topology", "2x3"], "6 chips, not a multiple of"),
    (["tpu", "c.yaml", "--image", "i", "--claim", "c", "--topology", "big"], "is not like 4x4"),
    (["gpu", "c.yaml", "--image", "i"], "required: --claim"),
    (["gpu", "c.yaml", "--image", "i", "--claim", "c", "--nodes", "0"], "--nodes must be at least 1"),
    (["gpu", "c.yaml", "lr", "--image", "i", "--claim", "c"], "dotted.key=value"),
])
def test_k8s_render_rejects_bad_input_in_one_line(args, message):
    done = render(*args)
    assert done.returncode != 0 and message in done.stderr.strip().splitlines()[-1], done.stderr
    assert "Traceback" not in done.stderr


def test_shipped_k8s_templates_agree_with_themselves():
    for name in ("jobset.yaml", "jobset-tpu.yaml"):
        doc = yaml.safe_load(open(os.path.join(ROOT, "launch", "k8s", name)))
        _, job, pod = _pod(doc)
        assert job["parallelism"] == job["completions"], name
        env = {e["name"]: e.get("value") for e in pod["containers"][0].get("env", [])}
        if "JAX_NUM_PROCESSES" in env:
            assert int(env["JAX_NUM_PROCESSES"]) == job["parallelism"], name


def test_slurm_sbatch_without_a_config_prints_its_usage():
    done = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch")], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2 and "usage: sbatch" in done.stderr
