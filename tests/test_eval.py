"""lm-eval on our models: exact log-likelihoods and is_greedy against a plain full forward pass,
parity with lm-eval's HF backend on an exported model, generate_until stop strings, the shipped
offline suite, the eval CLI and task scores during training."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from conftest import SMALL_MODEL

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def loaded(tiny_tokenizer):
    from imitation_jax.data.templates import get_template
    from imitation_jax.convert.loading import LoadedModel
    from imitation_jax.model.config import ModelConfig
    from imitation_jax.sharding import MeshConfig, make_mesh
    from imitation_jax.model.params import init_params, model_graph

    cfg = ModelConfig(vocab_size=tiny_tokenizer.vocab_size, hidden_size=64, intermediate_size=160, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=256, initializer_range=0.2)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    params = init_params(cfg, mesh, 3)
    return LoadedModel(cfg, model_graph(cfg)[0], params, tiny_tokenizer, get_template("koala", tiny_tokenizer), "test")


_FORWARD = {}


def _full_forward_logprobs(loaded, ids):
    """log-softmax of the plain forward pass over the whole sequence (padded on the right to the
    context length so one compiled function serves every length; causal attention keeps the pads out)."""
    if id(loaded) not in _FORWARD:
        def forward(params, tokens):
            from flax import nnx

            model = nnx.merge(loaded.graphdef, params)
            return jax.nn.log_softmax(model.logits(model(tokens)), axis=-1)

        _FORWARD[id(loaded)] = jax.jit(forward)
    tokens = np.zeros((1, loaded.config.max_position_embeddings), np.int32)
    tokens[0, :len(ids)] = ids
    return np.asarray(_FORWARD[id(loaded)](loaded.params, tokens))[0, :len(ids)].astype(np.float64)


def _greedy(loaded, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(np.argmax(_full_forward_logprobs(loaded, ids)[-1])))
    return ids


def test_loglikelihood_and_is_greedy_equal_a_full_forward(loaded):
    from imitation_jax.evaluation.scoring import make_score_fn, score_requests

    rng = np.random.default_rng(0)
    v = loaded.config.vocab_size
    ctx = [1] + rng.integers(4, v, 12).tolist()
    greedy = _greedy(loaded, ctx, 3)
    pairs = [(ctx, greedy[len(ctx):])]  # is_greedy True by construction
    pairs += [(ctx, greedy[len(ctx):-1] + [t]) for t in rng.integers(4, v, 3).tolist()]  # shared prefix group
    pairs += [(ctx, [int(t)]) for t in rng.integers(4, v, 4)]  # one-token choices
    pairs += [([1] + rng.integers(4, v, int(n)).tolist(), rng.integers(4, v, int(m)).tolist())
              for n, m in [(5, 2), (40, 7), (2, 1), (90, 150)]]  # lengths across buckets; >128: chunked
    pairs += [(rng.integers(4, v, 250).tolist(), rng.integers(4, v, 20).tolist())]  # left-truncated
    max_length = loaded.config.max_position_embeddings
    got = score_requests(make_score_fn(loaded.graphdef), loaded.params, pairs, batch_size=4, max_length=max_length)
    for (c, t), (logp, is_greedy) in zip(pairs, got):
        whole = (c + t)[-(max_length + 1):]
        lp = _full_forward_logprobs(loaded, whole[:-1])[-len(t):]
        want = float(sum(lp[i, tok] for i, tok in enumerate(t)))
        assert logp == pytest.approx(want, abs=1e-4, rel=1e-5)
        assert is_greedy == all(int(np.argmax(lp[i])) == tok for i, tok in enumerate(t))
    assert got[0][1] and not any(g for _, g in got[1:4] if _ != got[0][0])


def test_generate_until_honours_stop_strings(loaded):
    from lm_eval.api.instance import Instance

    from imitation_jax.evaluation.lm_backend import ImitationJaxLM

    lm = ImitationJaxLM(model=loaded, batch_size=4)
    contexts = ["the weather today is", "please write a short story about"]

    def requests(until, n=24):
        return [Instance("generate_until", {}, (c, {"until": until, "max_gen_toks": n}), i)
                for i, c in enumerate(contexts)]

    free = lm.generate_until(requests([]), disable_tqdm=True)
    assert all(len(t) > 6 for t in free), free
    stop = free[0][3:6]
    stopped = lm.generate_until(requests([stop, "never-there"]), disable_tqdm=True)
    assert stopped[0] == free[0][:free[0].index(stop)]
    other = free[1][:free[1].index(stop)] if stop in free[1] else free[1]
    assert stopped[1] == other
    short = lm.generate_until(requests([], n=2), disable_tqdm=True)
    assert all(free_t.startswith(s) for free_t, s in zip(free, short))


def test_shipped_suite_is_offline_and_its_scorers_are_right():
    from imitation_jax.evaluation import runner
    from imitation_jax.evaluation.tasks import utils

    manager = runner.task_manager()
    assert set(runner.SUITE_TASKS) <= set(manager.all_tasks)
    docs = list(utils.load_local("mini_humaneval")["test"])
    for doc in docs:
        assert utils.code_pass_at_1(doc, [doc["canonical_solution"]]) == {"pass@1": 1.0}
    assert utils.code_pass_at_1(docs[0], ["    return None\n"]) == {"pass@1": 0.0}
    doc = {"answer": ["Leonardo da Vinci", "da Vinci"]}
    assert utils.nq_exact_match(doc, [" The Da Vinci!"])["exact_match"] == 1.0
    assert utils.nq_exact_match(doc, ["Michelangelo"])["exact_match"] == 0.0


@pytest.fixture(scope="module")
def trained_run(demo_dir, tmp_path_factory):
    """A 4-step run of the small model that evaluated two suite tasks at steps 2 and 4."""
    from imitation_jax.train.config import load_config
    from imitation_jax.commands.train import run_training as train

    run_dir = tmp_path_factory.mktemp("eval") / "run"
    cfg = load_config("configs/tiny.yaml", SMALL_MODEL + [
        f"run_dir={run_dir}", f"data.train_files=[{demo_dir}/train.jsonl]",
        "data.eval_files=[]", f"data.tokenizer={demo_dir}/tokenizer.model",
        "data.seq_len=128", "train.batch_size=8",
        "train.steps=4", "train.log_every=1", "train.peak_flops=1e12", "optim.warmup_steps=2",
        "logging.progress=false", "checkpoint.every_steps=2", "eval.tasks=[mini_mmlu,mini_perplexity]",
        "eval.tasks_every_steps=2", "eval.tasks_limit=3"])
    return train(cfg)


def test_task_scores_during_training_and_eval_cli(trained_run, tmp_path, capsys):
    from imitation_jax.cli import main

    summary = trained_run
    records = [json.loads(line) for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    task_steps = {r["step"]: r for r in records if "task/mini_mmlu/acc" in r}
    assert sorted(task_steps) == [2, 4]
    for r in task_steps.values():
        assert 0.0 <= r["task/mini_mmlu/acc"] <= 1.0 and r["task/mini_perplexity/bits_per_byte"] > 0

    out = tmp_path / "results.json"
    assert main(["eval", summary["run_dir"], "--tasks", "mini_mmlu,mini_perplexity", "--limit", "3",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mini_mmlu" in printed and "bits_per_byte" in printed
    results = json.load(open(out))
    # The final checkpoint evaluated from disk scores what training measured on the live params.
    assert results["results"]["mini_perplexity"]["bits_per_byte,none"] == pytest.approx(
        task_steps[4]["task/mini_perplexity/bits_per_byte"], rel=1e-5)
    assert results["results"]["mini_mmlu"]["acc,none"] == task_steps[4]["task/mini_mmlu/acc"]

    assert main(["eval", summary["run_dir"], "--tasks", "mini_mmlu", "--backend", "hf", "--out", str(out)]) == 2
    assert "export-hf" in capsys.readouterr().err
    assert main(["eval", summary["run_dir"], "--tasks", "no_such_task", "--out", str(out)]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_ours_equals_lm_eval_hf_backend_on_an_exported_model(trained_run, tmp_path):
    """Per-request log-likelihoods (1e-4; whole documents 1e-6 relative), is_greedy and accuracy:
    multiple choice and perplexity."""
    from imitation_jax.convert.hf_export import export_hf
    from imitation_jax.convert.loading import open_model
    from imitation_jax.evaluation import runner

    hf_dir = str(tmp_path / "hf")
    export_hf(open_model(trained_run["run_dir"]), hf_dir, dtype="float32")
    tasks = ["mini_mmlu", "mini_perplexity"]
    ours = runner.run_eval(runner.make_lm(hf_dir, "ours", batch_size=8), tasks, limit=6, log_samples=True)
    hf = runner.run_eval(runner.make_lm(hf_dir, "hf", batch_size=8), tasks, limit=6, log_samples=True)
    for task in tasks:
        a, b = ours["samples"][task], hf["samples"][task]
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b] and len(a) == 6
        for sa, sb in zip(a, b):
            assert sa["arguments"] == sb["arguments"]
            for ra, rb in zip(sa["resps"], sb["resps"]):
                va, vb = ra[0], rb[0]
                if isinstance(va, (list, tuple)):  # (logp, is_greedy)
                    assert va[0] == pytest.approx(vb[0], abs=1e-4) and va[1] == vb[1]
                else:  # a whole document: hundreds of fp32 terms, summed in another order
                    assert va == pytest.approx(vb, abs=1e-4, rel=1e-6)
    assert ours["results"]["mini_mmlu"]["acc,none"] == hf["results"]["mini_mmlu"]["acc,none"]
    assert ours["results"]["mini_perplexity"]["word_perplexity,none"] == pytest.approx(
        hf["results"]["mini_perplexity"]["word_perplexity,none"], rel=1e-4)
