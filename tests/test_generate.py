"""Generation: the KV cache against recomputing the whole forward pass, the sampler against its
definition, stop ids and strings, shape buckets (no recompilation), the CLI, sharded == unsharded.

A tiny random model (hidden 64, 2 layers, GQA) with a larger-than-usual init, so its logits are
far from uniform and greedy choices are not near-ties.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imitation_jax.data.templates import encode_prompt, get_template
from imitation_jax.generate import Generator, PromptTooLong, SamplingParams
from imitation_jax.generate.sampling import filter_logits, sample
from imitation_jax.generate.text import TextTracker
from imitation_jax.convert.loading import LoadedModel, _one_device_mesh
from imitation_jax.model import ModelConfig
from imitation_jax.model.kv_cache import KVCache
from imitation_jax.model.params import init_params, model_graph

TINY = dict(hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
            max_position_embeddings=128, initializer_range=0.1,
            # cuDNN (what "auto" picks on a GPU) has no fp32 attention for the reference forward pass
            attention="xla" if jax.devices()[0].platform == "gpu" else "auto")


def tiny_loaded(tokenizer, seed: int = 0, mesh=None) -> LoadedModel:
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, **TINY)
    params = init_params(cfg, mesh if mesh is not None else _one_device_mesh(), seed)
    return LoadedModel(cfg, model_graph(cfg)[0], params, tokenizer, get_template("koala"), "tiny")


@pytest.fixture(scope="module")
def loaded(tiny_tokenizer) -> LoadedModel:
    return tiny_loaded(tiny_tokenizer)


@pytest.fixture(scope="module")
def gen(loaded) -> Generator:
    return Generator(loaded, max_batch=4)


def prompts_of(lengths, seed=0, vocab=512) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(4, vocab, n - 1).tolist() for n in lengths]


_FORWARDS: dict = {}


def _forward(loaded):
    from flax import nnx

    if id(loaded) not in _FORWARDS:
        _FORWARDS[id(loaded)] = jax.jit(lambda params, tokens: (
            lambda model: model.logits(model(tokens)))(nnx.merge(loaded.graphdef, params)))
    return _FORWARDS[id(loaded)]


def full_logits(loaded, seq: list[int], width: int = 64) -> np.ndarray:
    """Logits (len(seq), V) of the plain forward pass over `seq` from position 0, no cache. The
    sequence is right-padded to `width` (causal attention: the padding never reaches it) so that
    one compilation serves every length."""
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :len(seq)] = seq
    return np.asarray(_forward(loaded)(loaded.params, tokens))[0, :len(seq)]


def greedy_by_recompute(loaded, prompt: list[int], n: int, stop=()) -> list[int]:
    """The reference: the whole sequence through the model again for every new token."""
    seq = list(prompt)
    for _ in range(n):
        token = int(np.argmax(full_logits(loaded, seq)[-1]))
        if token in stop:
            break
        seq.append(token)
    return seq[len(prompt):]


# ------------------------------------------------------------------------------------ KV cache


@pytest.mark.parametrize("prefill", ["cache", "segments"])
def test_decode_logits_match_full_forward_with_left_padding(loaded, prefill):
    """Llama.decode over a prefill then single steps gives the logits of the full forward pass,
    for a left-padded row and an unpadded one in the same batch. The prefill attends over the
    masked cache, or (as the Generator does) over the new tokens with padding as segment 0."""
    from flax import nnx

    @jax.jit
    def decode(params, tokens, positions, cache, segments=None):
        model = nnx.merge(loaded.graphdef, params)
        hidden, cache = model.decode(tokens, positions, cache, segments)
        return model.logits(hidden[:, -1]), cache

    seqs = prompts_of([9, 13], seed=1)
    extra = prompts_of([4, 4], seed=2)
    width = 13
    tokens = np.zeros((2, width), np.int32)
    start = np.asarray([width - 9, 0], np.int32)
    tokens[0, start[0]:], tokens[1] = seqs[0], seqs[1]
    positions = np.maximum(np.arange(width)[None] - start[:, None], 0)
    segments = (np.arange(width)[None] >= start[:, None]).astype(np.int32) if prefill == "segments" else None
    logits, cache = decode(loaded.params, tokens, positions, KVCache.create(loaded.config, jnp.asarray(start), 24),
                           segments)
    got = [logits]
    for step in range(4):
        new = np.asarray([[extra[0][step]], [extra[1][step]]], np.int32)
        logits, cache = decode(loaded.params, new, (cache.index - cache.start)[:, None], cache)
        got.append(logits)
    for row in range(2):
        want = full_logits(loaded, seqs[row] + extra[row][:4])
        for step, g in enumerate(got):
            np.testing.assert_allclose(g[row], want[len(seqs[row]) - 1 + step], rtol=1e-4, atol=1e-4)


def test_greedy_generation_equals_recompute_across_buckets_and_batches(loaded, gen):
    """Prompts of 3..30 tokens, padded to 32, more prompts than max_batch (4 + 1)."""
    prompts = prompts_of([3, 20, 7, 30, 12], seed=3)
    out = gen.generate(prompts, SamplingParams(max_new_tokens=9))
    for p, c in zip(prompts, out):
        want = greedy_by_recompute(loaded, p, 9, stop=gen.stop_ids)
        assert c.tokens == want
        assert c.prompt_tokens == len(p)
        assert c.finish_reason == ("length" if len(want) == 9 else "stop")
        assert c.text == loaded.tokenizer.decode(c.tokens)


def test_no_recompile_for_new_prompt_length_in_bucket(gen):
    params = SamplingParams(max_new_tokens=5)
    gen.generate(prompts_of([5]), params)
    before = dict(gen.traces)
    gen.generate(prompts_of([9], seed=4), params)
    gen.generate(prompts_of([14], seed=5), SamplingParams(max_new_tokens=9, temperature=0.5, top_k=3))
    assert gen.traces == before
    gen.generate(prompts_of([40], seed=6), params)  # the 64 bucket (no other test uses it): a new prefill
    assert gen.traces["prefill"] > before["prefill"]


def test_context_limit(gen):
    near = prompts_of([gen.max_len - 3])
    [c] = gen.generate(near, SamplingParams(max_new_tokens=10))
    assert len(c.tokens) <= 3 and (len(c.tokens) == 3) == (c.finish_reason == "length")
    with pytest.raises(PromptTooLong):
        gen.generate(prompts_of([gen.max_len]), SamplingParams(max_new_tokens=1))


# ------------------------------------------------------------------------------------ sampling


def test_filter_logits_top_k_top_p_on_hand_made_distribution():
    probs = np.asarray([0.05, 0.5, 0.1, 0.2, 0.15], np.float32)
    logits = jnp.asarray(np.log(probs))[None]

    def kept(top_k=0, top_p=1.0, temperature=1.0):
        out = filter_logits(logits, jnp.asarray([temperature]), jnp.asarray([top_k]), jnp.asarray([top_p]))
        return set(np.flatnonzero(np.isfinite(np.asarray(out[0]))).tolist())

    assert kept() == {0, 1, 2, 3, 4}
    assert kept(top_k=2) == {1, 3}
    assert kept(top_p=0.5) == {1}  # 0.5 already reaches 0.5
    assert kept(top_p=0.6) == {1, 3}  # 0.5 < 0.6 <= 0.7
    assert kept(top_p=0.86) == {1, 3, 4, 2}  # 0.85 < 0.86
    assert kept(top_k=3, top_p=0.9) == {1, 3, 4}  # nucleus of the renormalised top 3: 0.59 + 0.24 < 0.9
    assert kept(top_k=3, top_p=0.7) == {1, 3}  # 0.588 < 0.7 <= 0.588 + 0.235
    scaled = filter_logits(logits, jnp.asarray([2.0]), jnp.asarray([0]), jnp.asarray([1.0]))
    np.testing.assert_allclose(scaled[0], np.log(probs) / 2, rtol=1e-6)


def test_sample_frequencies_follow_the_renormalised_nucleus():
    probs = np.asarray([0.05, 0.5, 0.1, 0.2, 0.15], np.float32)
    rows = 4000
    logits = jnp.broadcast_to(jnp.asarray(np.log(probs)), (rows, 5))
    draws = np.asarray(sample(logits, jnp.uint32(0), jnp.ones(rows), jnp.zeros(rows, jnp.int32),
                              jnp.full(rows, 0.8), jnp.arange(rows, dtype=jnp.uint32)))
    freq = np.bincount(draws, minlength=5) / rows
    want = np.asarray([0, 0.5, 0, 0.2, 0.15]) / 0.85  # nucleus {1, 3, 4}
    np.testing.assert_allclose(freq, want, atol=0.03)
    hot = np.asarray(sample(logits, jnp.uint32(0), jnp.full(rows, 1.0), jnp.zeros(rows, jnp.int32),
                            jnp.ones(rows), jnp.arange(rows, dtype=jnp.uint32)))
    np.testing.assert_allclose(np.bincount(hot, minlength=5) / rows, probs, atol=0.03)


def test_top_k_1_equals_greedy_and_requests_do_not_depend_on_their_batch(gen):
    prompts = prompts_of([6, 11, 4], seed=7)
    greedy = gen.generate(prompts, SamplingParams(max_new_tokens=8))
    top1 = gen.generate(prompts, SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1, seed=3))
    assert [c.tokens for c in top1] == [c.tokens for c in greedy]
    hot = [SamplingParams(max_new_tokens=8, temperature=1.0, seed=s) for s in (1, 2, 3)]
    mixed = gen.generate(prompts, [SamplingParams(max_new_tokens=8), hot[1], hot[2]])
    alone = gen.generate([prompts[1]], hot[1])
    assert mixed[1].tokens == alone[0].tokens  # same seed, same tokens, whatever the batch
    assert mixed[0].tokens == greedy[0].tokens  # a greedy row next to sampled rows stays greedy
    again = gen.generate(prompts, hot)
    assert [c.tokens for c in again][1:] == [c.tokens for c in mixed][1:]


# ------------------------------------------------------------------------------------ stops


class CharTokenizer:
    """One character per id (id = code point); enough for TextTracker."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_text_tracker_stop_string_across_tokens_and_held_back_text():
    t = TextTracker(CharTokenizer(), stop=["END", "##"])
    shown = ""
    for ch in "abc EN":
        assert not t.add(ord(ch))
        shown += t.pop_delta()
    assert shown == "abc "  # "EN" might be the start of "END"
    assert t.add(ord("D"))
    assert t.text == "abc " and t.pop_delta(final=True) == ""
    t = TextTracker(CharTokenizer(), stop=["END"])
    for ch in "xENy":
        t.add(ord(ch))
    assert t.pop_delta() == "xENy" and not t.stopped


