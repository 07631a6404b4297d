#!/usr/bin/env python3
"""Fill in launch/k8s/jobset.yaml (GPU) or jobset-tpu.yaml (GKE TPU slice) and print the manifest.

    python launch/k8s/render.py gpu configs/llama7b_gpu8.yaml run_dir=/shared/runs/r1 ... \\
        --image REGISTRY/imitation-jax-gpu:TAG --claim shared-rwx --nodes 4 | kubectl apply -f -
    python launch/k8s/render.py tpu configs/llama7b_tpu_v5e.yaml run_dir=/shared/runs/r1 ... \\
        --image REGISTRY/imitation-jax-tpu:TAG --claim shared-rwx \\
        --accelerator tpu-v5-lite-podslice --topology 4x4 --chips-per-host 4 > jobset.yaml

Every value that must agree is written from one option: the pod count (parallelism, completions and
JAX_NUM_PROCESSES), the JobSet name and the coordinator's DNS name (pod 0 of job 0 behind the
headless service), and for TPUs the host count from topology / chips per host. Needs PyYAML (in the
project's environment). Nothing is sent to a cluster: pipe the output to `kubectl apply
--dry-run=server -f -` to have the API server (with the JobSet CRD installed) check it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = {"gpu": "jobset.yaml", "tpu": "jobset-tpu.yaml"}
COORDINATOR_PORT = 8476


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="render.py", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=sorted(TEMPLATES))
    p.add_argument("config", help="config path inside the image (working directory /app)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides (run_dir, data.*, init.checkpoint)")
    p.add_argument("--image", required=True)
    p.add_argument("--claim", required=True, help="ReadWriteMany PersistentVolumeClaim mounted at /shared")
    p.add_argument("--name", help="JobSet name (default: imitation-jax, imitation-jax-tpu)")
    p.add_argument("--nodes", type=int, default=2, help="gpu: pods, one per node (2)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--accelerator", default="tpu-v5-lite-podslice", help="tpu: cloud.google.com/gke-tpu-accelerator")
    p.add_argument("--topology", default="4x4", help="tpu: cloud.google.com/gke-tpu-topology (4x4)")
    p.add_argument("--chips-per-host", type=int, default=4, help="tpu: google.com/tpu per pod (4)")
    args = p.parse_intermixed_args(argv)
    for key in ("nodes", "gpus_per_node", "chips_per_host"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be at least 1")
    bad = [o for o in args.overrides if "=" not in o or o.startswith("-")]
    if bad:
        p.error(f"overrides are dotted.key=value, got {bad[0]!r}")
    return args


def _container(spec: dict) -> dict:
    return spec["template"]["spec"]["template"]["spec"]["containers"][0]


def render(args: argparse.Namespace) -> dict:
    with open(os.path.join(HERE, TEMPLATES[args.kind])) as f:
        doc = yaml.safe_load(f)
    name = args.name or doc["metadata"]["name"]
    doc["metadata"]["name"] = name
    rjob = doc["spec"]["replicatedJobs"][0]
    job = rjob["template"]["spec"]
    pod = job["template"]["spec"]
    c = _container(rjob)
    c["image"] = args.image
    c["command"] = ["imitation-jax", "train", args.config]
    c["args"] = list(args.overrides)
    for v in pod["volumes"]:
        if v["name"] == "shared":
            v["persistentVolumeClaim"]["claimName"] = args.claim

    if args.kind == "gpu":
        pods = args.nodes
        doc["spec"]["network"]["subdomain"] = name
        env = {e["name"]: e for e in c["env"]}
        # <jobset>-<replicatedJob>-<job index>-<pod index>.<subdomain>: pod 0 of job 0 is process 0.
        env["JAX_COORDINATOR_ADDRESS"]["value"] = f"{name}-{rjob['name']}-0-0.{name}:{COORDINATOR_PORT}"
        env["JAX_NUM_PROCESSES"]["value"] = str(pods)
        c["resources"]["limits"]["nvidia.com/gpu"] = args.gpus_per_node
    else:
        try:
            chips = math.prod(int(d) for d in args.topology.split("x"))
        except ValueError:
            raise SystemExit(f"render.py: --topology {args.topology!r} is not like 4x4 or 2x2x4")
        if chips % args.chips_per_host:
            raise SystemExit(f"render.py: topology {args.topology} has {chips} chips, not a multiple of "
                             f"--chips-per-host {args.chips_per_host}")
        pods = chips // args.chips_per_host
        pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] = args.accelerator
        pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] = args.topology
        c["resources"]["limits"]["google.com/tpu"] = args.chips_per_host
        if not any(o.startswith("distributed.auto_detect=") for o in c["args"]):
            c["args"].insert(0, "distributed.auto_detect=true")  # GKE's TPU env names the peers
    job["parallelism"] = job["completions"] = pods
    return doc


def main(argv: list[str]) -> int:
    args = parse(argv)
    doc = render(args)
    text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    if "FILL_IN" in text:  # a template field this script does not know yet
        line = next(ln for ln in text.splitlines() if "FILL_IN" in ln)
        raise SystemExit(f"render.py: left unfilled in {TEMPLATES[args.kind]}: {line.strip()}")
    sys.stdout.write(f"# rendered from launch/k8s/{TEMPLATES[args.kind]} by launch/k8s/render.py\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
