"""Helpers the shipped task YAMLs call through `!function utils.NAME` (lm-eval imports this file by
path, next to the YAMLs): loading the local JSONL splits, normalised exact match (Natural Questions
open) and pass@1 of code run in the sandbox (HumanEval)."""

from __future__ import annotations

import json
import os
import re
import string

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def load_local(name: str, data_dir: str | None = None, splits: list[str] | None = None, **_metadata):
    """DatasetDict of {data_dir}/{name}_{split}.jsonl (default: the suite's data/) for each split file
    present (no network, no cache). A YAML that includes one of ours with `dataset_kwargs: {name: N,
    data_dir: DIR}` runs the same task on a full local copy (e.g. HumanEval's 164 problems)."""
    import datasets

    root = os.path.expanduser(data_dir) if data_dir else DATA
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data_dir {root}: no such directory")
    found = {}
    for fname in sorted(os.listdir(root)):
        if fname.startswith(name + "_") and fname.endswith(".jsonl"):
            split = fname[len(name) + 1:-len(".jsonl")]
            if splits and split not in splits:
                continue
            with open(os.path.join(root, fname)) as f:
                found[split] = datasets.Dataset.from_list([json.loads(line) for line in f if line.strip()])
    if not found:
        raise FileNotFoundError(f"no {name}_<split>.jsonl under {root}")
    return datasets.DatasetDict(found)


def normalize_answer(text: str) -> str:
    """SQuAD/NQ normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def nq_exact_match(doc: dict, results: list[str]) -> dict:
    prediction = normalize_answer(results[0])
    return {"exact_match": float(any(prediction == normalize_answer(a) for a in doc["answer"]))}


def code_pass_at_1(doc: dict, results: list[str]) -> dict:
    """Runs prompt + completion against the task's `check` in the sandbox (timeout, memory and CPU
    limits, a temporary working dir)."""
    from imitation_jax.evaluation.sandbox import SandboxLimits, check_program

    limits = SandboxLimits(timeout_s=float(os.environ.get("IMITATION_JAX_SANDBOX_TIMEOUT", 10)))
    result = check_program(doc["prompt"] + results[0], doc["test"], doc["entry_point"], limits)
    return {"pass@1": float(result.passed)}
