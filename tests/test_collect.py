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
from imitation_jax.data import teacher_logprobs as tlp
from imitation_jax.data.readers import jsonl_records
from imitation_jax.errors import DataError
from openai_fake import fake_openai, serve_in_thread, toy_logprobs

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


def expected_logprobs(text: str, k: int) -> tlp.TeacherLogprobs:
    """What the fake teacher sends for `text`, read straight from its OpenAI-shaped JSON (a
    missing `bytes` is the token's UTF-8)."""
    def raw(item):
        return bytes(item["bytes"]) if item["bytes"] is not None else item["token"].encode()

    return tlp.TeacherLogprobs(k, tuple(
        tlp.Token(t["token"], raw(t), t["logprob"],
                  tuple(tlp.Alternative(a["token"], raw(a), a["logprob"]) for a in t["top_logprobs"]))
        for t in toy_logprobs(text, k)))


def check_output(records: list[dict], prompts_path: str, top_logprobs: int = 0) -> None:
    """Exactly one record per prompt, each the prompt's messages plus the fake's answer (and, with
    `top_logprobs`, exactly the logprobs the fake sent with it)."""
    prompts = {p.id: p for p in read_prompts(prompts_path)}
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "duplicate answers"
    assert set(ids) == set(prompts), "missing answers"
    for n, r in enumerate(records):
        assert r["messages"][:-1] == list(prompts[r["id"]].messages)
        answer = expected_answer({"messages": r["messages"][:-1]})
        last = dict(r["messages"][-1])
        stored = last.pop(tlp.FIELD, None)
        assert last == {"role": "assistant", "content": answer}
        if not top_logprobs:
            assert stored is None
            continue
        parsed = tlp.parse(r, f"out.jsonl:{n + 1}")
        assert parsed == {len(r["messages"]) - 1: expected_logprobs(answer, top_logprobs)}
        assert tlp.encode(parsed[len(r["messages"]) - 1]) == stored  # the stored form round-trips


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
@pytest.mark.parametrize("top_logprobs", [0, 5])
def test_collect_resumes_after_kill(tmp_path, top_logprobs):
    """SIGKILL a collect process midway (and tear its last line, as a crash mid-write would):
    the re-run completes the file with no duplicate and no gap."""
    prompts = koala_subset(tmp_path, 30)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "OPENAI_API_KEY": SECRET}
    with serve_in_thread(fake_openai(expected_answer, delay=0.15)) as url:
        cmd = [sys.executable, "-m", "imitation_jax.cli", "collect", "--prompts", prompts,
               "--base-url", url + "/v1", "--model", "teacher", "--out", str(out),
               "--concurrency", "2", "--quiet", "--top-logprobs", str(top_logprobs)]
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
    check_output(records, prompts, top_logprobs)
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


@pytest.mark.parametrize("top_logprobs", [0, 3])
def test_bootstrap_then_collect(tmp_path, capsys, top_logprobs):
    """--top-logprobs applies to the answer requests only, not to the question generation."""
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
    app = fake_openai(teacher)
    with serve_in_thread(app) as url:
        rc = main(["collect", "--bootstrap", str(seeds), "--num", "12", "--base-url", url + "/v1",
                   "--model", "t", "--out", str(out), "--per-request", "5", "--concurrency", "1", "--quiet",
                   "--top-logprobs", str(top_logprobs)])
    assert rc == 0, capsys.readouterr().err
    for body in app.state.bodies:
        generating = "new questions" in body["messages"][-1]["content"]
        asked = (body.get("logprobs"), body.get("top_logprobs"))
        assert asked == ((None, None) if generating or not top_logprobs else (True, top_logprobs))
    generated = read_jsonl(tmp_path / "boot.prompts.jsonl")
    questions = [g["prompt"] for g in generated]
    assert len(questions) == 12 and len(set(questions)) == 12
    assert not any("element" in q for q in questions)
    assert not any("of the country" in q for q in questions)
    check_output(read_jsonl(out), str(tmp_path / "boot.prompts.jsonl"), top_logprobs)


