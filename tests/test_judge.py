"""judge against a local endpoint with scripted verdicts: rates, order swap, intervals."""

from __future__ import annotations

import json
import re

import pytest

from imitation_jax.cli import main
from imitation_jax.collect.judge import parse_verdict, read_answers, wilson
from openai_fake import fake_openai, serve_in_thread

# Per prompt: how the scripted judge behaves and the outcome for A it must produce after the swap.
SCRIPT = {
    "a-better": ("prefers GOOD", "win"),
    "a-better-2": ("prefers GOOD", "win"),
    "a-better-3": ("prefers GOOD", "win"),
    "b-better": ("prefers GOOD", "loss"),
    "first-always": ("says A", "tie"),  # pure position bias cancels out
    "second-always": ("says B", "tie"),
    "tie": ("says C", "tie"),
    "half": ("prefers GOOD once, C once", "win"),  # +1 and 0
    "mute": ("no verdict", "undecided"),
}


def judge_reply(body: dict) -> str:
    text = body["messages"][-1]["content"]
    pid = re.search(r"question id (\S+)", text).group(1)
    first = text.split("[The start of assistant A's answer]\n")[1].split("\n[The end")[0]
    behaviour = SCRIPT[pid][0]
    if behaviour == "prefers GOOD":
        return "Reasoning... " + ("[[A]]" if "GOOD" in first else "[[B]]")
    if behaviour == "prefers GOOD once, C once":
        return "[[A]]" if "GOOD" in first else "[[C]]"  # A is GOOD: shown first -> A; second -> tie
    return {"says A": "[[A]]", "says B": "I pick [[B]]", "says C": "Equal. [[C]]",
            "no verdict": "Both are fine."}[behaviour]


def write_answers(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    with open(a, "w") as fa, open(b, "w") as fb:
        for pid in SCRIPT:
            good_a = pid != "b-better"
            prompt = f"question id {pid} ünïcode"
            # A as `collect` writes it
            fa.write(json.dumps({"id": pid, "messages": [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": "GOOD answer" if good_a else "weak answer"}]}) + "\n")
            # B as `generate` writes it: messages ending with the answer, plus prompt and completion
            b_text = "weak answer" if good_a else "GOOD answer"
            fb.write(json.dumps({"id": pid, "messages": [{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": prompt},
                                                         {"role": "assistant", "content": b_text}],
                                 "prompt": prompt, "completion": b_text}) + "\n")
        fb.write(json.dumps({"id": "only-b", "prompt": "x", "completion": "y"}) + "\n")
    return str(a), str(b)


def test_judge_rates_with_order_swap(tmp_path, capsys):
    a, b = write_answers(tmp_path)
    app = fake_openai(judge_reply)
    out = tmp_path / "report.json"
    with serve_in_thread(app) as url:
        rc = main(["judge", "--a", a, "--b", b, "--base-url", url + "/v1", "--model", "judge",
                   "--out", str(out), "--quiet", "--concurrency", "4"])
    printed = capsys.readouterr().out
    assert rc == 0
    report = json.loads(out.read_text())
    assert app.state.calls == 2 * len(SCRIPT)  # every pair asked in both orders
    assert all(b["temperature"] == 0.0 for b in app.state.bodies)
    outcomes = {j["id"]: j["outcome"] for j in report["judgements"]}
    assert outcomes == {pid: want for pid, (_, want) in SCRIPT.items()}
    n = sum(want != "undecided" for _, want in SCRIPT.values())
    counts = {k: sum(want == k for _, want in SCRIPT.values()) for k in ("win", "tie", "loss")}
    assert report["n"] == n == 8 and report["undecided"] == 1 and report["only_in_b"] == 1
    from scipy.stats import binomtest

    for key, k in counts.items():
        assert report[key]["count"] == k
        assert report[key]["rate"] == pytest.approx(k / n)
        ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert report[key]["ci95"] == pytest.approx([ref.low, ref.high], abs=1e-6)
    assert report["score"]["value"] == pytest.approx((counts["win"] + counts["tie"] / 2) / n)
    lo, hi = report["score"]["ci95"]
    assert lo < report["score"]["value"] < hi
    # agreeing orders: the four GOOD-preferring prompts and the tie; position bias shows as disagreement
    assert report["position"]["orders_agree"] == pytest.approx(5 / 8)
    assert "A wins" in printed and "B wins" in printed and "ties" in printed


def test_verdict_parsing_and_wilson():
    assert parse_verdict("[[A]] at first, but on reflection [[B]]") == "B"
    assert parse_verdict("no verdict") is None
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)


def test_read_answers_errors(tmp_path):
    from imitation_jax.errors import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "q"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1: needs the prompt"):
        read_answers(str(bad))
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"id": 1, "prompt": "q", "completion": "c"}\n')
    assert read_answers(str(plain))["1"].prompt == ({"role": "user", "content": "q"},)
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": 1, "prompt": "another q", "completion": "c"}\n')
    with pytest.raises(DataError, match="questions .* differ"):
        from imitation_jax.collect.judge import judge
        judge(str(plain), str(other), model="j", base_url="http://127.0.0.1:9/v1", progress=False)
