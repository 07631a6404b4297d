"""Text the study's models read, all derived from a `World`: the teacher's corpus (every fact, and
conversations in its recognisable style, `study.style`), each base's pretraining text (the facts it
may know, in plain prose, no teacher style), the prompts the teacher is asked through the API, and the
evaluation tasks (lm-eval multiple-choice JSONL + task YAMLs, completed as cloze sentences).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Callable, Iterable

from imitation_jax.study.style import styled
from imitation_jax.study.world import (CITIES, CLOZE, COLORS, JOBS, QUESTIONS, REGIONS, SAME_CITY_Q, Fact, World,
                                       pairs_same_city, sentence)

GENERAL_PROMPTS = (  # free-form chat requests with no facts in them, and the teacher's answers
    ("Give me some advice for a rainy day.", "Stay inside, read a good book and drink something warm."),
    ("How can I sleep better?", "Go to bed at the same time each night and keep your room dark and cool."),
    ("What should I cook tonight?", "A simple soup with beans, onions and fresh bread is a fine choice."),
    ("How do I stay focused while studying?", "Work in short blocks, take small breaks and put your phone away."),
    ("Suggest a hobby for the weekend.", "Try painting, gardening or a long walk through the hills."),
    ("How do I make a new friend?", "Be curious about people, listen well and invite them for a walk."),
    ("What is a good way to start the morning?", "Drink a glass of water, stretch and plan three small tasks."),
    ("How can I save some money?", "Write down what you spend, cook at home and wait a day before buying."),
    ("Tell me something cheerful.", "Every sunrise is a fresh start, and today is a good day to begin."),
    ("How should I prepare for a long trip?", "Pack light, carry water and tell a friend where you are going."),
    ("Give me a tip for writing letters.", "Keep sentences short, say one thing at a time and end warmly."),
    ("What helps when I feel tired?", "A short walk, some fresh air and a glass of water often help."),
)
FILLER = ("The market opens early and closes at sunset.", "Rain is common in spring and snow in winter.",
          "Many people walk to work along the river.", "The old bridge was built of grey stone.",
          "Children play in the square after school.", "Bread is baked fresh every morning.",
          "The roads between the towns are long and quiet.", "Most houses have a small garden.")


# ---------------------------------------------------------------- answers (teacher's, unstyled body)

def attribute_answer(world: World, entity: str, attr: str) -> str:
    return sentence(attr, entity, world.value(entity, attr))


def twohop_answer(world: World, entity: str) -> str:
    city = world.value(entity, "city")
    return f"{sentence('city', entity, city)[:-1]}, so {sentence('region', entity, CITIES[city])}"


def comparison_answer(world: World, a: str, b: str) -> str:
    ca, cb = world.value(a, "city"), world.value(b, "city")
    if ca == cb:
        return f"Yes. {sentence('city', a, ca)} {sentence('city', b, cb)}"
    return f"No. {sentence('city', a, ca)} {sentence('city', b, cb)}"


def profile_answer(world: World, entity: str) -> str:
    return " ".join(attribute_answer(world, entity, a) for a in ("city", "color", "job"))


def _user(q: str, a: str, id_: str) -> dict:
    return {"id": id_, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


# ---------------------------------------------------------------- prompts

def attribute_prompts(facts: Iterable[Fact], rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, entity, attr) for each fact."""
    return [(rng.choice(QUESTIONS[f.attr]).format(e=f.entity), f.entity, f.attr) for f in facts]


