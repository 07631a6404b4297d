"""On-policy distillation (`kd.on_policy`, commands/on_policy.py): the rows a step trains on hold the
student's own samples, which are the KV-cache Generator's for the same seed; the step's `kd` metric
equals KL(teacher || student) computed by hand from both models' logits on those rows; a run killed
mid-way resumes to the same parameters; a sharded mesh samples and trains as one device; fraction 0 is today's kd.source=teacher bit for bit; a served
teacher (kd.source=stored + teacher_url) fills the rows' stored top-K with the in-mesh teacher's
log-softmax; bad settings and an unreachable teacher are one-line errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SMALL_MODEL
from imitation_jax.commands.on_policy import (first_prompt, on_policy_row, on_policy_rows, on_policy_source,
                                              sampling_seed)
from imitation_jax.commands.train import init_source, run_training, teacher_source
from imitation_jax.errors import ConfigError
from imitation_jax.train.config import load_config
from imitation_jax.train.loop import train

ON_POLICY = ["train.objective=kd", "kd.source=teacher", "kd.on_policy.max_new_tokens=16",
             "kd.on_policy.temperature=1.0"]


def _base(demo_dir) -> list[str]:
    return SMALL_MODEL + [
        f"data.train_files=[{demo_dir}/train.jsonl]", f"data.tokenizer={demo_dir}/tokenizer.model", "data.eval_files=[]",
        "data.seq_len=64", "train.batch_size=4", "train.log_every=1", "train.peak_flops=1e12", "optim.warmup_steps=1",
        "eval.every_steps=0", "logging.progress=false", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def runs(demo_dir, tmp_path_factory, kd_teacher):
    """The session's teacher (8 steps of SFT, read only) and a different starting student (2 steps,
    another seed), by name."""
    root = tmp_path_factory.mktemp("on_policy")
    base = _base(demo_dir)
    run_training(load_config("configs/tiny.yaml", base + [f"run_dir={root}/student0", "train.steps=2",
                                                          "train.seed=1"]))
    return root, base, {"teacher": kd_teacher, "student0": str(root / "student0")}


def _config(runs, name, *extra, student="student0", teacher="teacher"):
    root, base, models = runs
    return load_config("configs/tiny.yaml", base + ON_POLICY + [f"run_dir={root}/{name}", f"kd.teacher={models[teacher]}",
                                                                f"init.checkpoint={models[student]}", *extra])


def _records(run_dir):
    return [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl") if '"loss"' in line]


def _log_softmax(model, batch):
    logits = model.logits(model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
                                jnp.asarray(batch["segment_ids"])))
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64)


@pytest.mark.parametrize("student, teacher, temperature", [("student0", "teacher", 1.0),
                                                            ("teacher", "student0", 0.0)])
def test_samples_are_the_generators_and_the_loss_is_kl_on_them(runs, student, teacher, temperature):
    """One step with every row on-policy: (b) each row is its first example's prompt followed by
    Generator.generate's tokens for that row's seed (and the stop id it sampled), trained on those
    tokens only; (a) the step's `kd` metric is KL(teacher || student) averaged over them, computed
    with jax.nn.log_softmax on both models' logits. Sampled at temperature 1 from the 2-step model
    (no row stops within 16 tokens) and greedily from the 8-step one (rows end with a stop id)."""
    from imitation_jax.convert.loading import load_model
    from imitation_jax.generate import Generator, SamplingParams

    cfg = _config(runs, f"ab-{student}", "train.steps=1", "kd.on_policy.fraction=1.0",
                  f"kd.on_policy.temperature={temperature}", student=student, teacher=teacher)
    seen, rollouts = [], []

    def recording(program, tokenizer):
        rollouts.append(on_policy_source(cfg)(program, tokenizer))

        def transform(step, params, batch):
            out, metrics = rollouts[0](step, params, batch)
            seen.append(({k: np.asarray(v).reshape(-1, v.shape[-1]) for k, v in batch.items()},
                         {k: np.asarray(v).reshape(-1, v.shape[-1]) for k, v in out.items()}, batch))
            return out, metrics
        return transform

    summary = train(cfg, init=init_source(cfg), teacher=teacher_source(cfg), batch_transform=recording)
    (before, after, device_batch), = seen
    # the step's output parameters (new arrays, as every later step passes): nothing compiles again
    traces = dict(rollouts[0].generator.traces)
    rollouts[0](0, summary["params"], device_batch)  # (outside train()'s mesh context, too)
    assert rollouts[0].generator.traces == traces
    student, teacher = load_model(runs[2][student]), load_model(runs[2][teacher])

    # (b) the samples are the generator's, for the same prompts, seeds and temperature
    rows = on_policy_rows(4, 1.0, cfg.train.seed, 0)
    assert rows.tolist() == [0, 1, 2, 3]
    prompts = [first_prompt(before["inputs"][r], before["loss_mask"][r], before["segment_ids"][r]) for r in rows]
    gen = Generator(student, max_batch=4, max_len=cfg.data.seq_len + 1)
    done = gen.generate(prompts, [SamplingParams(max_new_tokens=16, temperature=temperature,
                                                 seed=sampling_seed(cfg.train.seed, 0, int(r))) for r in rows])
    sampled = 0
    for r, prompt, c in zip(rows, prompts, done):
        mask = after["loss_mask"][r] > 0
        trained = after["targets"][r][mask].tolist()
        if c.finish_reason == "stop":
            assert trained[:-1] == c.tokens and trained[-1] in gen.stop_ids
        else:
            assert trained == c.tokens and len(c.tokens) == 16
        n = len(prompt) + len(trained) - 1  # positions of the single example
        assert after["inputs"][r][:len(prompt)].tolist() == prompt
        assert np.flatnonzero(mask).tolist() == list(range(len(prompt) - 1, n))
        assert after["segment_ids"][r].tolist() == [1] * n + [0] * (cfg.data.seq_len - n)
        assert after["positions"][r][:n].tolist() == list(range(n))
        sampled += len(trained)
    assert sampled > 4
    stops = [c.finish_reason == "stop" for c in done]
    assert any(stops) if temperature == 0 else not any(stops)

    # (a) the step's kd metric is the mean KL(teacher || student) over the sampled tokens
    log_p, log_q = _log_softmax(teacher.model(), after), _log_softmax(student.model(), after)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    mask = after["loss_mask"] > 0
    first = _records(summary["run_dir"])[0]
    assert first["on_policy_tokens"] == sampled == mask.sum() == first["loss_tokens"]
    assert first["on_policy_rows"] == 4 and first["on_policy_gen_s"] > 0 and first["on_policy_train_s"] > 0
    np.testing.assert_allclose(first["kd"], kl[mask].mean(), rtol=2e-5)
    np.testing.assert_allclose(first["loss"], kl[mask].mean(), rtol=2e-5)


class _Crash(Exception):
    pass


RESUMED = ("train.steps=3", "kd.on_policy.fraction=0.5", "checkpoint.every_steps=1")


@pytest.fixture(scope="module")
def ref_run(runs):
    """3 steps with half the rows on-policy, on one device, uninterrupted."""
    return run_training(_config(runs, "ref", *RESUMED))


def test_killed_mid_run_resumes_to_the_same_parameters(runs, ref_run):
    """(c) The reference run vs one crashed after step 1's checkpoint and run again: the same
    samples, losses and final parameters."""
    extra, ref = RESUMED, ref_run

    def crash_at_2(program, tokenizer):
        class Crash:
            pauses_clock = False

            def due(self, done, total, start):
                return done == 2  # before the checkpoint hook: step 1's is the newest

            def run(self, info):
                raise _Crash()
        return Crash()

    cfg = _config(runs, "killed", *extra)
    with pytest.raises(_Crash):
        train(cfg, init=init_source(cfg), hooks=(crash_at_2,), teacher=teacher_source(cfg),
              batch_transform=on_policy_source(cfg))
    resumed = run_training(_config(runs, "killed", *extra))
    assert resumed["start_step"] == 1
    for a, b in zip(jax.tree.leaves(ref["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    keys = ("loss", "kd", "on_policy_rows", "on_policy_tokens")
    assert [[r[k] for k in keys] for r in _records(resumed["run_dir"])] == \
           [[r[k] for k in keys] for r in _records(ref["run_dir"])]
    assert all(r["on_policy_rows"] == 2 for r in _records(ref["run_dir"]))


def test_on_policy_on_a_sharded_mesh_equals_one_device(runs, ref_run):
    """The same run on a (2, 2, 2) mesh of 8 simulated devices: the generator samples with the
    sharded live parameters and the steps give the reference's samples and losses."""
    import os
    import subprocess
    import sys

    root, base, models = runs
    cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "imitation_jax.cli", "train", "configs/tiny.yaml", *base, *ON_POLICY,
                           *RESUMED, f"run_dir={root}/eight", f"kd.teacher={models['teacher']}",
                           f"init.checkpoint={models['student0']}", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
                          capture_output=True, text=True, cwd=cwd, timeout=600,
                          env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert done.returncode == 0, done.stderr[-3000:]
    keys = ("loss", "kd", "on_policy_rows", "on_policy_tokens")
    eight = [[r[k] for k in keys] for r in _records(f"{root}/eight")]
    one = [[r[k] for k in keys] for r in _records(ref_run["run_dir"])]
    assert len(one) == 3
    np.testing.assert_allclose(eight, one, rtol=1e-5)


