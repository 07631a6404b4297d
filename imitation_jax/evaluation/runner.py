"""`run_eval`: lm-eval's `simple_evaluate` on a model, offline, with the shipped task suite always on
the include path; plus the small helpers that turn lm-eval's results into a flat score dict."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

SUITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
SUITE_TASKS = ("mini_mmlu", "mini_nq_open", "mini_humaneval", "mini_perplexity")
# lm-eval reports metrics as "name,filter"; these are the bookkeeping entries that are not scores.
_NOT_SCORES = ("alias", "samples", "name", "sample_len")


def offline() -> None:
    """No hub or dataset downloads: tasks read local files or data already in the HF cache. A user
    who wants downloads sets the variables to 0 themselves."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")


class _QuietCustomDataset:
    """lm-eval warns at every load of a task with a custom_dataset loader (all of the shipped
    suite) about passing --metadata, which does not apply to them."""

    @staticmethod
    def filter(record) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def task_manager(include_paths: Sequence[str] = ()):
    import logging

    task_log = logging.getLogger("lm_eval.api.task")
    if _QuietCustomDataset not in task_log.filters:
        task_log.addFilter(_QuietCustomDataset)
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--include-path {path}: no such directory")
    return TaskManager(include_path=[SUITE_DIR, *include_paths])


def check_tasks(manager, tasks: Sequence[str]) -> None:
    from imitation_jax.errors import ConfigError

    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown task(s) {', '.join(unknown)}: not in lm-eval's registry, the shipped "
                          f"suite ({', '.join(SUITE_TASKS)}) or an --include-path")


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        f.endswith((".safetensors", ".bin")) for f in os.listdir(path))


def make_lm(model: Any, backend: str = "ours", batch_size: int = 16, dtype: str | None = None, step: int | None = None):
    """Our backend on a path or a loaded model object, or lm-eval's `hf` backend on an HF dir."""
    from imitation_jax.errors import CheckpointError

    if backend == "ours":
        from imitation_jax.evaluation.lm_backend import ImitationJaxLM

        if isinstance(model, str):
            return ImitationJaxLM(pretrained=model, batch_size=batch_size, dtype=dtype, step=step)
        return ImitationJaxLM(model=model, batch_size=batch_size)
    if backend != "hf":
        raise ValueError(f"backend {backend!r} is not one of ours, hf")
    if not isinstance(model, str) or not is_hf_dir(model):
        raise CheckpointError(f"{model}: --backend hf needs a Hugging Face model dir (config.json + safetensors); "
                              f"export one first: imitation-jax export-hf {model} --out HF_DIR")
    from lm_eval.models.huggingface import HFLM

    # Exported tokenizers do not add BOS themselves (our templates place it); lm-eval's LLaMA
    # convention, which our backend follows, starts every encoded text with it.
    with open(os.path.join(model, "config.json")) as f:
        has_bos = json.load(f).get("bos_token_id") is not None
    return HFLM(pretrained=model, backend="causal", batch_size=batch_size, device="cuda" if _cuda() else "cpu",
                dtype=dtype or "float32", trust_remote_code=False, add_bos_token=has_bos or None)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def run_eval(lm, tasks: Sequence[str], *, include_paths: Sequence[str] = (), limit: float | None = None,
             num_fewshot: int | None = None, log_samples: bool = False, confirm_run_unsafe_code: bool = False,
             seed: int = 0, verbosity: str = "WARNING", apply_chat_template: bool = False) -> dict:
    """simple_evaluate on `lm` (an lm-eval LM instance); returns lm-eval's results dict."""
    import lm_eval

    offline()
    manager = task_manager(include_paths)
    check_tasks(manager, tasks)
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, log_samples=log_samples,
            task_manager=manager, confirm_run_unsafe_code=confirm_run_unsafe_code, bootstrap_iters=0,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            verbosity=verbosity, apply_chat_template=apply_chat_template)
    except ConnectionError as exc:  # datasets in offline mode, data not in the local cache
        raise FileNotFoundError(f"task data is not available offline ({str(exc).splitlines()[0]}); fetch it "
                                "once with HF_DATASETS_OFFLINE=0 where there is network, or point the task at "
                                "local files (docs/eval.md: The real benchmarks)") from None
    return results


def scores(results: dict) -> dict[str, float]:
    """{"task/metric": value} of every numeric score (stderr and bookkeeping left out)."""
    flat = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            name = key.split(",")[0]
            if name in _NOT_SCORES or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            flat[f"{task}/{name}"] = float(value)
    return flat


def write_results(results: dict, path: str) -> None:
    from lm_eval.utils import handle_non_serializable

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
    os.replace(tmp, path)


def results_table(results: dict) -> str:
    from lm_eval.utils import make_table

    return make_table(results)