def test_stop_string_ends_generation_and_is_trimmed(loaded, gen):
    prompt = prompts_of([8], seed=8)
    [full] = gen.generate(prompt, SamplingParams(max_new_tokens=16))
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    streamed_text, streamed_ids = [], []
    [c] = gen.generate(prompt, SamplingParams(max_new_tokens=16, stop=[stop]),
                       on_token=lambda i, t: streamed_ids.append(t), on_text=lambda i, d: streamed_text.append(d))
    assert c.finish_reason == "stop"
    assert c.text == text[:text.find(stop)]
    assert "".join(streamed_text) == c.text
    assert streamed_ids == c.tokens == full.tokens[:len(c.tokens)]
    assert len(c.tokens) < len(full.tokens)


def test_stop_id_ends_generation(loaded, gen):
    prompt = prompts_of([10], seed=9)
    [full] = gen.generate(prompt, SamplingParams(max_new_tokens=8))
    third = full.tokens[2]
    stop_ids = gen.stop_ids
    gen.stop_ids = frozenset(stop_ids | {third})
    try:
        [c] = gen.generate(prompt, SamplingParams(max_new_tokens=8))
    finally:
        gen.stop_ids = stop_ids
    assert c.finish_reason == "stop"
    assert c.tokens == full.tokens[:full.tokens.index(third)]


