"""serve: a tiny model behind the OpenAI API on a free localhost port, used through the official
`openai` client (plain, streaming, concurrent), bad requests, the API key; collect against it,
then prepare and train on what it collected."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import re

import httpx
import numpy as np
import openai
import pytest

from conftest import SMALL_MODEL
from openai_fake import serve_in_thread

KEY = "test-key-123"
MAX_LEN = 256
KOALA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "koala_test_set",
                     "koala_test_set.jsonl")
koala = pytest.mark.skipif(not os.path.exists(KOALA), reason="the Koala test set is not at ../shared/data")


def tiny_loaded(tokenizer):
    """A randomly initialised small LLaMA with the conftest tokenizer, as `load_model` returns it."""
    import jax

    from imitation_jax.data.templates import get_template
    from imitation_jax.convert.loading import LoadedModel
    from imitation_jax.model.config import ModelConfig
    from imitation_jax.sharding import MeshConfig, make_mesh
    from imitation_jax.model.params import init_params, model_graph

    values = dict(kv.split("=", 1) for kv in SMALL_MODEL)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=MAX_LEN,
                      **{k.split(".", 1)[1]: int(v) for k, v in values.items()})
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    return LoadedModel(cfg, model_graph(cfg)[0], init_params(cfg, mesh, seed=0), tokenizer,
                       get_template("koala", tokenizer), "init_params(seed=0)")


@pytest.fixture(scope="module")
def server(tiny_tokenizer):
    from imitation_jax.generate import Generator
    from imitation_jax.serving.app import create_app

    loaded = tiny_loaded(tiny_tokenizer)
    generator = Generator(loaded, max_batch=8, buckets=(64, MAX_LEN))  # few shapes: few compiles
    app = create_app(generator, "tiny", api_key=KEY, max_batch=8, batch_wait_ms=20)
    with serve_in_thread(app) as url:
        yield {"url": url, "base_url": url + "/v1", "loaded": loaded, "generator": generator, "app": app}


def client(server, **kw):
    return openai.OpenAI(base_url=server["base_url"], api_key=KEY, max_retries=0, **kw)


_FORWARD = {}


def greedy_reference(loaded, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full forward passes over the whole sequence (no cache, no batching).
    Rows are right-padded to one length (causal attention: padding after a position does not
    change its logits), so one compiled forward serves every call."""
    import jax
    import jax.numpy as jnp

    from imitation_jax.data.templates import stop_ids

    from flax import nnx

    def logits(params, ids):
        model = nnx.merge(loaded.graphdef, params)
        return model.logits(model(ids))

    if id(loaded) not in _FORWARD:
        _FORWARD[id(loaded)] = jax.jit(logits)
    forward = functools.partial(_FORWARD[id(loaded)], loaded.params)
    stops = set(stop_ids(loaded.tokenizer, loaded.template)) | {loaded.tokenizer.eos_id}
    ids, out = list(prompt), []
    for _ in range(n):
        row = np.full((1, MAX_LEN), loaded.tokenizer.pad_id, np.int32)
        row[0, :len(ids)] = ids
        token = int(np.argmax(np.asarray(forward(jnp.asarray(row))[0, len(ids) - 1], np.float32)))
        if token in stops:
            break
        out.append(token)
        ids.append(token)
    return out


