"""The study's arms (sft / kd / on_policy) and seeds: config checks, the plan they expand to, the
train overrides each arm runs with, and the mean +/- std table (against numbers computed by hand)."""

from __future__ import annotations

import math

import pytest

from imitation_jax.errors import ConfigError
from imitation_jax.study.config import load_study_config


def _study(tmp_path, overrides=()):
    from imitation_jax.study.runner import Study

    cfg = load_study_config("configs/study/mini.yaml", [f"work_dir={tmp_path / 'w'}", *overrides])
    return Study(cfg, log=lambda *_: None)


def test_mini_plan_trains_every_arm_and_seed_on_the_compared_cells_only(tmp_path):
    study = _study(tmp_path)
    stages = {s.name: s for s in study.plan()}
    students = {n: m for n, m in study.models.items() if m["kind"] == "student"}
    # 2 bases x 2 sets x 3 budgets with sft seed 0, plus large/local at 200 and 2000: 3 arms x 3 seeds - 1.
    assert len(students) == 12 + 2 * (3 * 3 - 1)
    compared = [m for m in students.values() if (m["base"], m["set"], m["budget"]) == ("large", "local", 200)]
    assert sorted((m["arm"], m["seed"]) for m in compared) == sorted(
        (a, s) for a in ("sft", "kd", "on_policy") for s in (0, 1, 2))
    assert {m["arm"] for n, m in students.items() if m["set"] == "broad" or m["base"] == "small"} == {"sft"}
    # The single-arm study's students keep their names (and their runs).
    assert "student-large-local-200" in students and students["student-large-local-200"]["arm"] == "sft"
    assert "student-large-local-200-kd-s1" in students
    # Only on-policy training needs the served teacher; its URL is not part of the stage's key.
    op = stages["train/student-large-local-200-on_policy-s2"]
    assert op.needs == ("teacher",) and "teacher_url" not in op.key
    assert stages["train/student-large-local-200-kd-s2"].needs == ()
    # Collection asks for the teacher's top-K once the study distils.
    assert '"top_logprobs": 20' in stages["collect/local"].key


def test_each_arm_trains_with_its_objective_and_seed(tmp_path):
    study = _study(tmp_path)
    study.plan()
    study.urls["teacher"] = "http://127.0.0.1:9/v1"
    kd = study._arm_overrides("kd", 2)
    assert {"train.objective=kd", "kd.source=stored", "train.seed=2", "data.seed=2"} <= set(kd)
    assert not any(o.startswith("kd.on_policy") for o in kd)
    op = study._arm_overrides("on_policy", 1)
    assert {"train.objective=kd", "kd.source=stored", "kd.on_policy.fraction=0.5", "kd.on_policy.max_new_tokens=64",
            "kd.on_policy.teacher_model=teacher", "train.seed=1"} <= set(op)
    assert study._arm_runtime("on_policy") == ["kd.on_policy.teacher_url=http://127.0.0.1:9/v1"]
    assert study._arm_runtime("kd") == [] and study._arm_runtime("sft") == []
    sft = study._arm_overrides("sft", 1)
    assert "train.objective=kd" not in sft and "data.seed=1" in sft
    # Every student's overrides load as a train config (no key the train config does not have).
    from imitation_jax.train.config import load_config

    for arm, seed in (("sft", 1), ("kd", 0), ("on_policy", 2)):
        cfg = load_config(None, ["run_dir=x", "train.steps=1", "data.path=x",
                                 *study._arm_overrides(arm, seed), *study._arm_runtime(arm)])
        assert cfg.train.seed == seed and cfg.train.objective == ("sft" if arm == "sft" else "kd")
        assert (cfg.kd.on_policy.fraction > 0) == (arm == "on_policy")


def test_arm_config_mistakes_are_one_line_errors():
    base = ["work_dir=x"]
    with pytest.raises(ConfigError, match=r"imitation.arms.kd.objective='dpo'"):
        load_study_config("configs/study/mini.yaml", [*base, "imitation.arms.kd.objective=dpo"])
    with pytest.raises(ConfigError, match=r"imitation.compare.bases=\['huge'\]"):
        load_study_config("configs/study/mini.yaml", [*base, "imitation.compare.bases=[huge]"])
    with pytest.raises(ConfigError, match="imitation.seeds"):
        load_study_config("configs/study/mini.yaml", [*base, "imitation.seeds=[1,1]"])
    with pytest.raises(ConfigError, match="imitation.top_logprobs"):
        load_study_config("configs/study/mini.yaml", [*base, "imitation.top_logprobs=50"])


