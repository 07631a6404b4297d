"""The imitation study: the synthetic world's fact splits, and the study pipeline end to end."""

from __future__ import annotations

import json
import os

import pytest

from imitation_jax.study.corpora import CorpusConfig, read_jsonl, write_study_files
from imitation_jax.study.style import OPENING
from imitation_jax.study.world import CLOZE, SPLITS, WorldConfig, build_world


@pytest.fixture(scope="module")
def world_files(tmp_path_factory):
    world = build_world(WorldConfig(num_entities=80, seed=3))
    out = str(tmp_path_factory.mktemp("world"))
    return world, write_study_files(world, CorpusConfig(eval_limit=40), out, bootstrap_request=lambda s: "NEW: " + s[0]["messages"][0]["content"])


def _texts(path: str) -> list[str]:
    rows = read_jsonl(path)
    return [r["text"] if "text" in r else " ".join(m["content"] for m in r.get("messages", [])) + r.get("prompt", "")
            for r in rows]


def test_world_is_deterministic_and_names_are_unambiguous():
    a, b = build_world(WorldConfig(seed=7)), build_world(WorldConfig(seed=7))
    assert a.entities == b.entities and a.facts == b.facts
    assert build_world(WorldConfig(seed=8)).facts != a.facts
    names = a.entities
    assert len(set(names)) == len(names) == 160
    assert not any(x != y and x in y for x in names for y in names)  # substring test finds exact mentions
    counts = {s: len(a.split(s)) for s in SPLITS}
    assert all(counts.values()), counts
    assert len(a.facts) == 3 * len(names)


def test_study_files_are_deterministic(tmp_path, world_files):
    world, paths = world_files
    again = write_study_files(build_world(WorldConfig(num_entities=80, seed=3)), CorpusConfig(eval_limit=40),
                              str(tmp_path), bootstrap_request=lambda s: "NEW: " + s[0]["messages"][0]["content"])
    for key, path in paths.items():
        if os.path.isfile(path):
            assert open(path).read() == open(again[key]).read(), key


def test_heldout_facts_appear_in_no_imitation_prompt_or_base_corpus(world_files):
    world, paths = world_files
    held = world.heldout_entities
    assert held
    for key in ("base_small", "base_large", "broad_prompts", "local_seeds"):
        for text in _texts(paths[key]):
            assert not any(e in text for e in held), (key, text)
    # ...while the teacher reads every one of them.
    teacher = "\n".join(_texts(paths["teacher_text"]))
    assert all(f.sentence() in teacher for f in world.split("heldout"))


def test_bases_know_only_their_facts_and_never_the_teachers_style(world_files):
    world, paths = world_files
    for who, known, unknown in (("small", ("common",), ("large", "imitation", "heldout")),
                                ("large", ("common", "large"), ("imitation", "heldout"))):
        corpus = "\n".join(_texts(paths[f"base_{who}"]))
        assert all(f.sentence() in corpus for f in world.split(*known))
        for f in world.split(*unknown):  # the fact in any wording: the cloze prefix followed by its value
            assert f"{CLOZE[f.attr].format(e=f.entity)} {f.value}" not in corpus, f
        assert OPENING not in corpus


def test_eval_tasks_ask_the_right_splits(world_files):
    world, paths = world_files
    docs = {name: read_jsonl(os.path.join(paths["tasks"], f"{name}.jsonl"))
            for name in ("facts_heldout", "facts_base", "local", "other")}
    want = {"facts_heldout": {"heldout"}, "facts_base": {"common", "large"}, "local": {"imitation"}}
    for name, splits in want.items():
        assert docs[name]
        for d in docs[name]:
            fact = world.by_key[(d["entity"], d["attr"])]
            assert fact.split in splits and d["context"] == CLOZE[fact.attr].format(e=fact.entity)
            assert d["choices"][d["target"]] == fact.value and len(set(d["choices"])) == len(d["choices"])
    for d in docs["other"]:  # reasoning over facts both bases read
        for e in d["entity"].split("|"):
            assert world.by_key[(e, "city")].split == "common"
        if d["attr"] == "region":
            assert d["choices"][d["target"]] == world.value(d["entity"], "region")
        else:
            a, b = d["entity"].split("|")
            assert d["choices"][d["target"]] == ("Yes" if world.value(a, "city") == world.value(b, "city") else "No")
    tasks = sorted(f for f in os.listdir(paths["tasks"]) if f.endswith(".yaml"))
    assert tasks == ["study_facts_base.yaml", "study_facts_heldout.yaml", "study_local.yaml", "study_other.yaml"]


