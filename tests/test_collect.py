"""collect / bootstrap against local fake teachers (flaky, slow) and against `serve`."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from imitation_jax.cli import main
from imitation_jax.collect.bootstrap import Deduper, parse_questions
from imitation_jax.collect.collect import read_prompts
from imitation_jax.errors import DataError
from openai_fake import fake_openai, serve_in_thread

KOALA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "koala_test_set",
                     "koala_test_set.jsonl")
koala = pytest.mark.skipif(not os.path.exists(KOALA), reason="the Koala test set is not at ../shared/data")
SECRET = "sk-test-secret-key-never-written"


def expected_answer(body: dict) -> str:
    """What the fake teacher answers: a function of the last user message only."""
    digest = hashlib.sha256(body["messages"][-1]["content"].encode()).hexdigest()[:12]
    return f"answer {digest} ✓"


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def koala_subset(tmp_path, n: int) -> str:
    path = tmp_path / "prompts.jsonl"
    with open(KOALA, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()][:n]
    path.write_text("".join(lines), encoding="utf-8")
    return str(path)


def check_output(records: list[dict], prompts_path: str) -> None:
    """Exactly one record per prompt, each the prompt's messages plus the fake's answer."""
    prompts = {p.id: p for p in read_prompts(prompts_path)}
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "duplicate answers"
    assert set(ids) == set(prompts), "missing answers"
    for r in records:
        assert r["messages"][:-1] == list(prompts[r["id"]].messages)
        assert r["messages"][-1] == {"role": "assistant",
                                     "content": expected_answer({"messages": r["messages"][:-1]})}


@koala
def test_read_prompts_koala_and_messages(tmp_path):
    prompts = read_prompts(KOALA)
    assert len(prompts) == 180 and len({p.id for p in prompts}) == 180
    assert all(p.messages[-1]["role"] == "user" for p in prompts)
    other = tmp_path / "m.jsonl"
    other.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "old answer"}]}) + "\n\n"
                     + json.dumps({"prompt": "hello"}) + "\n")
    a, b = read_prompts(str(other), system="Be brief.")
    assert a.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"})
    assert a.id == read_prompts(str(other), system="Be brief.")[0].id  # stable hash ids
    assert a.id != b.id
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n{"messages": [{"role": "assistant", "content": "y"}]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: the messages must end with a user turn"):
        read_prompts(str(tmp_path / "bad.jsonl"))


@koala
def test_collect_through_random_429_and_500(tmp_path, monkeypatch, capsys):
    prompts = koala_subset(tmp_path, 40)
    out = tmp_path / "out.jsonl"
    app = fake_openai(expected_answer, fail_rate=0.35, seed=1)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with serve_in_thread(app) as url:
        rc = main(["collect", "--prompts", prompts, "--base-url", url + "/v1", "--model", "teacher",
                   "--out", str(out), "--concurrency", "6", "--max-tokens", "64", "--temperature", "0.7",
                   "--max-retries", "20", "--quiet"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    records = read_jsonl(out)
    check_output(records, prompts)
    assert app.state.calls > 40  # failures were retried
    prov = records[0]["provenance"]
    assert prov["teacher"] == "teacher-0613" and prov["requested_model"] == "teacher"
    assert prov["params"] == {"max_tokens": 64, "temperature": 0.7}
    assert prov["usage"]["prompt_tokens"] == 10 and prov["created"].endswith("+00:00")
    assert all(b["max_tokens"] == 64 and b["temperature"] == 0.7 for b in app.state.bodies)
    assert "429" in printed.out and "500" in printed.out and "answered:  40" in printed.out
    assert SECRET not in out.read_text() + printed.out + printed.err


@koala
def test_collect_resumes_after_kill(tmp_path):
    """SIGKILL a collect process midway (and tear its last line, as a crash mid-write would):
    the re-run completes the file with no duplicate and no gap."""
    prompts = koala_subset(tmp_path, 30)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "OPENAI_API_KEY": SECRET}
    with serve_in_thread(fake_openai(expected_answer, delay=0.15)) as url:
        cmd = [sys.executable, "-m", "imitation_jax.cli", "collect", "--prompts", prompts,
               "--base-url", url + "/v1", "--model", "teacher", "--out", str(out),
               "--concurrency", "2", "--quiet"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 6):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        partial = read_jsonl(out)
        assert 6 <= len(partial) < 30
        with open(out, "a") as f:
            f.write('{"id": "torn", "messa')  # a write cut short
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"({len(partial)} already in the output)" in rerun.stdout
    records = read_jsonl(out)
    check_output(records, prompts)
    assert records[:len(partial)] == partial  # earlier answers kept as they were


def test_collect_stops_on_auth_error(tmp_path, capsys):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat():
        return JSONResponse({"error": {"message": "bad key", "type": "invalid_request_error",
                                       "param": None, "code": "invalid_api_key"}}, status_code=401)

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": f"q{i}"}) + "\n" for i in range(5)))
    with serve_in_thread(app) as url:
        rc = main(["collect", "--prompts", str(prompts), "--base-url", url + "/v1", "--model", "m",
                   "--out", str(tmp_path / "o.jsonl"), "--quiet"])
    assert rc == 2 and "HTTP 401" in capsys.readouterr().err


def test_dedup_and_question_parsing():
    text = "Here you go:\nQuestion: Who wrote Hamlet?\n2. What is the capital of Peru?\n- Why is the sky blue?\nThanks"
    assert parse_questions(text) == ["Who wrote Hamlet?", "What is the capital of Peru?", "Why is the sky blue?"]
    d = Deduper(threshold=0.6)
    assert d.add("Who wrote the play Hamlet in the year 1600?")
    assert not d.add("who wrote the play hamlet in the year 1600")  # exact after normalising
    assert not d.add("Who wrote the play Hamlet in the year 1601?")  # near duplicate
    assert d.add("What is the boiling point of water at sea level?")
    assert (d.exact_dropped, d.near_dropped) == (1, 1)
    # the similarity is sacrebleu's sentence BLEU, the larger direction
    import sacrebleu
    a, b = "what is the tallest mountain in africa", "what is the tallest mountain in europe"
    assert d.similarity(a, b) == pytest.approx(max(sacrebleu.sentence_bleu(a, [b]).score,
                                                   sacrebleu.sentence_bleu(b, [a]).score) / 100)


def test_bootstrap_then_collect(tmp_path, capsys):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"question": f"Who discovered element {i}?", "answer": f"Person {i}."})
                             + "\n" for i in range(5)))
    counter = {"n": 0}

    def teacher(body):
        content = body["messages"][-1]["content"]
        if "new questions" not in content:
            return expected_answer(body)
        assert "Answer: Person" in content  # seed pairs are shown
        counter["n"] += 1
        k = counter["n"]
        return "\n".join([f"Question: What is the {k}th largest city of country {k}?",
                          f"Question: What is the {k}th largest city of country {k}?",  # exact dup
                          f"Question: What is the {k}th largest city of the country {k}?",  # near dup
                          "Question: Who discovered element 3?",  # a seed
                          f"Question: How many moons did planet {k} have in the year {k}00?"])

    out = tmp_path / "boot.jsonl"
    with serve_in_thread(fake_openai(teacher)) as url:
        rc = main(["collect", "--bootstrap", str(seeds), "--num", "12", "--base-url", url + "/v1",
                   "--model", "t", "--out", str(out), "--per-request", "5", "--concurrency", "1", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    generated = read_jsonl(tmp_path / "boot.prompts.jsonl")
    questions = [g["prompt"] for g in generated]
    assert len(questions) == 12 and len(set(questions)) == 12
    assert not any("element" in q for q in questions)
    assert not any("of the country" in q for q in questions)
    check_output(read_jsonl(out), str(tmp_path / "boot.prompts.jsonl"))