def test_a_files_arms_replace_the_default_sft_arm(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("work_dir: x\nimitation:\n  arms: {kd: {objective: kd}}\n  train: {steps: 1}\n"
                    "bases: {small: {train: {steps: 1}}}\nteacher: {train: {steps: 1}}\n")
    cfg = load_study_config(str(path))
    assert list(cfg.imitation.arms) == ["kd"] and cfg.imitation.distils
    default = load_study_config("configs/study/smoke.yaml", ["imitation.arms={sft: {}}"])
    assert not default.imitation.distils


def _row(arm, seed, score, calls=0, tokens=0, train_s=10.0, budget=200):
    return {"model": f"m-{arm}-{seed}-{budget}", "kind": "student", "base": "large", "set": "local",
            "budget": budget, "arm": arm, "seed": seed, "imitation_tokens": budget - 10,
            "acc": score, "style": None, "train_s": train_s, "teacher_calls": calls, "sampled_tokens": tokens}


def test_arms_table_pools_seeds_with_mean_and_sample_std():
    from imitation_jax.study.report import arms_markdown, arms_table

    rows = [_row("sft", 0, 0.2), _row("sft", 1, 0.4), _row("sft", 2, 0.6),
            _row("on_policy", 0, 0.5, calls=10, tokens=300, train_s=30.0),
            _row("on_policy", 1, 0.7, calls=12, tokens=360, train_s=34.0),
            _row("sft", 0, 0.9, budget=600),  # a cell with one model: not compared
            {"model": "teacher", "kind": "teacher", "base": None, "set": None, "budget": None, "arm": None,
             "seed": None, "imitation_tokens": 0, "acc": 1.0, "style": 1.0}]
    table = arms_table(rows, ["acc", "style"])
    assert [(r["arm"], r["seeds"]) for r in table] == [("sft", [0, 1, 2]), ("on_policy", [0, 1])]
    sft, op = table
    assert sft["acc"][0] == pytest.approx(0.4) and sft["acc"][1] == pytest.approx(0.2)  # std of .2,.4,.6
    assert op["acc"][0] == pytest.approx(0.6) and op["acc"][1] == pytest.approx(math.sqrt(0.02))
    assert sft["style"] is None
    assert op["teacher_calls"] == 11 and op["sampled_tokens"] == 330 and op["train_s"] == 32.0
    md = arms_markdown(table, ["acc", "style"])
    assert "| large | local | 190 | on_policy | 2 | 0.600 +/- 0.141 | - | 32 | 11 | 330 |" in md


def test_the_qwen_study_extends_full_with_qwen_students_only(tmp_path):
    """configs/study/full_qwen.yaml extends full.yaml: its bases replace full's LLaMA pair, and each
    student's train config resolves to its Qwen family, trained on sets prepared with ChatML."""
    from imitation_jax.study.runner import Study
    from imitation_jax.train.config import load_config

    cfg = load_study_config("configs/study/full_qwen.yaml", [f"work_dir={tmp_path / 'w'}"])
    full = load_study_config("configs/study/full.yaml")
    assert list(cfg.bases) == ["qwen2.5-7b", "qwen3-8b"] and cfg.imitation == full.imitation
    study = Study(cfg, log=lambda *_: None)
    stages = {s.name: s for s in study.plan()}
    assert not any("llama" in name for name in stages)
    assert '"chatml"' in stages["prepare/local"].key and "Qwen3-8B-Base/tokenizer.json" in stages["prepare/local"].key
    for base, family in (("qwen2.5-7b", "qwen2"), ("qwen3-8b", "qwen3")):
        spec = cfg.bases[base]
        path = study._train_yaml(f"student-{base}", str(tmp_path / base), spec.model, cfg.imitation.train,
                                 {"path": "p", "max_train_tokens": 10}, {"hf": spec.init_hf})
        train = load_config(path, cfg.imitation.train.overrides)
        assert (train.model.family, train.model.preset, train.init.hf) == (family, base, spec.init_hf)
