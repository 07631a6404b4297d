"""The imitation study: the synthetic world's fact splits, and the study pipeline end to end."""

from __future__ import annotations

import json
import os

import pytest

from imitation_jax.study.corpora import OPENING, CorpusConfig, read_jsonl, write_study_files
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