def direct_logprobs(loaded, ids: list[int]) -> np.ndarray:
    """log_softmax (len(ids), V) of the full forward pass over `ids` (float64, computed here)."""
    import jax.numpy as jnp

    greedy_reference(loaded, ids[:1], 0)  # compiles the forward once
    row = np.full((1, MAX_LEN), loaded.tokenizer.pad_id, np.int32)
    row[0, :len(ids)] = ids
    x = np.asarray(_FORWARD[id(loaded)](loaded.params, jnp.asarray(row))[0, :len(ids)], np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def check_text(text: str, tokenizer, ref: list[int]) -> None:
    """The served text is the reference tokens' text. (A random model often ends inside a UTF-8
    character, which the generator holds back; then only the token count can be compared.)"""
    expected = tokenizer.decode(ref)
    if "\ufffd" not in expected:
        assert text == expected


def koala_prompts(gen, margin: int) -> tuple[list[dict], list[dict]]:
    """(all Koala records, those whose chat prompt leaves `margin` tokens of this model's context)."""
    with open(KOALA, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    fits = [r for r in records if len(gen.encode_chat([{"role": "user", "content": r["prompt"]}])) < MAX_LEN - margin]
    return records, fits


def write_prompts(path, records: list[dict]):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


MESSAGES = [{"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "What is the capital of France? Answer in one word, s'il vous plaît ✓"}]


def test_openai_client_chat_plain_and_streaming(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    resp = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    gen, loaded = server["generator"], server["loaded"]
    prompt = gen.encode_chat(MESSAGES)
    ref = greedy_reference(loaded, prompt, 12)
    check_text(resp.choices[0].message.content, loaded.tokenizer, ref)
    assert resp.choices[0].finish_reason == ("length" if len(ref) == 12 else "stop")
    assert resp.usage.prompt_tokens == len(prompt) and resp.usage.completion_tokens == len(ref)
    assert resp.model == "tiny" and resp.choices[0].message.role == "assistant"

    chunks = list(c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == resp.choices[0].message.content
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) > 1  # really streamed
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [resp.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens

    # stop strings cut the text, streamed or not
    assert len(text) >= 4  # (so for this seed)
    word = text[len(text) // 2:len(text) // 2 + 2]
    cut = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, stop=[word])
    assert cut.choices[0].message.content == text[:text.index(word)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, stop=word, stream=True) if ch.choices)
    assert streamed == cut.choices[0].message.content

    # sampling with a seed is reproducible
    a, b = (c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=1.0, seed=7)
            for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content


def test_completions_endpoint(server):
    c = client(server)
    tok = server["loaded"].tokenizer
    resp = c.completions.create(model="tiny", prompt="USER: hello", max_tokens=6, temperature=0)
    ref = greedy_reference(server["loaded"], [tok.bos_id] + tok.encode("USER: hello"), 6)
    check_text(resp.choices[0].text, tok, ref)
    assert resp.usage.completion_tokens == len(ref)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="USER: hello", max_tokens=6, temperature=0, stream=True))
    assert streamed == resp.choices[0].text


def test_concurrent_requests_are_batched(server):
    batcher = server["app"].state.batcher
    before_batches, before_requests = batcher.batches, batcher.requests
    c = client(server)
    prompts = [f"Tell me about topic number {i}." for i in range(8)]

    def ask(p):
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}],
                                      max_tokens=10, temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, prompts))
    assert batcher.requests - before_requests == 8
    assert batcher.batches - before_batches < 8  # decoded together, not one at a time
    gen, loaded = server["generator"], server["loaded"]
    for p, (text, n) in zip(prompts, answers):  # each as if alone
        ref = greedy_reference(loaded, gen.encode_chat([{"role": "user", "content": p}]), 10)
        check_text(text, loaded.tokenizer, ref)
        assert n == len(ref)