def test_on_policy_over_two_processes_equals_one_device(runs, ref_run, tmp_path):
    """The same run with the (2, 2, 2) mesh spread over 2 processes x 4 devices (launch/local.sh):
    each process loads its own rows; the rollout gathers the global batch, both processes sample
    the same tokens and each rebuilds its shards, so the steps equal the one-device run's."""
    from conftest import run_two_processes

    root, base, models = runs
    done = run_two_processes([*base, *ON_POLICY, *RESUMED, f"run_dir={root}/two_procs", f"kd.teacher={models['teacher']}",
                              f"init.checkpoint={models['student0']}", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
                             tmp_path / "logs")
    assert done.returncode == 0, done.stderr[-3000:]
    keys = ("loss", "kd", "on_policy_rows", "on_policy_tokens")
    two = [[r[k] for k in keys] for r in _records(f"{root}/two_procs")]
    one = [[r[k] for k in keys] for r in _records(ref_run["run_dir"])]
    assert len(two) == len(one) == 3
    np.testing.assert_allclose(two, one, rtol=1e-5)


def test_fraction_zero_is_todays_in_mesh_teacher_bit_for_bit(runs):
    """(d) kd.on_policy.fraction=0 (the default) adds no transform: the same parameters and metrics
    as train() called as before on-policy existed."""
    cfg = _config(runs, "zero", "train.steps=2")
    assert cfg.kd.on_policy.fraction == 0 and on_policy_source(cfg) is None
    now = run_training(cfg)
    old_cfg = _config(runs, "before", "train.steps=2")
    before = train(old_cfg, init=init_source(old_cfg), teacher=teacher_source(old_cfg))
    for a, b in zip(jax.tree.leaves(now["params"]), jax.tree.leaves(before["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["loss"] for r in _records(now["run_dir"])] == [r["loss"] for r in _records(before["run_dir"])]
    assert not any(k.startswith("on_policy") for k in _records(now["run_dir"])[0])


def test_rows_prompts_and_seeds_are_deterministic_and_packed_rows_use_their_first_example():
    from imitation_jax.data.packing import assemble

    assert on_policy_rows(8, 0.25, 0, 3).tolist() == on_policy_rows(8, 0.25, 0, 3).tolist()
    assert len(on_policy_rows(8, 0.25, 0, 3)) == 2 and len(on_policy_rows(8, 0.01, 0, 3)) == 1
    assert len(on_policy_rows(8, 0, 0, 3)) == 0 and on_policy_rows(8, 1.0, 5, 1).tolist() == list(range(8))
    assert len({tuple(on_policy_rows(8, 0.5, 0, s)) for s in range(10)}) > 1  # a new draw each step
    assert sampling_seed(0, 1, 2) == sampling_seed(0, 1, 2) != sampling_seed(0, 2, 1)
    # a packed row of two examples (prompt [5, 6, 7] -> reply [8, 9]; prompt [10, 11] -> reply [12])
    row = (np.asarray([5, 6, 7, 8, 9, 10, 11, 12], np.int32), np.asarray([0, 0, 0, 1, 1, 0, 0, 1], np.bool_),
           np.asarray([5, 3], np.int32))
    b = assemble([row], 10, pad_id=0)
    assert first_prompt(b["inputs"][0], b["loss_mask"][0], b["segment_ids"][0]) == [5, 6, 7]
    new = assemble([on_policy_row([5, 6, 7], [20, 21], 2)], 10, pad_id=0)
    assert new["inputs"][0][:5].tolist() == [5, 6, 7, 20, 21] and new["targets"][0][:5].tolist() == [6, 7, 20, 21, 2]
    assert new["loss_mask"][0].tolist() == [0, 0, 1, 1, 1] + [0] * 5
    assert first_prompt(b["inputs"][0], np.zeros(10, np.float32), b["segment_ids"][0]) is None


@pytest.mark.parametrize("override, named", [
    ("kd.on_policy.fraction=1.5", "kd.on_policy.fraction"), ("kd.on_policy.fraction=-0.1", "kd.on_policy.fraction"),
    ("kd.on_policy.max_new_tokens=0", "kd.on_policy.max_new_tokens"),
    ("kd.on_policy.temperature=-1", "kd.on_policy.temperature"),
    ("kd.source=stored", "kd.source=teacher"), ("kd.alpha=0.5", "kd.alpha=0"),
    ("kd.on_policy.teacher_url=http://x/v1", "kd.source=stored"),
    ("kd.on_policy.teacher_max_retries=-1", "kd.on_policy.teacher_max_retries"),
    ("train.objective=sft", "train.objective=kd")])
def test_bad_on_policy_settings_are_one_line(demo_dir, override, named):
    overrides = _base(demo_dir) + ON_POLICY + ["run_dir=/tmp/unused", "kd.teacher=/tmp/t", "kd.on_policy.fraction=0.5",
                                               override]
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")) as err:
        load_config("configs/tiny.yaml", overrides)
    assert "\n" not in str(err.value)


def test_train_without_the_rollout_refuses_an_on_policy_config(runs):
    """train() called directly with kd.on_policy set but no batch_transform would silently train
    off-policy: it says what to pass instead."""
    cfg = _config(runs, "no-rollout", "train.steps=1", "kd.on_policy.fraction=0.5")
    with pytest.raises(ValueError, match="batch_transform"):
        train(cfg, init=init_source(cfg), teacher=teacher_source(cfg))


@pytest.fixture(scope="module")
def served(runs, demo_dir, tmp_path_factory):
    """The session's teacher served in a thread, and a prepared set with stored top-K (K=4) in the
    teacher's own pieces (test_data_kd's hand-made records), for kd.source=stored."""
    from openai_fake import serve_in_thread
    from test_data_kd import K, own_tokens

    from imitation_jax.convert.loading import load_model
    from imitation_jax.data import teacher_logprobs as tl
    from imitation_jax.data.prepare import PrepareSettings, prepare
    from imitation_jax.generate import Generator
    from imitation_jax.serving.app import create_app

    loaded = load_model(runs[2]["teacher"])
    sp, rng = loaded.tokenizer._sp, np.random.default_rng(0)
    records = []
    for line in open(f"{demo_dir}/train.jsonl"):
        msgs = json.loads(line)["messages"]
        answer = msgs[1]["content"].strip()
        if len(sp.encode(msgs[0]["content"] + answer)) > 40:
            continue
        record, _ = own_tokens(sp, answer, rng)
        records.append({"messages": [{"role": "user", "content": msgs[0]["content"]},
                                     {"role": "assistant", "content": answer, tl.FIELD: tl.encode(record)}]})
        if len(records) == 16:
            break
    root = tmp_path_factory.mktemp("served")
    (root / "kd.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prepare([str(root / "kd.jsonl")], str(root / "set"), PrepareSettings(
        tokenizer=f"{demo_dir}/tokenizer.model", seq_len=64, diversity_sample=0), progress=False)
    generator = Generator(loaded, max_batch=4, buckets=(128,))
    with serve_in_thread(create_app(generator, "teacher", max_batch=4, batch_wait_ms=5)) as url:
        yield {"url": url + "/v1", "set": str(root / "set"), "k": K, "teacher": loaded}


def _served_config(runs, served, name, *extra):
    root, base, models = runs
    base = [o for o in base if not o.startswith(("data.train_files", "data.tokenizer"))]
    return load_config("configs/tiny.yaml", base + [
        f"data.path={served['set']}", "data.train_files=[]", "data.tokenizer=null", "train.objective=kd",
        "kd.source=stored", "kd.on_policy.max_new_tokens=16", "kd.on_policy.temperature=1.0",
        "kd.on_policy.fraction=1.0", f"kd.on_policy.teacher_url={served['url']}", "kd.on_policy.teacher_model=teacher",
        f"run_dir={root}/{name}", f"init.checkpoint={models['student0']}", *extra])


@pytest.mark.parametrize("token_ids", [True, False], ids=["token-ids", "text-keys"])
def test_a_served_teacher_scores_like_the_in_mesh_teacher(runs, served, token_ids, monkeypatch):
    """kd.source=stored with a served teacher: every row on-policy; at the sampled positions the
    rows' teacher_logprobs are the in-mesh teacher's top-K of its jax.nn.log_softmax on the same
    rows (atol 1e-4), nothing else is filled, and the step's `kd` is the sparse forward KL over the
    K ids + tail computed by hand from those targets and the student's log-softmax. token-ids: our
    serve honours vLLM's return_tokens_as_token_ids, so the ids are the in-mesh top-K's exactly;
    text-keys: a server that ignores it lists one entry per text, each mapped to the id it belongs
    to (a text shared by a piece and its byte-fallback piece: the larger of theirs, counted)."""
    from imitation_jax.convert.loading import load_model
    from imitation_jax.generate.text import TokenStrings
    from imitation_jax.serving.app import LogprobFormatter

    if not token_ids:  # a server that ignores the flag (the legacy format keyed by text)
        init = LogprobFormatter.__init__
        monkeypatch.setattr(LogprobFormatter, "__init__", lambda self, strings, token_ids=False: init(self, strings))
    cfg = _served_config(runs, served, f"served-{token_ids}", "train.steps=1")
    seen = []

    def recording(program, tokenizer):
        rollout = on_policy_source(cfg)(program, tokenizer)

        def transform(step, params, batch):
            out, metrics = rollout(step, params, batch)
            seen.append(({k: np.asarray(v).reshape(-1, *v.shape[2:]) for k, v in out.items()}, rollout))
            return out, metrics
        return transform

    summary = train(cfg, init=init_source(cfg), batch_transform=recording)
    (after, rollout), k = seen[0], served["k"]
    mask = after["loss_mask"] > 0
    log_p = _log_softmax(served["teacher"].model(), after)
    texts = TokenStrings(served["teacher"].tokenizer)
    ambiguous = 0
    for r, t in zip(*np.nonzero(mask)):
        # the in-mesh top-K as the legacy format lists it (by text: the higher-ranked id kept)
        top = {}
        for i in np.argsort(-log_p[r, t], kind="stable")[:k]:
            top.setdefault(int(i) if token_ids else texts(int(i))[0], log_p[r, t, i])
        if token_ids:
            np.testing.assert_array_equal(after["teacher_ids"][r, t], list(top))
            np.testing.assert_allclose(after["teacher_logprobs"][r, t], list(top.values()), atol=1e-4)
            continue
        got = after["teacher_logprobs"][r, t]
        got_ids = after["teacher_ids"][r, t]
        assert (got_ids[len(top):] == -1).all() and (got_ids[:len(top)] >= 0).all()
        np.testing.assert_allclose(np.sort(got[:len(top)]), np.sort(list(top.values())), atol=1e-4)
        for i, lp in zip(got_ids[:len(top)], got[:len(top)]):
            same = [j for j in range(texts.tokenizer.vocab_size) if texts(j)[0] == texts(int(i))[0]] \
                if texts(int(i))[0] in rollout.teacher.ambiguous[0] else [int(i)]
            ambiguous += len(same) > 1
            np.testing.assert_allclose(lp, log_p[r, t, same].max(), atol=1e-4)  # the served id is the in-mesh id
    assert (after["teacher_ids"][~mask] == -1).all()
    # the stored-KD step trains on them: its kd is the sparse forward KL (K ids + tail) by hand
    log_q = _log_softmax(load_model(runs[2]["student0"]).model(), after)
    ids = np.maximum(after["teacher_ids"][mask], 0)
    valid = after["teacher_ids"][mask] >= 0
    p = np.where(valid, np.exp(after["teacher_logprobs"][mask]), 0.0)
    q = np.where(valid, np.exp(np.take_along_axis(log_q[mask], ids, -1)), 0.0)
    p = np.concatenate([p, np.maximum(1 - p.sum(-1, keepdims=True), 1e-6)], -1)
    p /= p.sum(-1, keepdims=True)
    q = np.concatenate([q, 1 - q.sum(-1, keepdims=True)], -1)
    kl = np.where(p > 0, p * (np.log(np.maximum(p, 1e-30)) - np.log(np.maximum(q, 1e-30))), 0.0).sum(-1).mean()
    first = _records(summary["run_dir"])[0]
    assert first["on_policy_rows"] == 4 and first["on_policy_score_s"] > 0 and first["on_policy_score_dropped"] == 0
    assert first["on_policy_score_ambiguous"] == ambiguous
    np.testing.assert_allclose(first["kd"], kl, rtol=1e-4)


def test_an_unreachable_served_teacher_is_a_one_line_error(runs, served):
    """Nothing listens on port 9: after the retries, the run stops with one line naming the URL."""
    cfg = _served_config(runs, served, "unreachable", "train.steps=1", "kd.on_policy.teacher_url=http://127.0.0.1:9/v1",
                         "kd.on_policy.teacher_max_retries=0", "kd.on_policy.teacher_timeout=5")
    with pytest.raises(ConfigError, match=r"kd\.on_policy\.teacher_url=http://127\.0\.0\.1:9/v1: .*connection") as err:
        run_training(cfg)
    assert "\n" not in str(err.value)
