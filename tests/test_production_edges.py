"""Edges a new user meets first (issue 21): a hub chat model whose chat_template has no
{% generation %} markers goes through import-hf, export-hf, generate, chat and init.hf training
(only building a training mask from it is refused); and one writer per collect/judge output file."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from conftest import build_bpe_tokenizer
from imitation_jax.cli import main as cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The published forms of these two templates (rewritten here): neither marks the assistant's text.
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% if m['role'] == 'user' %}{% set text = m['content'] %}"
    "{% if loop.first and system %}{% set text = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + text %}"
    "{% endif %}{{ bos_token + '[INST] ' + text.strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}")
STYLES = {"llama2-chat": (LLAMA2_CHAT, "</s>"), "chatml": (CHATML, "<|im_end|>")}
VOCAB = 600
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]


def hf_chat_model(directory, style: str, demo_conversations):
    """A tiny random LlamaForCausalLM saved with a byte-level BPE tokenizer whose chat_template is
    the style's (no generation markers), eos as such models set it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    template, eos = STYLES[style]
    texts = [m["content"] for c in demo_conversations[:100] for m in c["messages"]]
    texts += ["BEGINNING OF CONVERSATION: USER: GPT: [INST] [/INST] <<SYS>> system user assistant"] * 10
    build_bpe_tokenizer(directory, texts, chat_template=template, vocab_size=VOCAB)
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, "eos_token": eos}, f)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1)).eval()
    with torch.no_grad():  # norms away from 1 so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory, demo_conversations):
    """style -> (style, HF dir, the transformers model, the import-hf checkpoint of it), built once."""
    made: dict = {}

    def get(style: str):
        if style not in made:
            src = tmp_path_factory.mktemp(style)
            model = hf_chat_model(src / "hf", style, demo_conversations)
            assert cli(["import-hf", str(src / "hf"), "--out", str(src / "ckpt")]) == 0
            made[style] = style, src / "hf", model, src / "ckpt"
        return made[style]
    return get


@pytest.fixture(params=list(STYLES))
def chat_model(request, chat_models):
    return chat_models(request.param)


def test_markerless_template_prompts_but_builds_no_mask(chat_model):
    """get_template('hf') takes such a template: prompts are the tokenizer's own rendering; a
    training example (mask) is refused with one line."""
    from imitation_jax.data.formats import Message
    from imitation_jax.data.templates import encode_conversation, encode_prompt, get_template
    from imitation_jax.data.tokenizer import load_tokenizer
    from imitation_jax.errors import DataError

    _, src, _, _ = chat_model
    tok = load_tokenizer(str(src))
    template = get_template("hf", tok)
    messages = [Message(**m) for m in CHAT]
    expected = tok.hf.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert encode_prompt(tok, messages, template).tolist() == expected["input_ids"]
    with pytest.raises(DataError, match=r"chat_template has no \{% generation %\} markers") as err:
        encode_conversation(tok, messages + [Message("assistant", "Rome.")], template)
    assert "\n" not in str(err.value) and str(src) in str(err.value)


def test_import_export_keeps_the_model_and_its_template(chat_model, tmp_path):
    """import-hf -> export-hf: every tensor bit-identical, the tokenizer the same (vocabulary, special
    tokens, the chat_template string, the ids it renders); transformers loads it, same logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from imitation_jax.convert.loading import load_model

    style, src, model, ckpt = chat_model
    meta = json.loads((ckpt / "model.json").read_text())
    assert meta["template"] == {"name": "hf", "turn_tokens": False}
    out = tmp_path / "export"
    assert cli(["export-hf", str(ckpt), "--out", str(out), "--dtype", "float32"]) == 0

    back, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name

    theirs, ours = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(out)
    assert ours.chat_template == theirs.chat_template == STYLES[style][0]
    assert ours.get_vocab() == theirs.get_vocab()
    for key in ("bos_token", "eos_token", "pad_token"):
        assert getattr(ours, key) == getattr(theirs, key), key
    for generation_prompt in (False, True):
        ids = [t.apply_chat_template(CHAT if generation_prompt else CHAT[:3], tokenize=True, return_dict=True,
                                     add_generation_prompt=generation_prompt)["input_ids"] for t in (theirs, ours)]
        assert ids[0] == ids[1] and len(ids[0]) > 10
    for a, b in [(json.loads((d / "tokenizer.json").read_text()) for d in (src, out))]:
        assert a["model"] == b["model"] and a["added_tokens"] == b["added_tokens"]
        assert a["pre_tokenizer"] == b["pre_tokenizer"] and a["decoder"] == b["decoder"]

    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 24))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
        np.testing.assert_array_equal(back.eval()(torch.tensor(tokens)).logits.numpy(), ref)
    loaded = load_model(str(out))  # and read back by us: the same template
    assert loaded.template.name == "hf" and loaded.template.tokenizer.hf.chat_template == STYLES[style][0]
    import jax.numpy as jnp

    ours_model = loaded.model()
    diff = np.abs(np.asarray(ours_model.logits(ours_model(jnp.asarray(tokens)))) - ref).max()
    assert diff <= 1e-4, diff


QUESTION = "What is the capital of France?"


def transformers_reply(src, model, new_tokens: int = 6) -> tuple[list[int], str]:
    """(prompt ids, greedy reply text) of transformers for QUESTION in the model's chat_template."""
    import torch
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(src)
    prompt = hf_tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=True,
                                        add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)[0].tolist()
    new = ids[len(prompt):]
    if new and new[-1] == hf_tok.eos_token_id:
        new = new[:-1]
    return prompt, hf_tok.decode(new, skip_special_tokens=True)  # as ours: special tokens are not text