def write_prompts(tmp_path, texts) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": t}, ensure_ascii=False) + "\n"
                            for i, t in enumerate(texts)), encoding="utf-8")
    return str(path)


def test_collect_top_logprobs_round_trip(tmp_path, capsys):
    """The official openai client really sends logprobs=true, top_logprobs=K (through retried 429s
    and 500s), and each stored record holds exactly the tokens, bytes, logprobs and alternatives
    the teacher sent (a token that splits ✓ keeps its raw bytes; whole tokens store none)."""
    prompts = write_prompts(tmp_path, [f"question {i} — ünïcode {'x' * i}" for i in range(12)])
    out = tmp_path / "out.jsonl"
    app = fake_openai(expected_answer, fail_rate=0.3, seed=3)
    with serve_in_thread(app) as url:
        rc = main(["collect", "--prompts", prompts, "--base-url", url + "/v1", "--model", "teacher",
                   "--out", str(out), "--top-logprobs", "5", "--temperature", "0.7", "--max-retries", "20",
                   "--concurrency", "4", "--quiet"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert app.state.calls > 12 and app.state.bodies
    assert all(b["logprobs"] is True and b["top_logprobs"] == 5 for b in app.state.bodies)
    records = read_jsonl(out)
    check_output(records, prompts, top_logprobs=5)
    assert records[0]["provenance"]["params"] == {"temperature": 0.7, "top_logprobs": 5}
    tokens = records[0]["messages"][-1][tlp.FIELD]["tokens"]
    assert [len(t) for t in tokens[-2:]] == [4, 4]  # the tokens that split "✓" carry their bytes
    assert all(len(t) == 3 for t in tokens[:-2])  # whole tokens: bytes are the text's UTF-8
    n_tokens = sum(len(r["messages"][-1][tlp.FIELD]["tokens"]) for r in records)
    assert f"logprobs:  top 5 alternatives stored for {n_tokens} answer tokens" in printed.out


K = 4


def corrupt(body: dict, content: list) -> list:
    """Logprobs damaged according to the prompt (the last user message)."""
    case = body["messages"][-1]["content"]
    if case == "concat":  # a token whose text is not the answer's, and no bytes to say otherwise
        content[1]["token"], content[1]["bytes"] = "XYZ", None
    elif case == "nan":
        content[2]["logprob"] = float("nan")
    elif case == "nan-alternative":
        content[0]["top_logprobs"][2]["logprob"] = float("nan")
    elif case == "positive":
        content[0]["top_logprobs"][0]["logprob"] = 0.5
    elif case == "few":
        del content[1]["top_logprobs"][-1]
    elif case == "wrong-type":
        content[0]["bytes"] = [300]
    elif case == "tiny-positive":  # fp32 rounding of a log-softmax: kept as sent
        content[0]["logprob"] = 5e-5
    elif case == "more-unsorted":  # K + 2 alternatives, least probable first: the top K are kept
        content[0]["top_logprobs"] = toy_logprobs(expected_answer(body), K + 2)[0]["top_logprobs"][::-1]
    elif case == "minus-inf":
        content[0]["top_logprobs"][-1]["logprob"] = float("-inf")
    return content


def test_collect_bad_logprobs_are_counted_failures(tmp_path, capsys):
    cases = ["ok", "concat", "nan", "nan-alternative", "positive", "few", "wrong-type",
             "tiny-positive", "more-unsorted", "minus-inf"]
    bad = {"concat": "do not concatenate to the answer", "nan": "token 2: logprob is NaN",
           "nan-alternative": "token 0 alternative 2: logprob is NaN",
           "positive": "logprob 0.5 is positive", "few": f"token 1 has {K - 1} alternatives, fewer than the {K}",
           "wrong-type": "malformed logprobs"}
    prompts = write_prompts(tmp_path, cases)
    out = tmp_path / "out.jsonl"
    with serve_in_thread(fake_openai(expected_answer, logprobs=corrupt)) as url:
        args = ["collect", "--prompts", prompts, "--base-url", url + "/v1", "--model", "t", "--out", str(out),
                "--top-logprobs", str(K), "--quiet"]
        rc = main(args)
    printed = capsys.readouterr()
    assert rc == 1, printed.err
    assert f"failed:    {len(bad)} ({len(bad)} bad logprobs)" in printed.out
    for case, reason in bad.items():
        line = next(line for line in printed.out.splitlines() if line.startswith(f"  failed q{cases.index(case)}:"))
        assert "bad logprobs: " in line and reason in line, line
    records = {r["messages"][-1]["content"]: r for r in read_jsonl(out)}
    kept = [c for c in cases if c not in bad]
    assert sorted(r["messages"][-2]["content"] for r in records.values()) == sorted(kept)
    stored = {r["messages"][-2]["content"]: tlp.parse(r, "out")[len(r["messages"]) - 1] for r in records.values()}
    assert stored["tiny-positive"].tokens[0].logprob == 5e-5
    sent = toy_logprobs(expected_answer({"messages": [{"content": "more-unsorted"}]}), K + 2)[0]["top_logprobs"]
    assert [a.text for a in stored["more-unsorted"].tokens[0].top] == [a["token"] for a in sent[:K]]
    assert stored["minus-inf"].tokens[0].top[-1].logprob == tlp.NEG_INF

    # the re-run asks only for the failed ones, from a teacher that now sends good logprobs
    with serve_in_thread(fake_openai(expected_answer)) as url:
        rc = main(["collect", "--prompts", prompts, "--base-url", url + "/v1", "--model", "t", "--out", str(out),
                   "--top-logprobs", str(K), "--quiet"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert f"({len(kept)} already in the output)" in printed.out and f"answered:  {len(bad)}" in printed.out
    records = read_jsonl(out)
    assert len(records) == len(cases)
    for n, r in enumerate(records):
        tlp.parse(r, f"out:{n + 1}")


def test_collect_stops_when_the_teacher_gives_no_logprobs(tmp_path, capsys):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    prompts = write_prompts(tmp_path, ["a", "b", "c"])
    ignores = fake_openai(expected_answer, logprobs=lambda body, content: None)
    refuses = FastAPI()

    @refuses.post("/v1/chat/completions")
    async def chat():  # what `serve` and OpenAI's reasoning models answer
        return JSONResponse({"error": {"message": "logprobs are not supported", "type": "invalid_request_error",
                                       "param": "logprobs", "code": None}}, status_code=400)

    for app, message in ((ignores, "has no logprobs although logprobs=true, top_logprobs=3"),
                         (refuses, "HTTP 400: logprobs are not supported")):
        with serve_in_thread(app) as url:
            rc = main(["collect", "--prompts", prompts, "--base-url", url + "/v1", "--model", "t",
                       "--out", str(tmp_path / "o.jsonl"), "--top-logprobs", "3", "--concurrency", "1", "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "o.jsonl").exists() or not (tmp_path / "o.jsonl").read_text()


def test_collect_refuses_to_mix_kinds_of_records(tmp_path, capsys):
    prompts = write_prompts(tmp_path, ["a", "b"])
    out = tmp_path / "out.jsonl"
    with serve_in_thread(fake_openai(expected_answer)) as url:
        def run(*extra):
            return main(["collect", "--prompts", prompts, "--base-url", url + "/v1", "--model", "t",
                         "--out", str(out), "--quiet", *extra])

        assert run("--top-logprobs", "21") == 2
        assert "--top-logprobs must be from 0 (off) to 20, got 21" in capsys.readouterr().err
        assert run("--top-logprobs", "5") == 0
        capsys.readouterr()
        assert run("--top-logprobs", "3") == 2
        assert (f"{out}:1: this record has teacher logprobs with k = 5, but this run has --top-logprobs 3"
                in capsys.readouterr().err)
        assert run() == 2
        assert "this record has teacher logprobs with k = 5, but this run has no --top-logprobs" in capsys.readouterr().err
        assert run("--top-logprobs", "5") == 0 and "(2 already in the output)" in capsys.readouterr().out


def stored_record(**change) -> dict:
    """A valid collected record (k = 2) with `change` applied to its stored logprobs."""
    text = "hé ✓"
    value = tlp.encode(expected_logprobs(text, 2))
    value.update(change)
    return {"id": "x", "messages": [{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": text, tlp.FIELD: value}]}


def test_parse_stored_logprobs(tmp_path):
    """The reader `prepare` uses: a valid record parses to exactly what was encoded; a malformed
    one is a one-line DataError naming the file, line and message."""
    good = stored_record()
    expected = expected_logprobs("hé ✓", 2)
    assert tlp.parse(good, "f:1") == {1: expected}
    assert tlp.encode(tlp.parse(json.loads(json.dumps(good)), "f:1")[1]) == good["messages"][1][tlp.FIELD]
    assert expected.offsets() == [0, 3, 6, 7]  # "hé " / " ✓"[:3] split / the rest
    assert tlp.parse({"messages": [{"role": "user", "content": "q"}]}, "f:1") == {}

    def tokens(edit):
        value = stored_record()["messages"][1][tlp.FIELD]
        edit(value["tokens"])
        return value["tokens"]

    def set_lp(t, i, j, v):
        (t[i] if j is None else t[i][2][j])[1] = v

    bad = [
        (stored_record(version=2), "format version 2 is not one this imitation-jax reads (1)"),
        (stored_record(k=3), "token 0: 2 alternatives, expected k = 3"),
        (stored_record(k=0), "k must be an integer from 1 to 20"),
        (stored_record(extra=1), "unknown key 'extra'"),
        (stored_record(tokens=tokens(lambda t: t.pop())), "do not concatenate to the answer's UTF-8"),
        (stored_record(tokens=tokens(lambda t: set_lp(t, 0, None, float("nan")))), "token 0: logprob is NaN"),
        (stored_record(tokens=tokens(lambda t: set_lp(t, 1, 1, 0.01))), "token 1 alternative 1: logprob 0.01 is positive"),
        (stored_record(tokens=tokens(lambda t: set_lp(t, 1, 1, 0.0))), "token 1: alternatives not in descending"),
        (stored_record(tokens=tokens(lambda t: t[1].__setitem__(3, [256]))), "token 1: bytes must be a list of integers"),
        (stored_record(tokens=tokens(lambda t: t[0].__setitem__(1, "x"))), "token 0: logprob must be a number"),
        (stored_record(tokens=tokens(lambda t: t[0].pop())), "token 0: expected [text, logprob, top]"),
    ]
    user_carries = stored_record()
    user_carries["messages"][0][tlp.FIELD] = user_carries["messages"][1][tlp.FIELD]
    bad.append((user_carries, "message 0: teacher_logprobs: on a 'user' message"))
    path = tmp_path / "teacher.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r, _ in bad), encoding="utf-8")
    for n, (where, record) in enumerate(jsonl_records(str(path))):
        with pytest.raises(DataError) as e:
            tlp.parse(record, where)
        message = str(e.value)
        assert message.startswith(f"{path}:{n + 1}: message ") and "\n" not in message
        assert bad[n][1] in message, message
        assert e.value.kind == "bad_logprobs"
    assert tlp.parse(stored_record(tokens=tokens(lambda t: set_lp(t, 0, None, 1e-4))), "f:1")[1].tokens[0].logprob == 1e-4


def test_docs_example_parses():
    """The example record in docs/collect.md is a valid version-1 record and round-trips."""
    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "collect.md"), encoding="utf-8").read()
    block = doc.split('```json\n{"role": "assistant"', 1)[1].split("```", 1)[0]
    message = json.loads('{"role": "assistant"' + block)
    parsed = tlp.parse({"messages": [{"role": "user", "content": "q"}, message]}, "docs/collect.md")[1]
    assert tlp.encode(parsed) == message[tlp.FIELD]
    assert parsed.offsets() == [0, 3, 6, 7]
