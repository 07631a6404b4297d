"""Figures from run dirs: loss curves, and the imitation study's "score against imitation data" plot.

What a run contributes (`read_run`):
  * curves: RUN_DIR/metrics.jsonl — `loss` (train) and `eval_loss` by step, and the in-training task
    scores `task/<task>/<metric>` by step;
  * base model: RUN_DIR/study.json "base_model" if given, else config.yaml's `model.preset`
    (e.g. llama-7b), else the parameter count ("58M");
  * imitation tokens: study.json "imitation_tokens", else `data.max_train_tokens`, else the
    prepared set's trained tokens (`data.path`/stats.json), else the tokens the run trained on
    (the logged `loss_tokens` times the steps between logs);
  * scores: the last in-training task record of metrics.jsonl, overridden by lm-eval results files
    RUN_DIR/eval/*.json (`imitation-jax eval RUN_DIR ... --out RUN_DIR/eval/final.json`; newest
    file wins per metric), overridden by study.json "scores" ({"mini_mmlu/acc": 0.41}).

Reference lines come from results JSONs of the base models (`--base llama-7b=base7b.json`) and of
the teacher (`--teacher chatgpt.json`), each an `imitation-jax eval` output (or a flat
{"task/metric": value} dict). One PNG per task metric: x = imitation tokens (log scale), one line
per base-model size, a dotted line at each base model's own score in that line's colour and a
dashed black line at the teacher's — the layout of Gudibande et al. (2023), figure 1.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import re
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


@dataclasses.dataclass
class Run:
    path: str
    name: str
    records: list[dict]
    base_model: str
    base_params: int | None
    imitation_tokens: float | None
    scores: dict[str, float]


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a run dir?)")
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill
                continue
    return records


def flat_scores(results: dict) -> dict[str, float]:
    """An lm-eval results dict (or an already flat {"task/metric": v} dict) -> flat scores."""
    if "results" in results:
        from imitation_jax.evaluation.runner import scores

        return scores(results)
    return {k: float(v) for k, v in results.items() if isinstance(v, (int, float))}


def _read_json(path: str) -> dict:
    from imitation_jax.errors import ConfigError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object (lm-eval results or {{\"task/metric\": value}})")
    return value


def _config(run_dir: str) -> dict:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return {}
    import yaml

    with open(path) as f:
        return yaml.safe_load(f) or {}


def _params(model: dict) -> int | None:
    try:
        from imitation_jax.model.config import ModelConfig

        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in model.items() if k in fields}).num_params()
    except Exception:  # an old or partial config: the size label falls back to the preset
        return None


def _size_label(n: int | None) -> str:
    if not n:
        return "unknown"
    if n >= 1e9:
        return f"{n / 1e9:.1f}B"
    return f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _trained_tokens(cfg: dict, records: list[dict]) -> float | None:
    data = cfg.get("data") or {}
    if data.get("max_train_tokens"):
        return float(data["max_train_tokens"])
    if data.get("path") and os.path.isfile(os.path.join(data["path"], "stats.json")):
        stats = _read_json(os.path.join(data["path"], "stats.json"))
        for key in ("trained_tokens", "train_trained_tokens"):
            if isinstance(stats.get(key), (int, float)):
                return float(stats[key])
        train = stats.get("train") or {}
        if isinstance(train, dict) and isinstance(train.get("trained_tokens"), (int, float)):
            return float(train["trained_tokens"])
    total, last_step = 0.0, 0
    for r in records:  # each logged loss_tokens stands for the steps since the previous log
        if "loss_tokens" in r:
            total += r["loss_tokens"] * (r["step"] - last_step)
            last_step = r["step"]
    return total or None


def read_run(run_dir: str) -> Run:
    run_dir = os.path.abspath(run_dir)
    records = read_metrics(run_dir)
    cfg = _config(run_dir)
    study_path = os.path.join(run_dir, "study.json")
    study = _read_json(study_path) if os.path.isfile(study_path) else {}
    model = cfg.get("model") or {}
    n_params = _params(model)
    base = study.get("base_model") or model.get("preset") or _size_label(n_params)
    if base == "tiny" and n_params:
        base = f"tiny ({_size_label(n_params)})"
    tokens = study.get("imitation_tokens") or _trained_tokens(cfg, records)
    scores: dict[str, float] = {}
    for r in records:  # the last in-training evaluation of each metric
        scores.update({k[len("task/"):]: v for k, v in r.items() if k.startswith("task/")})
    for path in sorted(glob.glob(os.path.join(run_dir, "eval", "*.json")), key=os.path.getmtime):
        scores.update(flat_scores(_read_json(path)))
    scores.update(study.get("scores") or {})
    return Run(run_dir, study.get("label") or os.path.basename(run_dir.rstrip("/")), records, base,
               n_params, float(tokens) if tokens else None, scores)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_losses(runs: list[Run], out_dir: str) -> list[str]:
    """loss.png (train solid, eval dashed, one colour per run) and task_curves.png (in-training
    task scores by step) when any run has them."""
    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        for key, style, what in (("loss", "-", "train"), ("eval_loss", "--", "eval")):
            points = [(r["step"], r[key]) for r in run.records if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), style, color=colour, label=f"{run.name} {what}",
                        marker="o" if len(points) < 3 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title("Training and held-out loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    written.append(_save(fig, os.path.join(out_dir, "loss.png")))

    metrics = sorted({k for run in runs for r in run.records for k in r if k.startswith("task/")})
    if metrics:
        cols = min(3, len(metrics))
        rows = math.ceil(len(metrics) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
        for ax, metric in zip(axes.flat, metrics):
            for i, run in enumerate(runs):
                points = [(r["step"], r[metric]) for r in run.records if metric in r]
                if points:
                    ax.plot(*zip(*points), "-o", color=f"C{i % 10}", label=run.name, markersize=3)
            ax.set_title(metric[len("task/"):], fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(metrics):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, os.path.join(out_dir, "task_curves.png")))
    return written


def plot_study(runs: list[Run], out_dir: str, base: dict[str, dict[str, float]] | None = None,
               teacher: dict[str, float] | None = None, teacher_name: str = "teacher") -> list[str]:
    """score_<task>_<metric>.png: score against imitation tokens (log x) per base-model size."""
    base, teacher = base or {}, teacher or {}
    usable = [r for r in runs if r.imitation_tokens]
    metrics = sorted({m for r in usable for m in r.scores})
    sizes = sorted({r.base_model for r in usable} | set(base),
                   key=lambda s: (min((r.base_params or 0) for r in usable if r.base_model == s)
                                  if any(r.base_model == s for r in usable) else 0, s))
    written = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for i, size in enumerate(sizes):
            colour = f"C{i % 10}"
            xs, means, stds = _mean_per_x([(r.imitation_tokens, r.scores[metric]) for r in usable
                                           if r.base_model == size and metric in r.scores])
            if xs:  # runs at the same x (seeds): their mean, with +/- one std bars
                ax.errorbar(xs, means, yerr=stds if any(stds) else None, fmt="-o", color=colour, capsize=3,
                            label=f"{size} + imitation")
            if metric in base.get(size, {}):
                ax.axhline(base[size][metric], color=colour, linestyle=":", label=f"{size} base model")
        if metric in teacher:
            ax.axhline(teacher[metric], color="black", linestyle="--", label=teacher_name)
        ax.set_xscale("log")
        ax.set_xlabel("imitation data (tokens, log scale)")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        written.append(_save(fig, os.path.join(out_dir, f"score_{_safe(metric)}.png")))
    return written


def _mean_per_x(points: list[tuple[float, float]]) -> tuple[list[float], list[float], list[float]]:
    by_x: dict[float, list[float]] = {}
    for x, y in points:
        by_x.setdefault(x, []).append(y)
    xs = sorted(by_x)
    means, stds = zip(*(mean_std(by_x[x]) for x in xs)) if xs else ((), ())
    return xs, list(means), list(stds)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load_reference(path: str) -> dict[str, float]:
    return flat_scores(_read_json(path))


def plot_runs(run_dirs: list[str], out_dir: str, base: dict[str, str] | None = None,
              teacher: str | None = None, teacher_name: str = "teacher") -> dict[str, Any]:
    runs = [read_run(d) for d in run_dirs]
    base_scores = {size: load_reference(p) for size, p in (base or {}).items()}
    teacher_scores = load_reference(teacher) if teacher else None
    written = plot_losses(runs, out_dir)
    written += plot_study(runs, out_dir, base_scores, teacher_scores, teacher_name)
    return {"runs": runs, "written": written}
