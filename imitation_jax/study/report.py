"""The study's results: one table (JSON + Markdown) built from the eval and judge outputs of every
model, and the reference study's plots drawn by `imitation-jax plot`: each score against imitation
tokens (log scale), one line per base size, per imitation set, with the base and the teacher as
reference lines."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

VERSION = 5  # of the table's layout: a new one rebuilds the report
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
               "budget": m.get("budget"), "arm": m.get("arm"), "seed": m.get("seed")}
        row["imitation_tokens"] = (imitation_tokens(study, name, m["set"], m["budget"])
                                   if m["kind"] == "student" else 0)
        results = _read(study.p("eval", f"{name}.json"))
        for column, task in cfg.eval.tasks.items():
            row[column] = task_score(results, task)
        row[STYLE] = style_score(_read(study.p("style", f"{name}.json")))
        if m["kind"] == "student":
            row.update(training_cost(study, name))
        rows.append(row)
    return rows


COST = ("train_s", "teacher_calls", "sampled_tokens")  # per student: its train stage's wall time, and
# the served teacher's scoring requests and the student-sampled tokens it scored (on-policy arms)


def training_cost(study, name: str) -> dict:
    from imitation_jax.evaluation.plots import read_metrics

    marker = study.state.marker(f"train/{name}") or {}
    try:
        records = read_metrics(study.models[name]["path"])
    except FileNotFoundError:
        records = []
    # A resumed run logs a step again: the last record counts.
    steps = {r["step"]: r for r in records if "on_policy_rows" in r}
    return {"train_s": marker.get("seconds"),
            "teacher_calls": int(sum(r["on_policy_rows"] for r in steps.values())),
            "sampled_tokens": int(sum(r.get("on_policy_tokens", 0) for r in steps.values()))}


def arms_table(rows: list[dict], columns: list[str]) -> list[dict]:
    """The compared cells: one row per base x set x budget x arm with every seed's scores pooled
    (mean, std, n) and the mean training cost."""
    from imitation_jax.evaluation.plots import mean_std  # matplotlib loads only when a report is built

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["kind"] == "student":
            groups.setdefault((r["base"], r["set"], r["budget"], r["arm"]), []).append(r)
    per_cell: dict[tuple, int] = {}
    for k, g in groups.items():
        per_cell[k[:3]] = per_cell.get(k[:3], 0) + len(g)
    compared = {cell for cell, n in per_cell.items() if n > 1}  # more than one arm or seed trained there
    out = []
    for (b, s, budget, arm), g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        if (b, s, budget) not in compared:
            continue
        row = {"base": b, "set": s, "budget": budget, "arm": arm, "seeds": sorted(r["seed"] for r in g),
               "imitation_tokens": g[0]["imitation_tokens"]}
        for c in columns:
            vals = [r[c] for r in g if r[c] is not None]
            row[c] = list(mean_std(vals)) if vals else None
        for c in COST:
            vals = [r[c] for r in g if r.get(c) is not None]
            row[c] = sum(vals) / len(vals) if vals else None
        out.append(row)
    return out


def arms_markdown(rows: list[dict], columns: list[str]) -> str:
    head = ["base", "set", "imitation tokens", "arm", "seeds", *columns, "train s", "teacher calls in training",
            "sampled tokens scored"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["base"], r["set"], f"{r['imitation_tokens']:,}", r["arm"], len(r["seeds"])]
        cells += ["-" if r[c] is None else f"{r[c][0]:.3f} +/- {r[c][1]:.3f}" for c in columns]
        cells += ["-" if r["train_s"] is None else f"{r['train_s']:.0f}", f"{r['teacher_calls']:.0f}",
                  f"{r['sampled_tokens']:,.0f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict], columns: list[str]) -> str:
    arms = len({(r["arm"], r["seed"]) for r in rows if r["kind"] == "student"}) > 1
    head = ["model", "base", "set", "imitation tokens", *(["arm", "seed"] if arms else []), *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["base"] or "-", r["set"] or "-", f"{r['imitation_tokens']:,}" if r["imitation_tokens"] else "-"]
        if arms:
            cells += ["-" if r["arm"] is None else r["arm"], "-" if r["seed"] is None else r["seed"]]
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
                           "label": r["model"], "arm": r["arm"], "seed": r["seed"], "scores": flat(r)}, f)
    written = []
    first_arm = next(iter(study.cfg.imitation.arms))
    for s in sorted({r["set"] for r in rows if r["kind"] == "student"}):
        runs = [study.models[r["model"]]["path"] for r in rows
                if r["kind"] == "student" and r["set"] == s and r["arm"] in (None, first_arm)]
        plots = os.path.join(out_dir, f"{s}-imitation")
        run_cli(["plot", *runs, "--out", plots, *base_args, *teacher_args],
                study.p("logs", "report-plot.log"), "report")
        written += sorted(os.path.join(plots, f) for f in os.listdir(plots) if f.startswith("score_"))
    return written + plot_arms(study, rows, columns, out_dir, refs)


def plot_arms(study, rows: list[dict], columns: list[str], out_dir: str, refs: str) -> list[str]:
    """Per compared base and set: each score against imitation tokens, one line per arm (mean +/- std
    over seeds), the base's score dotted and the teacher's dashed."""
    from imitation_jax.evaluation.plots import load_reference, plot_study, read_run

    if len(study.cfg.imitation.arms) < 2:
        return []
    compared = {(r["base"], r["set"], r["budget"]) for r in arms_table(rows, columns)}
    teacher = os.path.join(refs, "teacher.json")
    written = []
    for b, s in sorted({cell[:2] for cell in compared}):
        runs = [dataclasses.replace(read_run(study.models[r["model"]]["path"]), base_model=r["arm"])
                for r in rows if r["kind"] == "student" and (r["base"], r["set"], r["budget"]) in compared
                and (r["base"], r["set"]) == (b, s)]
        base_ref = os.path.join(refs, f"base-{b}.json")
        base = {b: load_reference(base_ref)} if os.path.isfile(base_ref) else {}
        written += plot_study(runs, os.path.join(out_dir, f"arms-{b}-{s}"), base,
                              load_reference(teacher) if os.path.isfile(teacher) else None)
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
    arms = arms_table(rows, columns)
    table["arms"] = arms
    md = markdown(rows, columns)
    if arms:
        md += ("\n## Arms (mean +/- std over seeds)\n\n" + arms_markdown(arms, columns))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(table, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md)
    return table