# ---------------------------------------------------------------- stages, config, judge (fast)

def test_stages_rerun_only_what_changed(tmp_path):
    from imitation_jax.study.stages import Stage, StageState

    state = StageState(str(tmp_path / "state"))
    calls = []

    def make(name, deps=(), key=""):
        out = str(tmp_path / f"{name}.out")

        def run():
            calls.append(name)
            open(out, "w").write(name)
        return Stage(name, run, [out], list(deps), key=key)

    def run_all(stages):
        for s in stages:
            if not state.is_done(s):
                s.run()
                state.mark_done(s, 0.0)

    plan = [make("a"), make("b", ["a"]), make("c", ["a"]), make("d", ["b", "c"])]
    run_all(plan)
    assert calls == ["a", "b", "c", "d"]
    calls.clear()
    run_all(plan)
    assert calls == []  # a rerun redoes nothing
    os.remove(tmp_path / "b.out")  # an output gone: that stage and what used it
    run_all(plan)
    assert calls == ["b", "d"]
    calls.clear()
    run_all([make("a"), make("b", ["a"]), make("c", ["a"], key="new setting"), make("d", ["b", "c"])])
    assert calls == ["c", "d"]


def test_study_config_errors_name_the_key(tmp_path):
    from imitation_jax.errors import ConfigError
    from imitation_jax.study.config import load_study_config

    cfg = load_study_config("configs/study/mini.yaml", ["work_dir=x", "imitation.budgets=[10,100]",
                                                        "imitation.compare.budgets=[100]"])
    assert cfg.imitation.budgets == [10, 100] and set(cfg.bases) == {"small", "large"}
    with pytest.raises(ConfigError, match=r"imitation.compare.budgets=\[200, 2000\]"):  # mini's compared budgets
        load_study_config("configs/study/mini.yaml", ["work_dir=x", "imitation.budgets=[10,100]"])
    with pytest.raises(ConfigError, match="imitation.budget"):
        load_study_config("configs/study/mini.yaml", ["imitation.budget=3"])
    with pytest.raises(ConfigError, match="knows"):
        load_study_config("configs/study/mini.yaml", ["bases.small.knows=everything"])
    for name in ("mini", "smoke", "full"):
        load_study_config(f"configs/study/{name}.yaml")


def test_style_judge_prefers_the_teachers_markers():
    from imitation_jax.collect.judge import judge_messages, parse_verdict
    from imitation_jax.study.style import CLOSING, styled
    from imitation_jax.study.judge_server import verdict

    prompt = ({"role": "user", "content": "Tell me about Zapur."},)

    def ask(a, b):
        return parse_verdict(verdict(judge_messages(prompt, a, b)[1]["content"]))

    plain, half, full = "Zapur lives in the city of Veltor.", "Zapur. " + CLOSING, styled("Zapur lives in Veltor.")
    assert ask(full, plain) == "A" and ask(plain, full) == "B"
    assert ask(half, full) == "B" and ask(plain, plain) == "C"


def test_the_commands_the_study_runs_are_cli_commands(capsys):
    """The study drives the pipeline through `imitation-jax` subprocesses (it sits below the command
    layer, so it does not ask the CLI what exists): each subcommand it runs must be one."""
    from imitation_jax.cli import build_parser

    for command in ("train", "export-hf", "serve", "collect", "prepare", "eval", "generate", "judge", "plot"):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([command, "--help"])
        assert exit_.value.code == 0, command
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["no-such-command", "--help"])
    assert exit_.value.code == 2


# ---------------------------------------------------------------- the smoke study, end to end

