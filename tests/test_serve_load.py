"""serve under load: continuous batching gives each request what the generator gives it alone
(joining mid-decode, logprobs, stop strings, prompt scoring); a request joins a running batch
instead of waiting for it; a client that goes away frees its row; a full queue answers 429 with
Retry-After; the warm-up compiles before /health says ready, and a first request compiles nothing."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import openai
import pytest

from openai_fake import serve_in_thread
from test_serve import tiny_loaded

MAX_LEN = 256  # (test_serve's reference forward pads to it)


@pytest.fixture(scope="module")
def gen(tiny_tokenizer):
    from imitation_jax.generate import Generator

    return Generator(tiny_loaded(tiny_tokenizer), max_batch=4, buckets=(64, MAX_LEN))


def _prompts(gen, n, seed=0, longest=12):
    rng = np.random.default_rng(seed)
    bos = gen.tokenizer.bos_id
    return [[bos] + rng.integers(4, gen.tokenizer.vocab_size, size=int(k)).tolist()
            for k in rng.integers(2, longest, n)]


def _long_prompt(gen, tokens: int) -> list[int]:
    """A prompt whose greedy reply runs `tokens` tokens without a stop id."""
    from imitation_jax.generate import SamplingParams

    for seed in range(20):
        p = _prompts(gen, 1, seed=100 + seed)[0]
        if gen.generate([p], SamplingParams(max_new_tokens=tokens))[0].finish_reason == "length":
            return p
    raise AssertionError("no prompt runs long enough")


def test_slots_give_each_request_what_the_generator_gives_it_alone(gen):
    """Seven requests through 2 slots (so most join a batch already decoding, and the cache is
    relaid out as rows come and go): greedy, sampled with a seed, logprobs, a stop string, no new
    tokens at all; each equals `Generator.generate` of it alone (tokens, text,
    finish reason exactly; logprobs to 1e-5). test_serve, now served by continuous batching, checks
    the served logprobs and max_tokens=0 prompt scoring against a direct log_softmax of the model."""
    from imitation_jax.generate import SamplingParams
    from imitation_jax.generate.slots import SlotEngine

    prompts = _prompts(gen, 7)
    alone0 = gen.generate([prompts[0]], SamplingParams(max_new_tokens=12))[0]
    word = alone0.text[2:4]
    # (short, so that every cache fits one slot bucket: few shapes to compile)
    params = [SamplingParams(max_new_tokens=12, stop=[word] if word.strip() else []),
              SamplingParams(max_new_tokens=12, logprobs=3),
              SamplingParams(max_new_tokens=9, temperature=1.0, top_p=0.9, seed=3),
              SamplingParams(max_new_tokens=0),
              SamplingParams(max_new_tokens=12),
              SamplingParams(max_new_tokens=5, logprobs=0),
              SamplingParams(max_new_tokens=1)]
    engine = SlotEngine(gen, slots=2)
    got = engine.run(prompts, params)
    assert engine.stats["relayouts"] >= 2 and engine.stats["prefills"] <= 6  # (prefill calls; max_tokens=0: none)
    for p, sp, c in zip(prompts, params, got):
        [ref] = gen.generate([p], sp)
        assert (c.tokens, c.text, c.finish_reason, c.stop_id) == (ref.tokens, ref.text, ref.finish_reason, ref.stop_id)
        for mine, theirs in ((c.logprobs, ref.logprobs), (c.prompt_logprobs, ref.prompt_logprobs)):
            assert (mine is None) == (theirs is None)
            for a, b in zip(mine or (), theirs or ()):
                if a is None:
                    assert b is None
                    continue
                assert a.token == b.token and [t for t, _ in a.top] == [t for t, _ in b.top]
                np.testing.assert_allclose([a.logprob] + [v for _, v in a.top], [b.logprob] + [v for _, v in b.top],
                                           atol=1e-5)
    assert got[0].finish_reason == "stop" or not word.strip()
    assert got[3].tokens == [] and got[3].finish_reason == "length"
    assert engine.cache.k.shape[2] == 64  # slots: the smallest bucket that holds these

    # Bounded compiles: requests of new lengths (in the same buckets) trace no new prefill or decode.
    engine.run(_prompts(gen, 6, seed=1), SamplingParams(max_new_tokens=12))
    before = dict(gen.traces), dict(engine.traces)
    engine.run(_prompts(gen, 6, seed=2), SamplingParams(max_new_tokens=12))
    assert (gen.traces, engine.traces) == before


def test_a_failed_device_call_fails_every_unfinished_request(gen):
    """fail_all reaches requests in rows, ones whose first token is unread and ones freed early
    with tokens still in flight; the engine then serves again from a fresh cache."""
    from imitation_jax.generate import SamplingParams
    from imitation_jax.generate.slots import SlotEngine, _Collect

    engine = SlotEngine(gen, slots=2)
    prompts = _prompts(gen, 2, seed=3)
    results, errors = [None] * 2, [None] * 2
    engine.admit([(p, SamplingParams(max_new_tokens=n), _Collect(i, results, errors))
                  for i, (p, n) in enumerate(zip(prompts, (9, 30)))])
    engine.step()  # (request 0's last tokens are in this call: its row is free already)
    assert engine.active == 1 and engine.busy()
    engine.fail_all(RuntimeError("device lost"))
    assert [type(e) for e in errors] == [RuntimeError, RuntimeError] and results == [None, None]
    assert not engine.busy()
    [again] = engine.run(prompts[:1], SamplingParams(max_new_tokens=9))
    assert again.tokens == gen.generate(prompts[:1], SamplingParams(max_new_tokens=9))[0].tokens


def _slow(scheduler, seconds: float):
    """Each decode step of `scheduler` takes at least `seconds` (so requests overlap for sure)."""
    step = scheduler.engine.step

    def slow():
        time.sleep(seconds)
        return step()

    scheduler.engine.step = slow


@pytest.fixture
def app_for(gen):
    from imitation_jax.serving.app import create_app

    def make(**kw):
        return create_app(gen, "tiny", batch_wait_ms=1, **kw)
    return make


def test_a_request_joins_a_running_batch(gen, app_for):
    """A short request sent while a long one decodes finishes first (the batch scheduler makes it
    wait for the long one's whole batch), and the long reply is the generator's for it alone."""
    from imitation_jax.generate import SamplingParams

    long_prompt = _long_prompt(gen, 120)
    [alone] = gen.generate([long_prompt], SamplingParams(max_new_tokens=120))
    short_prompt = _prompts(gen, 1, seed=7)[0]
    finished = {}
    for scheduler in ("continuous", "batch"):
        app = app_for(max_batch=4, scheduler=scheduler)
        sched = app.state.batcher
        if scheduler == "continuous":
            _slow(sched, 0.1)  # 15 calls: >= 1.5 s
        started = (lambda: sched.engine.active) if scheduler == "continuous" else (lambda: sched.requests)
        with serve_in_thread(app) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            done = {}

            def ask(name, prompt, n):
                r = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0)
                done[name] = (time.monotonic(), r.choices[0].text, r.choices[0].finish_reason)

            t = threading.Thread(target=ask, args=("long", long_prompt, 120))
            t.start()
            while not started():  # the long one is decoding
                time.sleep(0.005)
            ask("short", short_prompt, 4)
            t.join()
        finished[scheduler] = done["short"][0] < done["long"][0]
        assert done["long"][1:] == (alone.text, "length"), (scheduler, done)
    assert finished == {"continuous": True, "batch": False}, done


def test_a_client_that_goes_away_frees_its_row(gen, app_for):
    """Streaming and not: the client closes the connection after a moment; the request's row is
    free at once, long before its 200 tokens would have been decoded."""
    prompt = _long_prompt(gen, 200)
    app = app_for(max_batch=2)
    sched = app.state.batcher
    _slow(sched, 0.02)  # 200 tokens: 25 calls, >= 0.5 s
    with serve_in_thread(app) as url:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 200, "temperature": 0}

        async def streamed():
            async with httpx.AsyncClient(timeout=30) as http:
                async with http.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
                    async for _ in r.aiter_lines():
                        if sched.engine.active:
                            break  # decoding: leave

        async def plain():
            async with httpx.AsyncClient(timeout=30) as http:
                task = asyncio.ensure_future(http.post(url + "/v1/completions", json=body))
                while not sched.engine.active:
                    await asyncio.sleep(0.01)
                task.cancel()  # closes the connection
                with pytest.raises(asyncio.CancelledError):
                    await task

        for leave in (streamed, plain):
            calls = sched.engine.stats["decode_calls"]
            t0 = time.monotonic()
            asyncio.run(leave())
            while sched.engine.active and time.monotonic() - t0 < 10:
                time.sleep(0.01)
            assert sched.engine.active == 0, leave.__name__
            assert sched.engine.stats["decode_calls"] - calls < 20, leave.__name__  # not the 25 of all 200


def test_a_full_queue_answers_429_with_retry_after(gen, app_for):
    """One slot, a queue of one: a third concurrent request gets an OpenAI-style 429 with a
    Retry-After; the first two are answered; so is one sent after them. The batch scheduler too."""
    prompt = _long_prompt(gen, 40)
    for scheduler in ("continuous", "batch"):
        app = app_for(max_batch=1, max_queue=1, scheduler=scheduler)
        sched = app.state.batcher
        if scheduler == "continuous":
            _slow(sched, 0.1)  # 5 calls: >= 0.5 s
            running, queued = (lambda: sched.engine.active), sched.queued
        else:
            running, queued = (lambda: sched.requests), sched._queue.qsize
            generate = gen.generate
            app.state.batcher.generator = type("Slow", (), {"generate": lambda self, *a, **k: (time.sleep(0.5),
                                                                                             generate(*a, **k))[1]})()
        with serve_in_thread(app) as url:
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 40, "temperature": 0}

            async def burst():
                async with httpx.AsyncClient(timeout=60) as http:
                    first = asyncio.ensure_future(http.post(url + "/v1/completions", json=body))
                    while not running():
                        await asyncio.sleep(0.005)
                    second = asyncio.ensure_future(http.post(url + "/v1/completions", json=body))
                    while not queued():
                        await asyncio.sleep(0.005)
                    third = await http.post(url + "/v1/completions", json=body)
                    return await first, await second, third

            first, second, third = asyncio.run(burst())
            assert (first.status_code, second.status_code, third.status_code) == (200, 200, 429), scheduler
            err = third.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == "queue_full"
            assert int(third.headers["Retry-After"]) >= 1
            health = httpx.get(url + "/health").json()
            assert health["rejected"] == 1 and health["scheduler"] == scheduler
            assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200


def test_warm_up_before_ready_then_a_first_request_compiles_nothing(gen):
    """/health is 503 while the warm-up compiles and 200 after; a first request then traces no
    prefill, decode or cache copy."""
    from imitation_jax.serving.app import create_app

    app = create_app(gen, "tiny", max_batch=2, warmup="basic")
    sched = app.state.batcher
    # prefill 64, 256; decode and cache copies of 1 row x 64, 96, 256, 288 slots
    assert sched.engine.slot_buckets == [64, 96, 256, 288]
    assert not sched.ready and len(sched._warmup) == 2 + 4 + 4
    gate = threading.Event()
    first = sched._warmup[0]
    sched._warmup[0] = lambda: (gate.wait(30), first())
    sched._warmup[0].what = first.what
    with serve_in_thread(app) as url:
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "warming up"
        gate.set()
        deadline = time.monotonic() + 120
        while r.status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
            r = httpx.get(url + "/health")
        assert r.status_code == 200 and r.json()["ready"] and r.json()["status"] == "ok"
        before = dict(gen.traces), dict(sched.engine.traces)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        client.completions.create(model="tiny", prompt="USER: hello", max_tokens=40, temperature=0)
        assert (gen.traces, sched.engine.traces) == before
