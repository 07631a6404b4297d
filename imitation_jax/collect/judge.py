"""Pairwise judging of two systems' answers by a judge model behind an OpenAI-compatible API.

Answers are read from JSONL, matched by id: records of `collect` (`{"id", "messages"}`, the last
assistant message is the answer, the turns before it the prompt) or of `generate`
(`{"id", "prompt", "completion"|"response"|"answer"|"output"}`, or with "messages" too).

Every prompt is judged twice, once with A shown first and once with B first, so a judge that
favours a position cancels out. Each order gives +1 (A better), -1 (B better) or 0 (tie); the
prompt's outcome is the sign of the sum: A wins, B wins, or a tie (including the two orders
disagreeing). A verdict the judge does not state in the asked form leaves the prompt undecided
(counted, excluded from the rates). Rates get 95% Wilson intervals; the score
(wins + ties / 2) / n gets a bootstrap interval over prompts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import re
import sys

from imitation_jax.collect.client import HttpStats, bounded_map, describe_error, is_fatal, make_client
from imitation_jax.errors import DataError
from imitation_jax.data.readers import jsonl_records

JUDGE_SYSTEM = (
    "You are an impartial judge. Compare two AI assistants' answers to the user's question below "
    "and decide which answer is better: more helpful, relevant, accurate, detailed and clear. "
    "Do not let the order of the answers, their length or the assistants' names influence you. "
    "Explain briefly, then give your final verdict strictly in this form: \"[[A]]\" if assistant A "
    "is better, \"[[B]]\" if assistant B is better, \"[[C]]\" for a tie.")
_VERDICT = re.compile(r"\[\[([ABC])\]\]")
ANSWER_KEYS = ("completion", "response", "answer", "output")


@dataclasses.dataclass(frozen=True)
class Answer:
    id: str
    prompt: tuple[dict, ...]  # chat messages up to the answer
    text: str


def read_answers(path: str) -> dict[str, Answer]:
    answers: dict[str, Answer] = {}
    for where, r in jsonl_records(path):
        if not isinstance(r, dict) or r.get("id") in (None, ""):
            raise DataError(f'{where}: needs an "id" to match the other file\'s answers', "missing_field")
        text = next((r[k] for k in ANSWER_KEYS if isinstance(r.get(k), str)), None)
        msgs = r.get("messages")
        if isinstance(msgs, list) and msgs and all(isinstance(m, dict) for m in msgs):
            if msgs[-1].get("role") == "assistant":  # the answer (generate also repeats it as "completion")
                text = text if text is not None else msgs[-1].get("content")
                msgs = msgs[:-1]
            prompt = tuple({"role": m.get("role"), "content": m.get("content")} for m in msgs)
        elif isinstance(r.get("prompt"), str):
            prompt = ({"role": "user", "content": r["prompt"]},)
        else:
            prompt = ()
        if not isinstance(text, str) or not prompt:
            raise DataError(f"{where}: needs the prompt (\"prompt\" or \"messages\") and the answer "
                            f"({', '.join(ANSWER_KEYS)}, or a last assistant message)", "missing_field")
        answers[str(r["id"])] = Answer(str(r["id"]), prompt, text)
    return answers


def _question(answer: Answer) -> str:
    users = [m["content"] for m in answer.prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def _render_prompt(prompt: tuple[dict, ...]) -> str:
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role'].upper()}: {m['content']}" for m in prompt)


def judge_messages(prompt: tuple[dict, ...], first: str, second: str) -> list[dict]:
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content":
             f"[User question]\n{_render_prompt(prompt)}\n\n"
             f"[The start of assistant A's answer]\n{first}\n[The end of assistant A's answer]\n\n"
             f"[The start of assistant B's answer]\n{second}\n[The end of assistant B's answer]"}]


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'C' (tie): the last verdict marker in the reply, None without one."""
    found = _VERDICT.findall(text or "")
    return found[-1] if found else None


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_ci(scores: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    import numpy as np

    if not scores:
        return (0.0, 1.0)
    x = np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    return (float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975)))


def _a_view(verdict: str | None, a_first: bool) -> int | None:
    """+1 if system A was preferred, -1 if B, 0 for a tie, None if no verdict."""
    if verdict is None:
        return None
    if verdict == "C":
        return 0
    return 1 if (verdict == "A") == a_first else -1


