"""The study's results: one table (JSON + Markdown) built from the eval and judge outputs of every
model, and the reference study's plots drawn by `imitation-jax plot`: each score against imitation
tokens (log scale), one line per base size, per imitation set, with the base and the teacher as
reference lines."""

from __future__ import annotations

import json
import os
import re
from typing import Any

VERSION = 4  # of the table's layout: a new one rebuilds the report
STYLE = "style"  # judge column: share of answers rated as good as or better than the teacher's


def _read(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def task_score(results: dict, task: str) -> float | None:
    r = (results or {}).get("results", {}).get(task)
    if not r:
        return None
    for key in ("acc,none", "exact_match,none", "pass@1,none", "acc"):
        if key in r:
            return float(r[key])
    return None


def style_score(judged: dict | None) -> float | None:
    if not judged:
        return None
    return float(judged["win"]["rate"] + judged["tie"]["rate"])


def imitation_tokens(study, name: str, s: str, budget: int) -> int:
    """Trained tokens in the student's capped subset (train's data line in its log: the nested subset
    of whole rows under the budget), else its budget or the whole set when that is smaller."""
    try:
        with open(study.p("logs", f"train-{name}.log")) as f:
            found = re.findall(r"^data: .*?([\d,]+) trained tokens", f.read(), re.M)
        if found:
            return int(found[-1].replace(",", ""))
    except FileNotFoundError:
        pass
    from imitation_jax.data.storage import PreparedSet
    from imitation_jax.errors import DataError

    try:
        stats = PreparedSet(study.p("imitation", "prepared", s)).stats
    except DataError:
        stats = {}
    have = stats.get("splits", {}).get("train", {}).get("trained_tokens")
    return min(budget, int(have)) if have else budget


def build_table(study) -> list[dict]:
    cfg = study.cfg
    rows = []
    names = list(study.models) + (["teacher"] if cfg.teacher.base_url and "teacher" not in study.models else [])
    for name in names:
        m = study.models.get(name, {"kind": "teacher"})
        row = {"model": name, "kind": m["kind"], "base": m.get("base"), "set": m.get("set"),
               "budget": m.get("budget")}
        row["imitation_tokens"] = (imitation_tokens(study, name, m["set"], m["budget"])
                                   if m["kind"] == "student" else 0)
        results = _read(study.p("eval", f"{name}.json"))
        for column, task in cfg.eval.tasks.items():
            row[column] = task_score(results, task)
        row[STYLE] = style_score(_read(study.p("style", f"{name}.json")))
        rows.append(row)
    return rows


def markdown(rows: list[dict], columns: list[str]) -> str:
    head = ["model", "base", "set", "imitation tokens", *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["base"] or "-", r["set"] or "-", f"{r['imitation_tokens']:,}" if r["imitation_tokens"] else "-"]
        cells += ["-" if r[c] is None else f"{r[c]:.3f}" for c in columns]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def plot(study, rows: list[dict], columns: list[str], out_dir: str) -> list[str]:
    """`imitation-jax plot` per imitation set: each student run gets a study.json (base, imitation
    tokens, scores), each base and the teacher a flat reference file for the reference lines."""
    from imitation_jax.study.stages import run_cli

    refs = os.path.join(out_dir, "references")
    os.makedirs(refs, exist_ok=True)

    def flat(r):
        return {c: r[c] for c in columns if r[c] is not None}

    base_args, teacher_args = [], []
    for r in rows:
        if r["kind"] == "base":
            path = os.path.join(refs, f"base-{r['base']}.json")
            json.dump(flat(r), open(path, "w"))
            base_args += ["--base", f"{r['base']}={path}"]
        elif r["kind"] == "teacher":
            path = os.path.join(refs, "teacher.json")
            json.dump(flat(r), open(path, "w"))
            teacher_args = ["--teacher", path]
        else:
            with open(os.path.join(study.models[r["model"]]["path"], "study.json"), "w") as f:
                json.dump({"base_model": r["base"], "imitation_tokens": r["imitation_tokens"],
                           "label": r["model"], "scores": flat(r)}, f)
    written = []
    for s in sorted({r["set"] for r in rows if r["kind"] == "student"}):
        runs = [study.models[r["model"]]["path"] for r in rows if r["kind"] == "student" and r["set"] == s]
        plots = os.path.join(out_dir, f"{s}-imitation")
        run_cli(["plot", *runs, "--out", plots, *base_args, *teacher_args],
                study.p("logs", "report-plot.log"), "report")
        written += sorted(os.path.join(plots, f) for f in os.listdir(plots) if f.startswith("score_"))
    return written


def write_report(study, out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    rows = build_table(study)
    columns = [*study.cfg.eval.tasks, STYLE]
    plots = plot(study, rows, columns, os.path.join(out_dir, "plots"))
    table = {"columns": columns, "rows": rows, "plots": plots,
             "meaning": {STYLE: "share of chat answers the style judge rates as good as or better than the "
                                "teacher's (win + tie rate, both orders)",
                         **{c: f"lm-eval accuracy on {t}" for c, t in study.cfg.eval.tasks.items()}}}
    md = markdown(rows, columns)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(table, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    return table