def test_generate_in_the_models_own_template(chat_model, tmp_path):
    """generate --chat renders the model's chat_template (transformers' rendering) and continues
    it greedily exactly as transformers' generate does."""
    _, src, model, ckpt = chat_model
    prompt, expected = transformers_reply(src, model)
    out = tmp_path / "gen.jsonl"
    assert cli(["generate", str(ckpt), "--prompt", QUESTION, "--chat", "--out", str(out),
                "--max-new-tokens", "6"]) == 0
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["prompt_tokens"] == len(prompt)
    assert record["completion"] == expected


def test_chat_in_the_models_own_template(chat_models, monkeypatch, capsys):
    """chat (greedy) answers as transformers does in the model's chat_template. (One style: the
    prompt goes through the same encode_chat as generate's.)"""
    _, src, model, ckpt = chat_models("chatml")
    _, expected = transformers_reply(src, model)
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO(QUESTION + "\n/exit\n"))
    assert cli(["chat", str(ckpt), "--temperature", "0", "--max-new-tokens", "6"]) == 0
    assert f"model> {expected}\n" in capsys.readouterr().out


def test_train_from_init_hf_with_a_builtin_template(chat_models, demo_dir, small_overrides, tmp_path, capsys):
    """init.hf of the markerless chat model trains with a built-in template (its tokenizer, its
    weights); prepare with template 'hf' on that tokenizer is one line, exit 2. (One style: the
    chat_template plays no part in either.)"""
    from imitation_jax.commands.train import run_training as train
    from imitation_jax.convert.loading import load_model
    from imitation_jax.train.config import load_config

    _, src, model, _ = chat_models("chatml")
    keep = [o for o in small_overrides if not o.startswith(("model.", "data."))]
    cfg = load_config("configs/tiny.yaml", keep + [
        f"data.train_files=[{demo_dir}/eval.jsonl]", "data.eval_files=[]", "data.seq_len=128", f"init.hf={src}", f"data.tokenizer={src}", "data.template=koala", "train.steps=1", "optim.lr=0",
        "logging.tensorboard=false"])
    summary = train(cfg)
    assert cfg.model.vocab_size == VOCAB
    params = summary["params"]  # lr 0: the HF model's weights, read through init.hf
    np.testing.assert_array_equal(np.asarray(params["embed"]), model.model.embed_tokens.weight.detach().numpy())
    np.testing.assert_array_equal(np.asarray(params["lm_head"]), model.lm_head.weight.detach().numpy().T)
    assert summary["steps"] == 1 and np.isfinite(summary["first_loss"])
    assert load_model(summary["run_dir"]).template.name == "koala"

    capsys.readouterr()
    assert cli(["prepare", f"{demo_dir}/eval.jsonl", "--tokenizer", str(src), "--template", "hf",
                "--seq-len", "128", "--out", str(tmp_path / "set"), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("imitation-jax prepare: error: ")
    assert "chat_template has no {% generation %} markers" in lines[0] and str(src) in lines[0]
    assert not (tmp_path / "set").exists()


# ---------------------------------------------------------------- one writer per output file

SECRET = "sk-test-secret-key-never-written"


def answer(body: dict) -> str:
    return "answer " + hashlib.sha256(body["messages"][-1]["content"].encode()).hexdigest()[:12]


def write_prompts(path, n: int, start: int = 0) -> str:
    with open(path, "a", encoding="utf-8") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"question {i}?"}) + "\n")
    return str(path)


def gated(app, gate: threading.Event):
    """`app` with every HTTP request held until `gate` is set."""
    async def wrapped(scope, receive, send):
        if scope["type"] == "http":
            while not gate.is_set():
                await asyncio.sleep(0.02)
        await app(scope, receive, send)
    return wrapped


def read_ids(path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["id"] for line in f if line.strip()]