def test_smoke_study_runs_resumes_and_recomputes_one_student(tmp_path, capsys):
    """configs/study/smoke.yaml through every stage (train, serve, collect, prepare, eval, generate,
    judge, report with plot); a rerun redoes nothing; deleting one student's checkpoints redoes
    exactly that student, its rows and the report."""
    from imitation_jax.study.config import load_study_config
    from imitation_jax.study.runner import Study

    cfg = load_study_config("configs/study/smoke.yaml", [f"work_dir={tmp_path / 'study'}"])
    first = Study(cfg, log=lambda *_: None).run()
    assert first["ran"] == first["stages"]
    table = json.load(open(tmp_path / "study" / "results" / "results.json"))
    rows = {r["model"]: r for r in table["rows"]}
    students = [n for n in rows if n.startswith("student-")]
    assert {"teacher", "base-small"} <= set(rows)
    assert sorted(students) == ["student-small-broad-300", "student-small-local-300",
                                "student-small-local-300-kd-s0", "student-small-local-300-on_policy-s0"]
    # The arms: kd trains on the teacher's stored top-K, on_policy also on its own samples scored by
    # the served teacher; the arms table has one row per arm of the compared cell.
    from omegaconf import OmegaConf

    runs = tmp_path / "study" / "runs"
    kd_cfg = OmegaConf.load(runs / "student-small-local-300-kd-s0" / "config.yaml")
    assert (kd_cfg.train.objective, kd_cfg.kd.source, kd_cfg.kd.on_policy.fraction) == ("kd", "stored", 0.0)
    stats = json.load(open(tmp_path / "study" / "imitation" / "prepared" / "local" / "stats.json"))
    assert stats["teacher_logprobs"]["k"] == cfg.imitation.top_logprobs
    assert [(r["arm"], r["seeds"]) for r in table["arms"]] == [("sft", [0]), ("kd", [0]), ("on_policy", [0])]
    op = table["arms"][2]
    assert op["teacher_calls"] == 3 and op["sampled_tokens"] > 0  # 3 steps x 1 on-policy row, each scored
    assert table["arms"][1]["teacher_calls"] == 0
    for r in rows.values():  # every cell computed by the pipeline
        assert all(isinstance(r[c], float) and 0.0 <= r[c] <= 1.0 for c in table["columns"]), r
    assert rows["teacher"]["style"] == 1.0  # the teacher judged against its own answers: all ties
    collected = [json.loads(line) for s in cfg.imitation.sets
                 for line in open(tmp_path / "study" / "imitation" / f"{s}.clean.jsonl")]
    assert collected and all("provenance" in r for r in collected)  # answers came through the API
    assert cfg.imitation.sets == ["local", "broad"]  # the bootstrapped local set is collected too,
    log = open(tmp_path / "study" / "logs" / "collect-local.log").read()  # with its request length
    assert f"--bootstrap-max-tokens {cfg.imitation.bootstrap_max_tokens}" in log
    world = Study(cfg).world
    assert not any(world.mentions_heldout(json.dumps(r["messages"])) for r in collected)

    again = Study(cfg, log=lambda *_: None).run()
    assert again["ran"] == []

    victim = students[0]
    import shutil

    shutil.rmtree(tmp_path / "study" / "runs" / victim / "checkpoints")
    third = Study(cfg, log=lambda *_: None).run()
    assert third["ran"] == [f"train/{victim}", f"eval/{victim}", f"answers/{victim}", f"style/{victim}", "report"]
    assert {r["model"] for r in json.load(open(tmp_path / "study" / "results" / "results.json"))["rows"]} == set(rows)


def test_teacher_bootstrap_examples_per_pass(tmp_path):
    """`teacher_bootstrap_per_repeat` request/answer pairs per chat pass, each answer asking about
    imitation-split people only (0: one per imitation fact)."""
    world = build_world(WorldConfig(num_entities=40, seed=1))
    imitation = {f.entity for f in world.split("imitation")}
    for per, want in ((3, 2 * 3), (0, 2 * len(world.split("imitation")))):
        paths = write_study_files(world, CorpusConfig(teacher_chat_repeats=2, teacher_bootstrap_per_repeat=per),
                                  str(tmp_path / str(per)), bootstrap_request=lambda s: "NEW: " + s[0]["messages"][0]["content"])
        asks = [r for r in read_jsonl(paths["teacher_chat"]) if r["messages"][0]["content"].startswith("NEW: ")]
        assert len(asks) == want
        for r in asks:
            named = [e for e in world.entities if e in r["messages"][1]["content"]]
            assert named and set(named) <= imitation