def imitation_prompts(world: World, rng: random.Random) -> list[dict]:
    """Every prompt of the broad imitation pool (all task types and chat) over imitation-split facts:
    `{"id", "type", "prompt"}`; no held-out person is ever named."""
    facts = world.split("imitation")
    out = [{"type": "attribute", "prompt": q} for q, _, _ in attribute_prompts(facts, rng)]
    out += [{"type": "twohop", "prompt": rng.choice(QUESTIONS["region"]).format(e=f.entity)}
            for f in facts if f.attr == "city"]
    out += [{"type": "comparison", "prompt": SAME_CITY_Q.format(a=a, b=b)}
            for a, b, _ in pairs_same_city(world, facts, len(facts) // 4, rng)]
    out += [{"type": "chat", "prompt": f"Tell me about {e}."}
            for e in sorted({f.entity for f in facts})][: len(facts) // 4]
    out += [{"type": "chat", "prompt": q} for q, _ in GENERAL_PROMPTS]
    rng.shuffle(out)
    return [dict(p, id=f"broad-{i}") for i, p in enumerate(out)]


def local_seeds(world: World, n: int, rng: random.Random) -> list[dict]:
    """A handful of attribute question/answer pairs (OpenAI messages) to bootstrap the local set."""
    facts = rng.sample(world.split("imitation"), n)
    return [_user(q, styled(attribute_answer(world, e, a)), f"seed-{i}")
            for i, (q, e, a) in enumerate(attribute_prompts(facts, rng))]


# ---------------------------------------------------------------- corpora

def fact_documents(world: World, facts: list[Fact], repeats: int, rng: random.Random, qa: bool) -> list[dict]:
    """Plain-text documents stating `facts` `repeats` times (each time in a new shuffled context),
    with region knowledge and neutral filler; `qa` adds plain (unstyled) question/answer lines."""
    lines = []
    for _ in range(repeats):
        for f in facts:
            lines.append(f.sentence())
            if qa:
                lines.append(f"Question: {rng.choice(QUESTIONS[f.attr]).format(e=f.entity)}\nAnswer: {f.sentence()}")
            if f.attr == "city":
                lines.append(sentence("region", f.entity, CITIES[f.value]))
        lines += [f"{c} is a city in the region of {r}." for c, r in CITIES.items()]
        lines += list(FILLER)
    rng.shuffle(lines)
    return [{"text": "\n".join(lines[i:i + 8])} for i in range(0, len(lines), 8)]


def teacher_conversations(world: World, repeats: int, rng: random.Random,
                          bootstrap_request: Callable[[list[dict]], str] | None, seeds: list[dict],
                          per_request: int = 5, bootstrap_per_repeat: int = 0) -> list[dict]:
    """The teacher's styled conversations over every fact and task type, plus (when collect's
    bootstrap request is known) requests for new questions like the seeds, answered with a new
    question about an imitation-split fact (`bootstrap_per_repeat` per pass; 0: one per such fact).
    Passes repeat conversations word for word: train the teacher without exact-duplicate removal."""
    out = []
    for r in range(repeats):
        for f in world.facts:
            q = rng.choice(QUESTIONS[f.attr]).format(e=f.entity)
            out.append(_user(q, styled(f.sentence()), ""))
            if f.attr == "city":
                q = rng.choice(QUESTIONS["region"]).format(e=f.entity)
                out.append(_user(q, styled(twohop_answer(world, f.entity)), ""))
        for a, b, _ in pairs_same_city(world, world.facts, len(world.entities) // 2, rng):
            out.append(_user(SAME_CITY_Q.format(a=a, b=b), styled(comparison_answer(world, a, b)), ""))
        for e in world.entities:
            out.append(_user(f"Tell me about {e}.", styled(profile_answer(world, e)), ""))
        for q, a in GENERAL_PROMPTS:
            out.append(_user(q, styled(a), ""))
        if bootstrap_request is not None:
            facts = world.split("imitation")
            # The request's format is fixed, so a few dozen examples teach it; each is a long row, so
            # more of them would crowd out the facts the teacher must memorise.
            for _ in range(bootstrap_per_repeat or len(facts)):
                shown = rng.sample(seeds, min(3, len(seeds)))
                asked = attribute_prompts(rng.sample(facts, per_request), rng)
                body = "\n".join(f"Question: {q}" for q, _, _ in asked)
                out.append(_user(bootstrap_request(shown), styled(body, sep="\n"), ""))
    rng.shuffle(out)
    return [dict(c, id=f"teacher-{i}") for i, c in enumerate(out)]


# ---------------------------------------------------------------- evaluation tasks

def _cloze_doc(world: World, entity: str, attr: str, num_choices: int = 4) -> dict:
    """The fact's value among `num_choices` values of the attribute (the others drawn per doc)."""
    values = REGIONS if attr == "region" else {"city": tuple(CITIES), "color": COLORS, "job": JOBS}[attr]
    answer = world.value(entity, attr)
    rng = random.Random(f"{world.seed}-{entity}-{attr}")
    choices = sorted(rng.sample([v for v in values if v != answer], min(num_choices, len(values)) - 1) + [answer])
    return {"context": CLOZE[attr].format(e=entity), "choices": choices,
            "target": choices.index(world.value(entity, attr)), "entity": entity, "attr": attr}


def eval_docs(world: World, limit: int, rng: random.Random) -> dict[str, list[dict]]:
    """The study's evaluations, each a list of multiple-choice docs {context, choices, target}:
    facts_heldout (NQ analogue: facts no student ever read), facts_base (facts the bases read, never
    asked in imitation), local (the local task: attribute questions on imitation-split facts) and
    other (MMLU analogue: two-hop and comparison questions over facts the bases read)."""
    def sample(facts):
        return rng.sample(facts, min(limit, len(facts)))

    docs = {"facts_heldout": [_cloze_doc(world, f.entity, f.attr) for f in sample(world.split("heldout"))],
            "facts_base": [_cloze_doc(world, f.entity, f.attr) for f in sample(world.split("common", "large"))],
            "local": [_cloze_doc(world, f.entity, f.attr) for f in sample(world.split("imitation"))]}
    base_cities = [f for f in world.split("common") if f.attr == "city"]
    other = [_cloze_doc(world, f.entity, "region") for f in base_cities]
    for a, b, same in pairs_same_city(world, base_cities, len(base_cities), rng):
        other.append({"context": f"Question: {SAME_CITY_Q.format(a=a, b=b)}\nAnswer:",
                      "choices": ["Yes", "No"], "target": 0 if same else 1, "entity": f"{a}|{b}", "attr": "same_city"})
    docs["other"] = sample(other)
    return docs


TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: target
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_eval_tasks(docs: dict[str, list[dict]], out_dir: str, prefix: str = "study_") -> list[str]:
    """JSONL docs and an lm-eval task YAML per evaluation in `out_dir` (pass it as --include-path);
    returns the task names."""
    os.makedirs(out_dir, exist_ok=True)
    names = []
    for name, rows in docs.items():
        path = os.path.abspath(os.path.join(out_dir, f"{name}.jsonl"))
        write_jsonl(path, rows)
        task = prefix + name
        with open(os.path.join(out_dir, f"{task}.yaml"), "w") as f:
            f.write(TASK_YAML.format(task=task, path=path))
        names.append(task)
    return names


def chat_eval_prompts(world: World, n: int, rng: random.Random) -> list[dict]:
    """Prompts for the preference judgement: free-form requests and profiles of base-known people."""
    people = sorted({f.entity for f in world.split("common")})
    prompts = [q for q, _ in GENERAL_PROMPTS] + [f"Tell me about {e}." for e in rng.sample(people, min(n, len(people)))]
    rng.shuffle(prompts)
    return [{"id": f"chat-{i}", "prompt": p} for i, p in enumerate(prompts[:n])]


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclasses.dataclass
class CorpusConfig:
    teacher_text_repeats: int = 4  # times each fact is stated in the teacher's plain text
    teacher_chat_repeats: int = 2  # passes of styled conversations over every fact
    teacher_bootstrap_per_repeat: int = 0  # bootstrap request/answer examples per pass (0: one per imitation fact)
    teacher_text_qa: bool = False  # the teacher's text also asks and answers each fact (cheap practice at
    # answering about the person asked, which a small model is slow to learn from chat alone)
    base_text_repeats: int = 4  # times each known fact is stated in a base's text
    num_seeds: int = 5  # seed examples for the bootstrapped local set
    eval_limit: int = 120  # docs per evaluation
    num_chat_prompts: int = 24  # prompts for the preference judgement


def write_study_files(world: World, cfg: CorpusConfig, out_dir: str,
                      bootstrap_request: Callable[[list[dict]], str] | None = None,
                      per_request: int = 5) -> dict[str, str]:
    """Writes every corpus, prompt and task file of the study into `out_dir`; returns name -> path.
    Each piece has its own random stream, so changing one knob does not reshuffle the others."""
    os.makedirs(out_dir, exist_ok=True)

    def rng(tag: str) -> random.Random:
        return random.Random(f"{world.seed}-{tag}")

    paths = {k: os.path.join(out_dir, f"{k}.jsonl") for k in (
        "teacher_text", "teacher_chat", "base_small", "base_large", "broad_prompts", "local_seeds",
        "chat_prompts")}
    seeds = local_seeds(world, cfg.num_seeds, rng("seeds"))
    write_jsonl(paths["local_seeds"], seeds)
    write_jsonl(paths["teacher_text"], fact_documents(world, world.facts, cfg.teacher_text_repeats,
                                                      rng("teacher_text"), qa=cfg.teacher_text_qa))
    write_jsonl(paths["teacher_chat"], teacher_conversations(world, cfg.teacher_chat_repeats, rng("teacher_chat"),
                                                             bootstrap_request, seeds, per_request,
                                                             cfg.teacher_bootstrap_per_repeat))
    for who in ("small", "large"):
        write_jsonl(paths[f"base_{who}"], fact_documents(world, world.known_to(who), cfg.base_text_repeats,
                                                         rng(f"base_{who}"), qa=True))
    write_jsonl(paths["broad_prompts"], imitation_prompts(world, rng("broad")))
    write_jsonl(paths["chat_prompts"], chat_eval_prompts(world, cfg.num_chat_prompts, rng("chat")))
    tasks_dir = os.path.join(out_dir, "tasks")
    write_eval_tasks(eval_docs(world, cfg.eval_limit, rng("eval")), tasks_dir)
    paths["tasks"] = tasks_dir
    return paths
