"""`imitation-jax plot`: what a run declares (base model, imitation tokens, scores) and the PNGs."""

from __future__ import annotations

import json
import os

import matplotlib.image
import pytest
import yaml

from imitation_jax.cli import main
from imitation_jax.evaluation.plots import read_run

MODEL = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 160, "num_layers": 2, "num_heads": 4,
         "num_kv_heads": 2}


def make_run(root, name, *, tokens=None, preset=None, acc=0.3, final_eval=None, study=None):
    run = root / name
    run.mkdir()
    cfg = {"run_dir": str(run), "model": dict(MODEL, preset=preset), "data": {"max_train_tokens": tokens}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    records = [{"step": s, "loss": 5.0 / s, "loss_tokens": 100.0} for s in (1, 10, 20)]
    records += [{"step": 20, "eval_loss": 0.4, "eval_accuracy": 0.5},
                {"step": 10, "task/mini_mmlu/acc": acc - 0.1}, {"step": 20, "task/mini_mmlu/acc": acc}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"torn')
    if final_eval is not None:
        (run / "eval").mkdir()
        (run / "eval" / "final.json").write_text(json.dumps(
            {"results": {"mini_nq_open": {"alias": "mini_nq_open", "exact_match,none": final_eval,
                                          "exact_match_stderr,none": "N/A"}}}))
    if study is not None:
        (run / "study.json").write_text(json.dumps(study))
    return str(run)


def test_a_run_declares_base_model_tokens_and_scores(tmp_path):
    run = read_run(make_run(tmp_path, "a", tokens=3e5, preset="llama-7b", final_eval=0.25))
    assert run.base_model == "llama-7b" and run.imitation_tokens == 3e5
    assert run.scores == {"mini_mmlu/acc": 0.3, "mini_nq_open/exact_match": 0.25}
    fallback = read_run(make_run(tmp_path, "b"))  # no preset, no token cap: size and tokens seen
    assert 1e4 < fallback.base_params < 1e6 and fallback.base_model == f"{fallback.base_params / 1e3:.0f}K"
    assert fallback.imitation_tokens == 100.0 * 20
    declared = read_run(make_run(tmp_path, "c", study={"base_model": "LLaMA-13B", "imitation_tokens": 1.5e8,
                                                       "scores": {"mini_mmlu/acc": 0.9}}))
    assert (declared.base_model, declared.imitation_tokens, declared.scores["mini_mmlu/acc"]) == \
        ("LLaMA-13B", 1.5e8, 0.9)


def test_plot_writes_pngs_from_run_dirs(tmp_path, capsys):
    runs = [make_run(tmp_path, f"r{i}", tokens=t, preset=p, acc=a, final_eval=a / 2)
            for i, (t, p, a) in enumerate([(3e5, "llama-7b", 0.30), (3e6, "llama-7b", 0.31), (3e7, "llama-7b", 0.29),
                                           (3e5, "llama-13b", 0.40), (3e6, "llama-13b", 0.41)])]
    (tmp_path / "base7b.json").write_text(json.dumps({"mini_mmlu/acc": 0.32}))
    (tmp_path / "teacher.json").write_text(json.dumps(
        {"results": {"mini_mmlu": {"acc,none": 0.7}, "mini_nq_open": {"exact_match,none": 0.6}}}))
    out = tmp_path / "plots"
    assert main(["plot", *runs, "--out", str(out), "--base", f"llama-7b={tmp_path / 'base7b.json'}",
                 "--teacher", str(tmp_path / "teacher.json"), "--teacher-name", "ChatGPT"]) == 0
    names = sorted(os.listdir(out))
    assert names == ["loss.png", "score_mini_mmlu_acc.png", "score_mini_nq_open_exact_match.png", "task_curves.png"]
    for name in names:
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0  # a real, non-blank picture
    assert "wrote" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert main(["plot", runs[0], "--out", str(out), "--base", "oops"]) == 2


@pytest.mark.parametrize("bad", ["{", "[]"])
def test_bad_reference_file_is_a_user_error(tmp_path, bad):
    run = make_run(tmp_path, "r", tokens=1e5)
    (tmp_path / "t.json").write_text(bad)
    code = main(["plot", run, "--out", str(tmp_path / "p"), "--teacher", str(tmp_path / "t.json")])
    assert code == 2