def test_chat_renders_with_the_template(loaded, gen):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    [c] = gen.chat([messages], SamplingParams(max_new_tokens=4))
    ids = encode_prompt(loaded.tokenizer, gen_messages(messages), loaded.template).tolist()
    [want] = gen.generate([ids], SamplingParams(max_new_tokens=4))
    assert c.prompt_tokens == len(ids) and c.tokens == want.tokens


def gen_messages(messages):
    from imitation_jax.data.formats import Message

    return [Message(m["role"], m["content"]) for m in messages]


# ------------------------------------------------------------------------------------ CLI


def test_cli_generate_writes_answers_jsonl(tmp_path, loaded, gen, monkeypatch, capsys):
    """A params dir (as import-hf writes it) through `imitation-jax generate`: a plain prompt is
    continued as raw text after BOS, a messages record is rendered with the template."""
    from imitation_jax.checkpoint import save_params
    from imitation_jax.cli import main
    from imitation_jax.convert import params_dir

    model_dir = tmp_path / "model"
    save_params(str(model_dir / params_dir.PARAMS_DIR), loaded.params)
    params_dir.write_meta(str(model_dir), loaded.config, {"name": "koala", "turn_tokens": False}, "test")
    loaded.tokenizer.save(str(model_dir / params_dir.TOKENIZER_DIR))
    prompts = tmp_path / "prompts.jsonl"
    records = [{"id": "a", "prompt": "hello there"},
               {"id": "b", "messages": [{"role": "user", "content": "what is up"}]}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out" / "answers.jsonl"
    assert main(["generate", str(model_dir), "--prompts", str(prompts), "--system", "Be brief.",
                 "--out", str(out), "--max-new-tokens", "6"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    tok = loaded.tokenizer
    system = {"role": "system", "content": "Be brief."}
    p = SamplingParams(max_new_tokens=6)
    [raw] = gen.generate([[tok.bos_id] + tok.encode("hello there")], p)
    [chat] = gen.chat([[system, {"role": "user", "content": "what is up"}]], p)
    assert rows[0]["prompt"] == "hello there"
    assert rows[0]["messages"] == [{"role": "user", "content": "hello there"},
                                   {"role": "assistant", "content": raw.text}]
    assert rows[1]["messages"] == [system, records[1]["messages"][0], {"role": "assistant", "content": chat.text}]
    for r, w in zip(rows, [raw, chat]):
        assert r["completion"] == w.text and r["finish_reason"] == w.finish_reason
        assert r["prompt_tokens"] == w.prompt_tokens and r["completion_tokens"] == len(w.tokens)
    # User mistakes: exit 2, one line.
    assert main(["generate", str(model_dir), "--prompt", "x", "--out", str(out), "--top-p", "0"]) == 2
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x", "--out", str(out)]) == 2
    # `imitation-jax chat` on the same dir: one exchange, then end of input.
    typed = iter(["what is up"])
    monkeypatch.setattr("builtins.input", lambda _: _next_or_eof(typed))
    capsys.readouterr()
    assert main(["chat", str(model_dir), "--system", "Be brief.", "--temperature", "0", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == f"model> {chat.text}\n\n"


def _next_or_eof(it):
    try:
        return next(it)
    except StopIteration:
        raise EOFError from None


# ------------------------------------------------------------------------------------ sharding


SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from imitation_jax.data.tokenizer import load_tokenizer
    from imitation_jax.generate import Generator, SamplingParams
    from imitation_jax.sharding import MeshConfig, make_mesh
    sys.path.insert(0, sys.argv[2])
    from test_generate import prompts_of, tiny_loaded

    tok = load_tokenizer(sys.argv[1])
    assert len(jax.devices()) == 8
    prompts = prompts_of([5, 17, 9, 30], seed=11)
    params = [SamplingParams(max_new_tokens=8),
              SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5)] * 2
    params[2] = SamplingParams(max_new_tokens=8, logprobs=3, prompt_logprobs=2)
    out = {}
    for name, mesh in [("one", None), ("sharded", make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))]:
        loaded = tiny_loaded(tok, mesh=mesh)
        done = Generator(loaded, max_batch=4).generate(prompts, params)
        entries = done[2].logprobs + done[2].prompt_logprobs[1:]
        out[name] = {"tokens": [c.tokens for c in done],
                     "top_ids": [[t for t, _ in e.top] for e in entries],
                     "values": [v for e in entries for v in [e.logprob] + [v for _, v in e.top]]}
        if mesh is not None:
            assert len(loaded.params["embed"].sharding.device_set) == 8
    print(json.dumps(out))
""")


def test_sharded_generation_equals_unsharded(tiny_tokenizer):
    """8 simulated devices as data 2 x fsdp 2 x tensor 2 (parameters split by the rules table, heads
    over tensor, rows over data x fsdp): the same tokens, greedy and sampled, and the same log-probabilities."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, tiny_tokenizer.path, os.path.dirname(__file__)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["sharded"]["tokens"] == out["one"]["tokens"]
    assert out["sharded"]["top_ids"] == out["one"]["top_ids"]
    np.testing.assert_allclose(out["sharded"]["values"], out["one"]["values"], atol=1e-4)


def test_chat_repl_keeps_history_streams_and_resets(gen):
    import io

    from imitation_jax.commands.chat import repl

    p = SamplingParams(max_new_tokens=5)
    inputs = iter(["hello there", "and then?", "/reset", "hi", "/exit"])
    shown = io.StringIO()
    history = repl(gen, p, "Be brief.", read=lambda _: next(inputs), out=shown)
    system = {"role": "system", "content": "Be brief."}
    first = gen.chat([[system, {"role": "user", "content": "hello there"}]], p)[0].text
    second = gen.chat([[system, {"role": "user", "content": "hello there"}, {"role": "assistant", "content": first},
                        {"role": "user", "content": "and then?"}]], p)[0].text
    third = gen.chat([[system, {"role": "user", "content": "hi"}]], p)[0].text
    assert history == [system, {"role": "user", "content": "hi"}, {"role": "assistant", "content": third}]
    assert shown.getvalue() == f"model> {first}\nmodel> {second}\n(history cleared)\nmodel> {third}\n"


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _check_entry(entry, lp_row: np.ndarray, token: int, k: int) -> None:
    """One TokenLogprob against the directly computed log-softmax row: the token's value, and the
    k largest values (descending) with their ids."""
    assert entry.token == token
    np.testing.assert_allclose(entry.logprob, lp_row[token], atol=1e-4)
    assert len(entry.top) == k
    ids, values = [t for t, _ in entry.top], np.asarray([v for _, v in entry.top])
    assert np.all(np.diff(values) <= 0)
    np.testing.assert_allclose(values, np.sort(lp_row)[::-1][:k], atol=1e-4)
    np.testing.assert_allclose(lp_row[ids], values, atol=1e-4)  # each id has the value given


def test_logprobs_are_the_raw_log_softmax_of_the_full_forward(loaded, gen):
    """Generated and prompt log-probabilities equal log_softmax of the full forward pass over
    prompt + generated prefix, for greedy and sampled rows (raw: before temperature / top-k), with
    per-request counts; rows that do not ask get none, and asking changes no token."""
    prompts = prompts_of([5, 11, 30, 7], seed=11)
    params = [SamplingParams(max_new_tokens=9, logprobs=5, prompt_logprobs=3),
              SamplingParams(max_new_tokens=9),
              SamplingParams(max_new_tokens=9, temperature=0.7, top_k=40, seed=2, logprobs=20),
              SamplingParams(max_new_tokens=9, logprobs=0)]
    out = gen.generate(prompts, params)
    plain = gen.generate(prompts, [SamplingParams(max_new_tokens=9, temperature=p.temperature, top_k=p.top_k,
                                                  seed=p.seed) for p in params])
    assert [c.tokens for c in out] == [c.tokens for c in plain]
    assert out[1].logprobs is None and out[1].prompt_logprobs is None and out[2].prompt_logprobs is None
    for p, c, sp in zip(prompts, out, params):
        if sp.logprobs is None:
            continue
        lp = _log_softmax(full_logits(loaded, p + c.tokens))
        assert len(c.logprobs) == len(c.tokens) > 0
        for j, (token, entry) in enumerate(zip(c.tokens, c.logprobs)):
            _check_entry(entry, lp[len(p) - 1 + j], token, sp.logprobs)
            if sp.temperature == 0 and sp.logprobs:
                assert entry.top[0][0] == token  # greedy: the chosen token is the most likely
        if sp.prompt_logprobs is not None:
            assert len(c.prompt_logprobs) == len(p) and c.prompt_logprobs[0] is None
            for i in range(1, len(p)):
                _check_entry(c.prompt_logprobs[i], lp[i - 1], p[i], sp.prompt_logprobs)


def test_prompt_logprobs_alone_and_no_recompile_within_bucket(loaded, gen):
    """max_new_tokens=0 with prompt_logprobs scores the prompt only; a second request in the same
    buckets compiles nothing new."""
    [p] = prompts_of([9], seed=12)
    [c] = gen.generate([p], SamplingParams(max_new_tokens=0, prompt_logprobs=2))
    assert c.tokens == [] and c.logprobs is None and len(c.prompt_logprobs) == 9
    lp = _log_softmax(full_logits(loaded, p))
    for i in range(1, 9):
        _check_entry(c.prompt_logprobs[i], lp[i - 1], p[i], 2)
    gen.generate(prompts_of([6], seed=13), SamplingParams(max_new_tokens=5, logprobs=1, prompt_logprobs=1))
    before = dict(gen.traces)
    gen.generate(prompts_of([12], seed=14), SamplingParams(max_new_tokens=0, prompt_logprobs=4))
    gen.generate(prompts_of([10], seed=15), SamplingParams(max_new_tokens=7, logprobs=3, prompt_logprobs=0))
    assert gen.traces == before
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)


def test_token_strings_bytes_add_up_to_the_decoded_text(tiny_tokenizer):
    """Byte-fallback pieces are their raw byte (text "\\xe2" when not a whole character), the
    dummy-prefix space of the first piece is dropped as decoding drops it, special tokens have no
    bytes; concatenated, the bytes are those of `decode`."""
    from imitation_jax.generate.text import TokenStrings

    tok = tiny_tokenizer
    strings = TokenStrings(tok)
    text = "Hello world, s'il vous plaît ✓ 🙂 日本 — done"
    ids = tok.encode(text)
    parts = strings.sequence_bytes(ids)
    assert b"".join(parts) == tok.decode(ids).encode("utf-8")
    byte_pieces = [strings(t) for t in ids if tok._sp.is_byte(t)]
    assert byte_pieces  # this tokenizer has no piece for the emoji: it falls back to bytes
    assert all(len(b) == 1 and (s == chr(b[0]) or s == f"\\x{b[0]:02x}") for s, b in byte_pieces)
    assert strings(tok.bos_id)[1] is None and strings(tok.eos_id)[1] is None
    with_bos = [tok.bos_id] + ids
    assert b"".join(b for b in strings.sequence_bytes(with_bos) if b) == tok.decode(with_bos).encode("utf-8")


def test_token_strings_of_a_byte_level_bpe_tokenizer(bpe_tokenizer):
    """GPT-2 / LLaMA-3 style pieces ("Ġworld") map back through the byte table; a character split
    over several tokens has partial bytes; concatenated, the bytes are those of `decode`."""
    from imitation_jax.generate.text import TokenStrings

    tok = bpe_tokenizer
    strings = TokenStrings(tok)
    ids = tok.encode(" Hello world, s'il vous plaît ✓ 🙂 日本\n\tdone")
    parts = strings.sequence_bytes(ids)
    assert b"".join(parts) == tok.decode(ids).encode("utf-8")
    assert any(b.startswith(b" ") for b in parts)  # spaces belong to the next word's piece
    assert any(s.startswith("\\x") for s, _ in map(strings, ids))  # a partial character
    assert strings(tok.eos_id)[1] is None