def test_bad_requests_get_openai_style_4xx(server):
    url, h = server["url"], {"Authorization": f"Bearer {KEY}"}
    chat = url + "/v1/chat/completions"
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    long_text = "word " * (2 * MAX_LEN)
    cases = [
        (dict(content=b"{not json"), 400, None),
        (dict(json={"messages": ok["messages"]}), 400, "model"),
        (dict(json={"model": "tiny"}), 400, "messages"),
        (dict(json={**ok, "messages": []}), 400, "messages"),
        (dict(json={**ok, "model": "gpt-9"}), 404, "model"),
        (dict(json={**ok, "messages": [{"role": "user", "content": long_text}]}), 400, "messages"),
        (dict(json={**ok, "max_tokens": 0}), 400, "max_tokens"),
        (dict(json={**ok, "max_tokens": MAX_LEN}), 400, "max_tokens"),
        (dict(json={**ok, "max_tokens": "many"}), 400, "max_tokens"),
        (dict(json={**ok, "temperature": -1}), 400, "temperature"),
        (dict(json={**ok, "n": 3}), 400, "n"),
        (dict(json={**ok, "top_k": 10**30}), 400, "top_k"),
        (dict(json={**ok, "stop": ["a", "b", "c", "d", "e"]}), 400, "stop"),
        (dict(json={**ok, "messages": [{"role": "wizard", "content": "hi"}]}), 400, None),
        (dict(json={**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
         400, None),
        (dict(json=[1, 2, 3]), 400, None),
    ]
    with httpx.Client(timeout=60) as http:
        for kwargs, status, param in cases:
            if "content" in kwargs:
                r = http.post(chat, headers={**h, "Content-Type": "application/json"}, **kwargs)
            else:
                r = http.post(chat, headers=h, **kwargs)
            assert r.status_code == status, (kwargs, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
            if param is not None:
                assert param in (err["param"] or ""), (kwargs, err)
        r = http.post(url + "/v1/completions", headers=h, json={"model": "tiny", "prompt": [99999]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = http.get(chat, headers=h)
        assert r.status_code == 405 and "error" in r.json()
        assert http.get(url + "/v1/nothing", headers=h).status_code == 404
        # the server is unharmed; a top_k past the vocabulary is just "no top-k"
        assert http.post(chat, headers=h, json=ok).status_code == 200
        assert http.post(chat, headers=h, json={**ok, "top_k": 10**9, "temperature": 1.0}).status_code == 200
    with pytest.raises(openai.BadRequestError, match="context"):
        client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": long_text}])


def test_api_key_required(server):
    url = server["url"]
    with httpx.Client(timeout=60) as http:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = http.post(url + "/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http.get(url + "/v1/models").status_code == 401
        assert http.get(url + "/health").status_code == 200  # liveness needs no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["base_url"], api_key="nope", max_retries=0).models.list()


@koala
def test_collect_from_serve_then_prepare_and_train(server, tmp_path, monkeypatch, tiny_tokenizer,
                                                   small_overrides, capsys):
    from imitation_jax.cli import main

    # the first prompts that fit this tiny model's context, and the longest one (which does not)
    gen = server["generator"]
    records, fits = koala_prompts(gen, 16)
    longest = max(records, key=lambda r: len(r["prompt"]))
    chosen = fits[:10] + [longest]
    prompts = write_prompts(tmp_path / "koala.jsonl", chosen)
    out = tmp_path / "collected.jsonl"
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    rc = main(["collect", "--prompts", str(prompts), "--base-url", server["base_url"], "--model", "tiny",
               "--out", str(out), "--max-tokens", "16", "--temperature", "0", "--concurrency", "4", "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 1 and "failed:    1" in printed and "context" in printed  # the one too long: a clean 400
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["id"] for r in got) == sorted(r["id"] for r in fits[:10])
    for r in got:
        src = next(x for x in chosen if x["id"] == r["id"])
        assert r["messages"][0] == {"role": "user", "content": src["prompt"]}
        prompt_ids = gen.encode_chat(r["messages"][:1])
        ref = greedy_reference(server["loaded"], prompt_ids, 16)
        check_text(r["messages"][1]["content"], tiny_tokenizer, ref)
        assert r["provenance"]["usage"]["completion_tokens"] == len(ref)
        assert r["provenance"]["teacher"] == "tiny" and KEY not in json.dumps(r)

    # prepare reads the collected file as it is, and train runs on the prepared set
    prepared = tmp_path / "prepared"
    assert main(["prepare", str(out), "--tokenizer", tiny_tokenizer.path, "--template", "koala",
                 "--seq-len", "128", "--out", str(prepared), "--quiet", "--truncate-long-turns"]) == 0
    stats = json.loads((prepared / "stats.json").read_text())
    assert stats["inputs"][0]["format"] == "openai" and stats["inputs"][0]["read"] == 10
    assert stats["inputs"][0]["invalid"] == 0 and stats["inputs"][0]["used"] > 0
    overrides = [o for o in small_overrides if not o.startswith(("data.train_files", "data.eval_files",
                                                                 "data.tokenizer", "data.seq_len"))]
    overrides += [f"data.path={prepared}", "data.seq_len=128", "data.train_files=[]", "data.eval_files=[]",
                  "data.tokenizer=null", "train.steps=3", "train.batch_size=2"]
    assert main(["train", "configs/tiny.yaml", *overrides]) == 0
    assert "last loss" in capsys.readouterr().out


def _check_top(values, lp_row: np.ndarray, k: int) -> None:
    values = np.asarray(values)
    assert len(values) == k and np.all(np.diff(values) <= 0)  # sorted, most likely first
    np.testing.assert_allclose(values, np.sort(lp_row)[::-1][:k], atol=1e-4)


def test_chat_logprobs_equal_the_direct_log_softmax(server):
    """Chat `logprobs` + `top_logprobs` through the openai client, greedy: each token's logprob and
    each alternative's equal log_softmax of the model's logits over prompt + generated prefix; the
    chosen token is the first alternative; the bytes add up to the text; streamed == not streamed."""
    c, loaded, gen = client(server), server["loaded"], server["generator"]
    tok = loaded.tokenizer
    resp = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0,
                                     logprobs=True, top_logprobs=5)
    prompt = gen.encode_chat(MESSAGES)
    ref = greedy_reference(loaded, prompt, 12)
    content = resp.choices[0].logprobs.content
    assert len(content) == len(ref) == resp.usage.completion_tokens
    lp = direct_logprobs(loaded, prompt + ref)
    for j, (token, entry) in enumerate(zip(ref, content)):
        row = lp[len(prompt) - 1 + j]
        np.testing.assert_allclose(entry.logprob, row[token], atol=1e-4)
        _check_top([t.logprob for t in entry.top_logprobs], row, 5)
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].bytes == entry.bytes
    assert [{"token": e.token, "bytes": e.bytes} for e in content] == content_of(tok, ref)
    text = resp.choices[0].message.content
    if "\ufffd" not in text:  # (a random model may stop inside a character, which decodes to U+FFFD)
        assert b"".join(bytes(e.bytes or []) for e in content) == text.encode("utf-8")

    chunks = list(c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0,
                                            logprobs=True, top_logprobs=5, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].logprobs and ch.choices[0].logprobs.content) > 1

    # logprobs without top_logprobs: no alternatives; without logprobs: none at all
    bare = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True)
    assert [e.top_logprobs for e in bare.choices[0].logprobs.content] == [[]] * len(bare.choices[0].logprobs.content)
    assert [e.logprob for e in bare.choices[0].logprobs.content] == [e.logprob for e in content[:3]]
    plain = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None


def content_of(tok, ids: list[int]) -> list[dict]:
    """The token strings of a reply, from SentencePiece's pieces: "▁" is a space (dropped from the
    first piece, as decoding drops it), a byte piece its byte."""
    out = []
    for j, t in enumerate(ids):
        piece = tok._sp.id_to_piece(t)
        raw = bytes([int(piece[3:5], 16)]) if tok._sp.is_byte(t) else piece.replace("\u2581", " ").encode()
        if j == 0 and raw.startswith(b" "):
            raw = raw[1:]
        out.append({"token": raw.decode("utf-8", errors="backslashreplace"), "bytes": list(raw)})
    return out


def test_chat_logprobs_of_a_sampled_reply_are_before_temperature(server):
    """With temperature, top_k and top_p the reported log-probabilities are still the model's raw
    log-softmax (vLLM's default), at the tokens actually sampled."""
    c, loaded, gen = client(server), server["loaded"], server["generator"]
    resp = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=1.3, top_p=0.9,
                                     seed=5, logprobs=True, top_logprobs=20, extra_body={"top_k": 50})
    content = resp.choices[0].logprobs.content
    prompt = gen.encode_chat(MESSAGES)
    # The sampled ids (pieces alone are ambiguous: "6" and its byte piece <0x36> read the same)
    # from the generator with the same seed; what is under test is the values given for them.
    from imitation_jax.generate import SamplingParams

    [same] = gen.generate([prompt], SamplingParams(max_new_tokens=8, temperature=1.3, top_p=0.9, top_k=50, seed=5))
    ids = same.tokens
    assert [e.token for e in content] == [e["token"] for e in content_of(loaded.tokenizer, ids)]
    lp = direct_logprobs(loaded, prompt + ids)
    for j, e in enumerate(content):
        np.testing.assert_allclose(e.logprob, lp[len(prompt) - 1 + j][ids[j]], atol=1e-4)
        _check_top([t.logprob for t in e.top_logprobs], lp[len(prompt) - 1 + j], 20)


def test_completions_logprobs_echo_and_streaming(server):
    """Legacy `logprobs` (tokens, token_logprobs, top_logprobs, text_offset) against the direct
    log-softmax; `echo` with max_tokens 0 scores the prompt (first token: null), with max_tokens > 0
    the generated tokens follow; streamed == not streamed."""
    c, loaded = client(server), server["loaded"]
    tok = loaded.tokenizer
    text = "USER: hello there, s'il vous plaît ✓ 🙂"
    ids = [tok.bos_id] + tok.encode(text)
    lp = direct_logprobs(loaded, ids)

    scored = c.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=3)
    ch = scored.choices[0]
    assert ch.text == tok.decode(ids) and scored.usage.completion_tokens == 0
    assert len(ch.logprobs.tokens) == len(ids)
    assert ch.logprobs.token_logprobs[0] is None and ch.logprobs.top_logprobs[0] is None
    for i in range(1, len(ids)):
        np.testing.assert_allclose(ch.logprobs.token_logprobs[i], lp[i - 1][ids[i]], atol=1e-4)
        _check_top(list(ch.logprobs.top_logprobs[i].values()), lp[i - 1], 3)
    offsets = ch.logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] < len(ch.text)
    assert any(t.startswith("\\x") for t in ch.logprobs.tokens)  # byte-fallback pieces of the emoji

    ref = greedy_reference(loaded, ids, 6)
    full = direct_logprobs(loaded, ids + ref)
    plain = c.completions.create(model="tiny", prompt=text, max_tokens=6, temperature=0, logprobs=2)
    got = plain.choices[0].logprobs
    assert len(got.tokens) == len(ref) and got.text_offset[0] == 0
    for j, token in enumerate(ref):
        np.testing.assert_allclose(got.token_logprobs[j], full[len(ids) - 1 + j][token], atol=1e-4)
        _check_top(list(got.top_logprobs[j].values()), full[len(ids) - 1 + j], 2)
        assert got.tokens[j] in got.top_logprobs[j]  # greedy: the chosen token is among the top

    echoed = c.completions.create(model="tiny", prompt=text, max_tokens=6, temperature=0, logprobs=2, echo=True)
    e = echoed.choices[0]
    assert e.text == ch.text + plain.choices[0].text
    assert e.logprobs.tokens == ch.logprobs.tokens + got.tokens
    np.testing.assert_allclose(e.logprobs.token_logprobs[1:], ch.logprobs.token_logprobs[1:] + got.token_logprobs,
                               atol=1e-5)
    assert e.logprobs.text_offset[len(ids):] == [len(ch.text) + o for o in got.text_offset]

    for kwargs, want in ((dict(max_tokens=6, logprobs=2, echo=True), e),
                         (dict(max_tokens=0, logprobs=3, echo=True), ch),
                         (dict(max_tokens=6, logprobs=2), plain.choices[0])):
        chunks = [x.choices[0] for x in c.completions.create(model="tiny", prompt=text, temperature=0, stream=True,
                                                             **kwargs)]
        assert "".join(x.text for x in chunks) == want.text, kwargs
        joined = {k: [v for x in chunks if x.logprobs for v in getattr(x.logprobs, k)]
                  for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        assert joined == want.logprobs.model_dump(), kwargs


def test_logprobs_bad_values_are_400s(server):
    url, h = server["url"], {"Authorization": f"Bearer {KEY}"}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cmpl = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    cases = [
        ("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("/v1/chat/completions", {**chat, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {**chat, "logprobs": False, "top_logprobs": 0}, "top_logprobs"),
        ("/v1/chat/completions", {**chat, "logprobs": "many"}, "logprobs"),
        ("/v1/completions", {**cmpl, "logprobs": 21}, "logprobs"),
        ("/v1/completions", {**cmpl, "logprobs": -1}, "logprobs"),
        ("/v1/completions", {**cmpl, "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {**cmpl, "max_tokens": -1, "echo": True}, "max_tokens"),
    ]
    with httpx.Client(timeout=60) as http:
        for path, body, param in cases:
            r = http.post(url + path, headers=h, json=body)
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and param in (err["param"] or ""), (body, err)
        assert http.post(url + "/v1/chat/completions", headers=h,
                         json={**chat, "logprobs": True, "top_logprobs": 20}).status_code == 200
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client(server).chat.completions.create(model="tiny", messages=chat["messages"], top_logprobs=3)


@koala
def test_collect_top_logprobs_from_serve(server, tmp_path, monkeypatch, capsys):
    """`collect --top-logprobs 5` against our own `serve`: every stored answer's tokens, logprobs and
    top-5 alternatives are the served model's own (log_softmax of a direct forward pass, greedy), and
    the stored records read back through the format `prepare` will use."""
    from imitation_jax.cli import main
    from imitation_jax.data.teacher_logprobs import parse

    gen, loaded = server["generator"], server["loaded"]
    chosen = koala_prompts(gen, 16)[1][:10]
    prompts = write_prompts(tmp_path / "prompts.jsonl", chosen)
    out = tmp_path / "collected.jsonl"
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    rc = main(["collect", "--prompts", str(prompts), "--base-url", server["base_url"], "--model", "tiny",
               "--out", str(out), "--max-tokens", "12", "--temperature", "0", "--top-logprobs", "5", "--quiet"])
    printed = capsys.readouterr().out
    lines = out.read_text(encoding="utf-8").splitlines()
    # This random model often emits byte pieces that are not valid UTF-8 (the text shows U+FFFD): those
    # tokens cannot concatenate to the text, so such an answer is a counted failure, never a stored
    # record; every other answer is stored.
    failed = set(re.findall(r"failed (\S+): bad logprobs", printed))
    stored = {json.loads(line)["id"] for line in lines}
    assert stored and stored | failed == {r["id"] for r in chosen} and rc == (1 if failed else 0), printed
    c = client(server)
    for r in chosen:
        text = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": r["prompt"]}],
                                         max_tokens=12, temperature=0).choices[0].message.content
        assert ("\ufffd" in text) == (r["id"] in failed), (r["id"], text)
    for n, line in enumerate(lines, 1):
        record = json.loads(line)
        stored = parse(record, f"{out}:{n}")
        (index, teacher), = stored.items()
        assert record["messages"][index]["role"] == "assistant" and teacher.k == 5
        prompt = gen.encode_chat(record["messages"][:index])
        ref = greedy_reference(loaded, prompt, 12)
        assert len(teacher.tokens) == len(ref)
        lp = direct_logprobs(loaded, prompt + ref)
        for j, (token, entry) in enumerate(zip(ref, teacher.tokens)):
            row = lp[len(prompt) - 1 + j]
            np.testing.assert_allclose(entry.logprob, row[token], atol=1e-4)
            _check_top([a.logprob for a in entry.top], row, 5)
        assert b"".join(t.bytes for t in teacher.tokens) == record["messages"][index]["content"].encode("utf-8")


@koala
def test_serve_collect_top_logprobs_prepare_and_distill(tmp_path, monkeypatch, capsys, small_overrides):
    """The whole stored-top-K pipeline on the CPU: train a tiny teacher briefly (a random model mostly
    emits byte pieces that are not valid UTF-8, whose answers cannot be stored with logprobs), serve
    it, `collect --top-logprobs 5`, `prepare` with the teacher's own tokenizer (exact sparse targets
    at the answers' positions), then `train.objective=kd kd.source=stored` trains on them, its KL
    term falls, and it ends closer to the teacher (KL on held-out rows) than the SFT student trained
    on the same rows for the same steps."""
    from imitation_jax.cli import main
    from imitation_jax.commands.train import run_training
    from imitation_jax.convert.loading import load_model
    from imitation_jax.generate import Generator
    from imitation_jax.serving.app import create_app
    from imitation_jax.train.config import load_config

    base = [o for o in small_overrides if not o.startswith(("run_dir", "train.steps"))]
    teacher = run_training(load_config("configs/tiny.yaml", base + [
        f"run_dir={tmp_path / 'teacher'}", "train.steps=30", "optim.lr=3e-3", "logging.tensorboard=false"]))["run_dir"]
    loaded = load_model(teacher)
    gen = Generator(loaded, max_batch=8, buckets=(64, MAX_LEN))
    prompts = write_prompts(tmp_path / "prompts.jsonl", koala_prompts(gen, 24)[1][:16])
    out = tmp_path / "collected.jsonl"
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with serve_in_thread(create_app(gen, "teacher", api_key=KEY, max_batch=8, batch_wait_ms=20)) as url:
        main(["collect", "--prompts", str(prompts), "--base-url", url + "/v1", "--model", "teacher", "--out", str(out),
              "--max-tokens", "16", "--temperature", "0", "--top-logprobs", "5", "--concurrency", "4", "--quiet"])
    assert len(out.read_text(encoding="utf-8").splitlines()) >= 8, capsys.readouterr().out

    prepared = tmp_path / "prepared"
    capsys.readouterr()
    assert main(["prepare", str(out), "--tokenizer", f"{teacher}/tokenizer", "--template", "koala", "--seq-len", "128",
                 "--out", str(prepared), "--quiet", "--truncate-long-turns"]) == 0
    assert "teacher logprobs (top-5)" in capsys.readouterr().out
    kd_stats = json.loads((prepared / "stats.json").read_text())["teacher_logprobs"]
    assert kd_stats["k"] == 5 and kd_stats["answers"]["exact"] > 0 and kd_stats["positions"]["exact"] > 0, kd_stats

    overrides = [o for o in base if not o.startswith(("data.train_files", "data.eval_files", "data.tokenizer",
                                                      "data.seq_len"))]
    run = tmp_path / "kd"
    overrides += [f"data.path={prepared}", "data.seq_len=128", "data.train_files=[]", "data.eval_files=[]",
                  "data.tokenizer=null", "train.steps=6", "train.batch_size=2", "optim.lr=3e-3", f"run_dir={run}",
                  "train.objective=kd", "kd.source=stored", "kd.alpha=0.1", "logging.tensorboard=false"]
    assert main(["train", "configs/tiny.yaml", *overrides]) == 0
    kd = [json.loads(line)["kd"] for line in open(run / "metrics.jsonl") if '"kd"' in line]
    assert len(kd) == 6 and kd[-1] < kd[0], kd

    from test_kd_train import _held_out_kl

    from imitation_jax.data.training import load_training_data
    sft = tmp_path / "sft"
    assert main(["train", "configs/tiny.yaml", *[o for o in overrides if not o.startswith(("run_dir", "train.objective",
                                                                                         "kd."))],
                 f"run_dir={sft}"]) == 0
    held_out = load_training_data(load_config(f"{teacher}/config.yaml").data, log=None).eval
    rows = held_out.take(np.arange(min(8, len(held_out))))
    kl_sft, kl_kd = _held_out_kl(teacher, sft, rows), _held_out_kl(teacher, run, rows)
    assert kl_kd < kl_sft, (kl_kd, kl_sft)
