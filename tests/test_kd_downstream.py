"""A distilled student downstream (issue 17: "everything downstream treats a distilled student like any
other"): a tiny student trained with `train.objective=kd kd.source=teacher` for a few steps, its teacher
then moved away (nothing after training may need it), goes through `eval` on the shipped offline tasks,
`export-hf` (transformers loads it; its logits are ours), `serve` (the openai client's greedy reply and
log-probabilities are the model's own) and `generate`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from test_convert import hf_logits, our_logits  # noqa: E402
from test_kd_train import _records, _run  # noqa: E402
from test_serve import KEY, MAX_LEN, _check_top, check_text, direct_logprobs, greedy_reference  # noqa: E402

TASKS = ["mini_mmlu", "mini_perplexity"]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 8


def test_a_distilled_student_is_evaluated_exported_served_and_generates(small_overrides, kd_teacher, tmp_path,
                                                                        monkeypatch, capsys):
    import shutil

    import openai
    from transformers import AutoModelForCausalLM

    from imitation_jax.cli import main
    from imitation_jax.convert.loading import load_model
    from imitation_jax.data.formats import Message
    from imitation_jax.data.templates import encode_prompt
    from openai_fake import serve_in_thread

    # A student distilled from the in-mesh teacher (a copy of the session's), scoring the offline
    # tasks at its last step.
    teacher_run = shutil.copytree(kd_teacher, tmp_path / "teacher")
    run = _run(small_overrides, tmp_path / "student", "train.steps=3", "train.objective=kd", "kd.source=teacher",
               f"kd.teacher={teacher_run}", "kd.alpha=0.2", "checkpoint.every_steps=3",
               "eval.tasks=[mini_perplexity]", "eval.tasks_limit=3")["run_dir"]
    records = _records(run)
    assert len(records) == 3 and all(r["kd"] > 0 for r in records), records
    trained = [json.loads(line) for line in open(f"{run}/metrics.jsonl") if "task/mini_perplexity" in line]
    assert [r["step"] for r in trained] == [3], trained
    shutil.rmtree(teacher_run)  # the student's config still names it

    # eval: the checkpoint from disk scores what training measured on the live parameters.
    results = tmp_path / "results.json"
    assert main(["eval", run, "--tasks", ",".join(TASKS), "--limit", "3", "--out", str(results)]) == 0, \
        capsys.readouterr().err
    scores = json.loads(results.read_text())["results"]
    assert 0.0 <= scores["mini_mmlu"]["acc,none"] <= 1.0
    assert scores["mini_perplexity"]["bits_per_byte,none"] == pytest.approx(
        trained[0]["task/mini_perplexity/bits_per_byte"], rel=1e-5)

    # The greedy reply of the student by full forward passes, the reference for serve and generate.
    loaded = load_model(run)
    prompt = encode_prompt(loaded.tokenizer, [Message(**m) for m in MESSAGES], loaded.template).tolist()
    ref = greedy_reference(loaded, prompt, NEW_TOKENS)
    assert ref, "the student stopped at once"

    # export-hf: transformers loads the export and its logits are ours (fp32, as test_convert checks).
    hf_dir = tmp_path / "hf"
    assert main(["export-hf", run, "--out", str(hf_dir), "--dtype", "float32"]) == 0
    hf, info = AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokens = np.asarray([prompt + ref])
    diff = float(np.abs(hf_logits(hf.eval(), tokens) - our_logits(loaded, tokens)).max())
    assert diff <= 1e-4, diff

    # serve (the command's own loading and app; uvicorn's blocking run swapped for a test thread).
    apps = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: apps.append(app))
    assert main(["serve", run, "--api-key", KEY, "--max-len", str(MAX_LEN), "--max-batch", "2",
                 "--model-name", "student", "--warmup", "none"]) == 0
    with serve_in_thread(apps[0]) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        reply = client.chat.completions.create(model="student", messages=MESSAGES, max_tokens=NEW_TOKENS,
                                               temperature=0, logprobs=True, top_logprobs=3).choices[0]
    assert reply.message.content and len(reply.logprobs.content) == len(ref)
    check_text(reply.message.content, loaded.tokenizer, ref)
    lp = direct_logprobs(loaded, prompt + ref)
    for j, (token, entry) in enumerate(zip(ref, reply.logprobs.content)):
        row = lp[len(prompt) - 1 + j]
        np.testing.assert_allclose(entry.logprob, row[token], atol=1e-4)
        _check_top([a.logprob for a in entry.top_logprobs], row, 3)

    # generate: the same greedy reply, written as an answers file.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "q", "messages": MESSAGES}) + "\n")
    answers = tmp_path / "answers.jsonl"
    assert main(["generate", run, "--prompts", str(prompts), "--out", str(answers),
                 "--max-new-tokens", str(NEW_TOKENS)]) == 0
    [row] = [json.loads(line) for line in answers.read_text().splitlines()]
    assert row["id"] == "q" and row["completion"] == reply.message.content
    assert row["completion_tokens"] == len(ref) and row["prompt_tokens"] == len(prompt)
