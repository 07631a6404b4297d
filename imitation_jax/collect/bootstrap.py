"""Local-imitation bootstrapping: ask the teacher for new questions like a few seed Q/A pairs.

The reference study built its task-specific imitation set this way (~6K Natural-Questions-like
examples from a handful of seeds). Each request shows the teacher `--examples-per-request` seed
pairs drawn at random and asks for `--per-request` new questions; the answers are then collected
with `collect`, so the new questions get the same provenance as any other prompt.

Duplicates are removed as they arrive: exact ones after normalising case, spacing and
punctuation, near ones by sentence BLEU (sacrebleu) against every kept question (seeds
included), taking the larger of the two directions, above `threshold`. To keep that cheap for
thousands of questions, BLEU is only computed against the kept questions that share a word bigram
with the candidate (a near duplicate always does).

Accepted questions are appended (fsynced) to a prompts file as `{"id", "prompt", "source":
"bootstrap"}`; a re-run reads it back and only asks for what is still missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import collections
import json
import random
import re
import sys

from imitation_jax.collect.client import HttpStats, bounded_map, describe_error, is_fatal, make_client
from imitation_jax.collect.collect import JsonlAppender, stable_id
from imitation_jax.errors import DataError
from imitation_jax.data.readers import jsonl_records

_LINE = re.compile(r"^\s*(?:question\s*\d*\s*[:.)-]|\d+\s*[.):-]|[-*•])\s*(.+?)\s*$", re.IGNORECASE)


def read_seeds(path: str) -> list[tuple[str, str]]:
    """(question, answer) pairs: `{"question"|"prompt"|"instruction", "answer"|"output"}` or
    OpenAI messages (the first user turn and the assistant turn after it)."""
    seeds = []
    for where, r in jsonl_records(path):
        q = a = None
        if isinstance(r, dict) and isinstance(r.get("messages"), list):
            turns = [m for m in r["messages"] if isinstance(m, dict)]
            users = [i for i, m in enumerate(turns) if m.get("role") == "user"]
            if users and users[0] + 1 < len(turns) and turns[users[0] + 1].get("role") == "assistant":
                q, a = turns[users[0]].get("content"), turns[users[0] + 1].get("content")
        elif isinstance(r, dict):
            q = r.get("question", r.get("prompt", r.get("instruction")))
            a = r.get("answer", r.get("output", r.get("response")))
        if not (isinstance(q, str) and q.strip() and isinstance(a, str) and a.strip()):
            raise DataError(f"{where}: a seed needs a question and an answer (question/answer "
                            f"keys, or messages with a user turn and a reply)", "missing_field")
        seeds.append((q.strip(), a.strip()))
    if not seeds:
        raise DataError(f"{path}: no seed examples", "empty")
    return seeds


def generation_messages(examples: list[tuple[str, str]], count: int) -> list[dict]:
    shots = "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in examples)
    return [{"role": "user", "content":
             f"Here are some example questions with their answers:\n\n{shots}\n\n"
             f"Write {count} new questions of the same kind, style and difficulty, about different "
             f"topics, and different from the examples and from each other. Write only the "
             f"questions, one per line, each line starting with \"Question: \"."}]


def parse_questions(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and len(m.group(1)) > 3:
            out.append(m.group(1))
    return out


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


class Deduper:
    """Keeps questions that are neither exact nor near (BLEU >= threshold) duplicates of kept ones."""

    def __init__(self, threshold: float):
        from sacrebleu.metrics import BLEU

        self.threshold = threshold
        self._bleu = BLEU(effective_order=True)
        self._exact: set[str] = set()
        self._kept: list[str] = []
        self._index: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
        self.exact_dropped = 0
        self.near_dropped = 0

    @staticmethod
    def _bigrams(norm: str) -> set[tuple[str, str]]:
        words = norm.split()
        return set(zip(words, words[1:])) or {(w, "") for w in words}

    def similarity(self, a: str, b: str) -> float:
        return max(self._bleu.sentence_score(a, [b]).score, self._bleu.sentence_score(b, [a]).score) / 100

    def add(self, question: str) -> bool:
        norm = _normalise(question)
        if not norm or norm in self._exact:
            self.exact_dropped += 1
            return False
        grams = self._bigrams(norm)
        near = {i for g in grams for i in self._index.get(g, ())}
        if any(self.similarity(norm, self._kept[i]) >= self.threshold for i in near):
            self.near_dropped += 1
            return False
        self._exact.add(norm)
        for g in grams:
            self._index[g].append(len(self._kept))
        self._kept.append(norm)
        return True


def read_generated(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    questions = []
    for line in lines:
        try:
            questions.append(json.loads(line)["prompt"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a crash: that question is simply asked for again
    return questions


async def _generate(seeds, prompts_path, num, *, model, base_url, per_request, examples_per_request,
                    temperature, max_tokens, concurrency, threshold, seed, timeout, max_retries,
                    progress) -> dict:
    from tqdm import tqdm

    dedup = Deduper(threshold)
    for q, _ in seeds:
        dedup.add(q)
    existing = read_generated(prompts_path)
    kept = [q for q in existing if dedup.add(q)]
    if len(kept) < len(existing):  # torn line or an edited file: rewrite it clean
        with open(prompts_path, "w", encoding="utf-8") as f:
            for q in kept:
                f.write(json.dumps({"id": stable_id([{"role": "user", "content": q}]), "prompt": q,
                                    "source": "bootstrap"}, ensure_ascii=False) + "\n")
    dedup.exact_dropped = dedup.near_dropped = 0
    stats = HttpStats()
    client = make_client(base_url, timeout=timeout, max_retries=max_retries, stats=stats)
    writer = JsonlAppender(prompts_path)
    rng = random.Random(seed)
    max_requests = max(10, 5 * -(-num // per_request))
    counts = {"requests": 0, "failed": 0, "parsed": 0}
    bar = tqdm(total=num, initial=min(len(kept), num), desc="bootstrap", unit="question",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)

    def requests():
        for i in range(max_requests):
            if len(kept) >= num:
                return
            yield rng.sample(seeds, min(examples_per_request, len(seeds)))

    async def ask(examples):
        resp = await client.chat.completions.create(
            model=model, messages=generation_messages(examples, per_request),
            temperature=temperature, max_tokens=max_tokens)
        return (resp.choices[0].message.content or "") if resp.choices else ""

    try:
        async with contextlib.aclosing(bounded_map(ask, requests(), concurrency)) as finished:
            async for _, result in finished:
                counts["requests"] += 1
                if isinstance(result, BaseException):
                    if is_fatal(result):
                        raise DataError(f"{base_url}: {describe_error(result)}", "api_error")
                    counts["failed"] += 1
                    continue
                for q in parse_questions(result):
                    counts["parsed"] += 1
                    if len(kept) < num and dedup.add(q):
                        kept.append(q)
                        writer.write({"id": stable_id([{"role": "user", "content": q}]), "prompt": q,
                                      "source": "bootstrap"})
                        bar.update(1)
    finally:
        bar.close()
        writer.close()
        await client.close()
    return {**counts, "kept": len(kept), "exact_duplicates": dedup.exact_dropped,
            "near_duplicates": dedup.near_dropped, "http": stats.describe()}


def bootstrap_prompts(seed_path: str, prompts_path: str, num: int, *, model: str, base_url: str,
                      per_request: int = 10, examples_per_request: int = 3, temperature: float = 1.0,
                      max_tokens: int = 1024, concurrency: int = 8, threshold: float = 0.6,
                      seed: int = 0, timeout: float = 600.0, max_retries: int = 8,
                      progress: bool = True) -> dict:
    """Grows `prompts_path` to `num` new, deduplicated questions; returns counts."""
    seeds = read_seeds(seed_path)
    return asyncio.run(_generate(
        seeds, prompts_path, num, model=model, base_url=base_url, per_request=per_request,
        examples_per_request=examples_per_request, temperature=temperature, max_tokens=max_tokens,
        concurrency=concurrency, threshold=threshold, seed=seed, timeout=timeout,
        max_retries=max_retries, progress=progress))