def test_two_collects_on_one_output_one_proceeds(tmp_path, monkeypatch, capsys):
    """Two collect processes started together on one --out: one answers every prompt once, the
    other exits 2 naming the file and the first's pid and host; a later run resumes normally."""
    from openai_fake import fake_openai, serve_in_thread

    prompts = write_prompts(tmp_path / "prompts.jsonl", 12)
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "OPENAI_API_KEY": SECRET}
    gate = threading.Event()  # no answer until the loser has exited: the race cannot be won late
    app = fake_openai(answer, delay=0.05)
    with serve_in_thread(gated(app, gate)) as url:
        cmd = [sys.executable, "-m", "imitation_jax.cli", "collect", "--prompts", prompts,
               "--base-url", url + "/v1", "--model", "teacher", "--out", str(out), "--concurrency", "2",
               "--quiet"]
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        gate.set()
        results = [(p, *p.communicate(timeout=120)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [(p.returncode, err) for p, _, err in results]
    [(winner, stdout, _)] = [r for r in results if r[0].returncode == 0]
    [(_, _, err)] = [r for r in results if r[0].returncode == 2]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"imitation-jax collect: error: {out} is being written by another process: "
                               f"held by pid {winner.pid} on {socket.gethostname()} (collect, since ")
    assert "answered:  12" in stdout
    assert sorted(read_ids(out)) == sorted(f"q{i}" for i in range(12))  # each prompt once
    assert app.state.calls == 12
    assert not os.path.exists(f"{out}.lock")  # removed on a clean exit

    write_prompts(tmp_path / "prompts.jsonl", 3, start=12)  # then the same command again resumes
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with serve_in_thread(fake_openai(answer)) as url:
        argv = cmd[cmd.index("collect"):]
        argv[argv.index("--base-url") + 1] = url + "/v1"
        capsys.readouterr()
        assert cli(argv) == 0
    printed = capsys.readouterr().out
    assert "(12 already in the output)" in printed and "answered:  3" in printed
    assert sorted(read_ids(out)) == sorted(f"q{i}" for i in range(15))


HOLDER = textwrap.dedent("""
    import fcntl, json, os, sys, time
    from imitation_jax.collect.output_lock import hold_output, lock_path
    out, mode = sys.argv[1], sys.argv[2]
    if mode == "hold":
        with hold_output(out, "collect"):
            print("held", flush=True)
            time.sleep(120)
    else:  # a holder that locked but has not written its record (the file names a dead pid)
        fd = os.open(lock_path(out), os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, json.dumps({"pid": 2 ** 22 + 7, "host": os.uname().nodename}).encode())
        print("held", flush=True)
        time.sleep(120)
""")


def holder(out, mode: str = "hold") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_survives_nothing_of_a_killed_holder(tmp_path):
    """A SIGKILLed holder leaves its lock file with its pid, but not the lock: the next run takes
    it. A holder whose record is stale (its pid is not running) is not named."""
    from imitation_jax.collect.output_lock import hold_output, lock_path
    from imitation_jax.errors import ConfigError

    out = tmp_path / "out.jsonl"
    proc = holder(out)
    with pytest.raises(ConfigError, match=rf"held by pid {proc.pid} on {socket.gethostname()} \(collect, since "):
        with hold_output(str(out)):
            pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(open(lock_path(str(out))).read())["pid"] == proc.pid  # left behind, stale
    with hold_output(str(out), "judge"):
        with hold_output(str(out)):  # re-entrant in one process
            assert json.loads(open(lock_path(str(out))).read())["pid"] == os.getpid()
    assert not os.path.exists(lock_path(str(out)))

    proc = holder(out, "stale")
    try:
        with pytest.raises(ConfigError, match="held by a process that has not recorded itself") as err:
            with hold_output(str(out)):
                pass
        assert str(2 ** 22 + 7) not in str(err.value)
    finally:
        proc.kill()
        proc.wait()


def test_judge_refuses_an_output_another_judge_writes(tmp_path, capsys):
    """While another process holds the report's lock, judge exits 2 with one line before asking
    the judge anything; once it is gone, the same command runs."""
    from openai_fake import fake_openai, serve_in_thread

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path, text in ((a, "GOOD"), (b, "weak")):
        path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}?", "completion": text}) + "\n"
                                for i in range(3)))
    out = tmp_path / "report.json"
    app = fake_openai(lambda body: "[[A]]")
    proc = holder(out)
    try:
        with serve_in_thread(app) as url:
            argv = ["judge", "--a", str(a), "--b", str(b), "--base-url", url + "/v1", "--model", "judge",
                    "--out", str(out), "--quiet"]
            capsys.readouterr()
            assert cli(argv) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"imitation-jax judge: error: {out} is being written")
            assert f"held by pid {proc.pid}" in err[0]
            assert app.state.calls == 0 and not out.exists()
            proc.kill()
            proc.wait()
            assert cli(argv) == 0
    finally:
        proc.kill()
        proc.wait()
    assert json.loads(out.read_text())["n"] == 3 and app.state.calls == 6