def summarise(judgements: list[dict]) -> dict:
    """Rates from per-prompt records holding the verdicts "ab" (A shown first) and "ba"."""
    counts = {"win": 0, "tie": 0, "loss": 0}
    scores, first_chosen, decisive, agree, undecided = [], 0, 0, 0, 0
    for j in judgements:
        ab, ba = _a_view(j["ab"], True), _a_view(j["ba"], False)
        if ab is None or ba is None:
            j["outcome"] = "undecided"
            undecided += 1
            continue
        total = ab + ba
        j["outcome"] = "win" if total > 0 else "loss" if total < 0 else "tie"
        counts[j["outcome"]] += 1
        scores.append({"win": 1.0, "tie": 0.5, "loss": 0.0}[j["outcome"]])
        agree += ab == ba
        for v in (j["ab"], j["ba"]):
            if v != "C":
                decisive += 1
                first_chosen += v == "A"
    n = sum(counts.values())
    out = {"n": n, "undecided": undecided}
    for key, k in counts.items():
        lo, hi = wilson(k, n)
        out[key] = {"count": k, "rate": k / n if n else 0.0, "ci95": [lo, hi]}
    lo, hi = bootstrap_ci(scores)
    out["score"] = {"value": sum(scores) / n if n else 0.0, "ci95": [lo, hi],
                    "meaning": "(wins + ties/2) / n for A; 0.5 means no difference"}
    out["position"] = {"orders_agree": agree / n if n else 0.0,
                       "first_shown_chosen": first_chosen / decisive if decisive else 0.0}
    return out


async def _judge_all(pairs, *, model, base_url, concurrency, max_tokens, timeout, max_retries, progress):
    from tqdm import tqdm

    stats = HttpStats()
    client = make_client(base_url, timeout=timeout, max_retries=max_retries, stats=stats)
    jobs = [(i, order) for i in range(len(pairs)) for order in ("ab", "ba")]
    results: dict[tuple[int, str], dict] = {}
    bar = tqdm(total=len(jobs), desc="judge", unit="call", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)

    async def ask(job):
        i, order = job
        a, b = pairs[i]
        first, second = (a.text, b.text) if order == "ab" else (b.text, a.text)
        resp = await client.chat.completions.create(
            model=model, messages=judge_messages(a.prompt, first, second), temperature=0.0,
            max_tokens=max_tokens)
        return (resp.choices[0].message.content or "") if resp.choices else ""

    try:
        async with contextlib.aclosing(bounded_map(ask, jobs, concurrency)) as finished:
            async for job, result in finished:
                bar.update(1)
                if isinstance(result, BaseException):
                    if is_fatal(result):
                        raise DataError(f"{base_url}: {describe_error(result)}", "api_error")
                    results[job] = {"verdict": None, "error": describe_error(result)}
                else:
                    results[job] = {"verdict": parse_verdict(result), "reply": result}
    finally:
        bar.close()
        await client.close()
    return results, stats


def judge(a_path: str, b_path: str, *, model: str, base_url: str, concurrency: int = 8,
          max_tokens: int = 512, timeout: float = 600.0, max_retries: int = 8,
          progress: bool = True) -> dict:
    a, b = read_answers(a_path), read_answers(b_path)
    ids = [i for i in a if i in b]
    for i in ids:  # (system messages may differ between the systems; the question may not)
        if _question(a[i]) != _question(b[i]):
            raise DataError(f"id {i!r}: the questions in {a_path} and {b_path} differ", "prompt_mismatch")
    if not ids:
        raise DataError(f"{a_path} and {b_path} share no ids", "no_overlap")
    pairs = [(a[i], b[i]) for i in ids]
    results, stats = asyncio.run(_judge_all(pairs, model=model, base_url=base_url,
                                            concurrency=concurrency, max_tokens=max_tokens,
                                            timeout=timeout, max_retries=max_retries, progress=progress))
    judgements = []
    for k, i in enumerate(ids):
        ab, ba = results[(k, "ab")], results[(k, "ba")]
        judgements.append({"id": i, "ab": ab["verdict"], "ba": ba["verdict"],
                           "ab_reply": ab.get("reply", ab.get("error")),
                           "ba_reply": ba.get("reply", ba.get("error"))})
    report = {"a": a_path, "b": b_path, "judge": model, "only_in_a": len(a) - len(ids),
              "only_in_b": len(b) - len(ids), **summarise(judgements),
              "requests": stats.attempts, "http": stats.describe(), "judgements": judgements}
    return report


def describe(report: dict) -> str:
    lines = [f"judge {report['judge']}: A = {report['a']}  vs  B = {report['b']}",
             f"prompts judged: {report['n']} (both orders; {report['undecided']} undecided, "
             f"{report['only_in_a']} only in A, {report['only_in_b']} only in B)"]
    for key, name in (("win", "A wins"), ("tie", "ties"), ("loss", "B wins")):
        r = report[key]
        lines.append(f"  {name:7s} {r['count']:5d}  {100 * r['rate']:5.1f}%  "
                     f"(95% CI {100 * r['ci95'][0]:.1f}-{100 * r['ci95'][1]:.1f}%)")
    s = report["score"]
    lines.append(f"  score of A {s['value']:.3f} (95% CI {s['ci95'][0]:.3f}-{s['ci95'][1]:.3f}; 0.5 = even)")
    p = report["position"]
    lines.append(f"  orders agree {100 * p['orders_agree']:.1f}%, first-shown answer chosen in "
                 f"{100 * p['first_shown_chosen']:.1f}% of decisive verdicts")
    return "\n".join(lines)
