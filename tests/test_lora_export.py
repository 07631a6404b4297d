"""A LoRA run on an HF base, end to end: loading merges the adapters (the same logits as the
unmerged model), plain export-hf writes merged weights transformers runs with the same logits, and
`export-hf --adapter` writes a PEFT adapter that `peft.PeftModel.from_pretrained(base, DIR)` runs
with the same logits as ours; a changed base is a one-line CheckpointError on load and export;
`import-hf` of that adapter and `init.adapter` continue training from it; and the rest of the CPU
demo path (`make demo-lora`: eval, transformers + peft greedy reply)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def _hf_base(path, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                      max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def lora_run(demo_dir, tmp_path_factory):
    from conftest import small_run_overrides
    from imitation_jax.commands.train import run_training
    from imitation_jax.train.config import load_config

    tmp = tmp_path_factory.mktemp("lora_export")
    base = _hf_base(tmp / "base")
    overrides = [o for o in small_run_overrides(demo_dir, tmp / "run") if not o.startswith("train.steps=")]
    cfg = load_config(TINY, overrides + [f"init.hf={base}", "model.lora.rank=4", "model.lora.alpha=8",
                                         "model.lora.targets=[q,v,o,gate,down]", "optim.lr=3e-2",
                                         "train.steps=3", "eval.max_batches=1"])
    run_training(cfg)
    return str(tmp / "run"), base, tmp


TOKENS = np.random.default_rng(0).integers(4, 512, (2, 16))


def _ours(model):
    m = model.model()
    return np.asarray(m.logits(m(jnp.asarray(TOKENS, jnp.int32))))


def test_load_merges_adapters_and_peft_and_hf_exports_match(lora_run):
    from transformers import LlamaForCausalLM

    from imitation_jax.convert.hf_export import export_hf
    from imitation_jax.convert.loading import load_model, open_model
    from imitation_jax.convert.peft_export import export_adapter

    run, base, tmp = lora_run
    merged = load_model(run)
    assert not merged.config.lora.enabled and "lora" not in json.dumps(list(merged.params["layers"]["attn"]))
    apart = load_model(run, merge=False)
    ours = _ours(merged)
    np.testing.assert_allclose(_ours(apart), ours, rtol=1e-5, atol=1e-5)

    plain = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        base_logits = plain(torch.tensor(TOKENS)).logits.numpy()
    assert np.abs(base_logits - ours).max() > 1e-3  # training moved the adapters

    adapter = export_adapter(run, str(tmp / "adapter"))
    config = json.load(open(tmp / "adapter" / "adapter_config.json"))
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8.0, "LORA")
    assert config["target_modules"] == ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    assert adapter["params"] == 2 * 4 * ((64 + 64) + (64 + 32) + (64 + 64) + (64 + 160) + (160 + 64))  # layers x r x (in + out)
    with torch.no_grad():
        peft_model = peft.PeftModel.from_pretrained(plain, str(tmp / "adapter"))
        peft_logits = peft_model(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(peft_logits, ours, rtol=1e-4, atol=1e-4)

    # Our loader reads the PEFT dir back (base_model_name_or_path: the HF base): the same model.
    from_peft = load_model(str(tmp / "adapter"))
    assert "PEFT adapter" in from_peft.source
    np.testing.assert_allclose(_ours(from_peft), ours, rtol=1e-5, atol=1e-5)

    export_hf(open_model(run), str(tmp / "hf"), dtype="float32")
    with torch.no_grad():
        hf_logits = LlamaForCausalLM.from_pretrained(str(tmp / "hf"), dtype=torch.float32)(
            torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(hf_logits, ours, rtol=1e-4, atol=1e-4)


def test_a_changed_base_is_a_one_line_error(lora_run):
    from imitation_jax.convert.loading import load_model
    from imitation_jax.convert.peft_export import export_adapter
    from imitation_jax.errors import CheckpointError

    run, base, tmp = lora_run
    _hf_base(base, seed=1)  # the same path, other weights
    try:
        for action in (lambda: load_model(run), lambda: export_adapter(run, str(tmp / "adapter2"))):
            with pytest.raises(CheckpointError, match="the base changed") as err:
                action()
            assert "\n" not in str(err.value)
    finally:
        _hf_base(base, seed=0)


def test_init_checkpoint_from_a_lora_run_starts_from_its_merged_model(lora_run):
    import types

    import jax

    from imitation_jax.convert.init_params import initial_params
    from imitation_jax.convert.loading import _one_device_mesh, load_model
    from imitation_jax.model.params import abstract_params

    run, _, _ = lora_run
    merged = load_model(run)
    mesh = _one_device_mesh()
    with jax.set_mesh(mesh):
        params = initial_params(types.SimpleNamespace(hf=None, checkpoint=run), merged.config, mesh,
                                abstract_params(merged.config, mesh), 0)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, merged.params)

    # init.checkpoint's architecture (norm epsilon, RoPE, sizes) is the run's, from any of its paths
    from imitation_jax.convert.init_params import ARCH_FIELDS, with_checkpoint_architecture
    from imitation_jax.model.config import ModelConfig

    for path in (run, os.path.join(run, "checkpoints"), os.path.join(run, "checkpoints", "3")):
        arch = with_checkpoint_architecture(ModelConfig(rms_norm_eps=1e-5, rope_theta=5e5), path)
        assert [getattr(arch, f) for f in ARCH_FIELDS] == [getattr(merged.config, f) for f in ARCH_FIELDS]
        assert arch.rms_norm_eps == 1e-6


def test_unsupported_peft_adapters_are_one_line_errors(lora_run, tmp_path):
    import shutil

    from imitation_jax.convert.loading import load_model
    from imitation_jax.errors import CheckpointError

    run, base, tmp = lora_run
    src = tmp / "adapter"
    if not src.is_dir():
        from imitation_jax.convert.peft_export import export_adapter

        export_adapter(run, str(src))
    for change, named in [({"use_dora": True}, "use_dora"), ({"target_modules": ["lm_head"]}, "target_modules"),
                          ({"base_model_name_or_path": str(tmp_path / "nowhere")}, "not a local HF dir")]:
        bad = tmp_path / named.replace(" ", "_")
        shutil.copytree(src, bad)
        config = json.load(open(bad / "adapter_config.json"))
        json.dump({**config, **change}, open(bad / "adapter_config.json", "w"))
        with pytest.raises(CheckpointError, match=named) as err:
            load_model(str(bad))
        assert "\n" not in str(err.value)


def test_import_hf_of_a_peft_adapter_continues_training_from_it(lora_run, capsys):
    """`import-hf ADAPTER` imports the base and keeps the adapter; a run with init.adapter starts
    from those adapters (lr 0: its checkpoint is the model the adapter came from) and takes its
    rank, alpha and targets; a different model.lora is a one-line error."""
    from conftest import small_run_overrides
    from imitation_jax.cli import main
    from imitation_jax.commands.train import run_training
    from imitation_jax.convert.loading import load_model
    from imitation_jax.convert.peft_export import export_adapter
    from imitation_jax.errors import ConfigError
    from imitation_jax.train.config import load_config

    run, base, tmp = lora_run
    export_adapter(run, str(tmp / "adapter_c"))
    assert main(["import-hf", str(tmp / "adapter_c"), "--out", str(tmp / "imported")]) == 0
    printed = capsys.readouterr().out
    assert f"init.checkpoint={tmp / 'imported'} init.adapter={tmp / 'imported' / 'adapter'}" in printed
    assert json.load(open(tmp / "imported" / "adapter" / "adapter_config.json"))["base_model_name_or_path"] == base

    overrides = [o for o in small_run_overrides(_demo_dir(run), tmp / "continued") if not o.startswith("train.steps=")]
    cfg = load_config(TINY, overrides + [f"init.checkpoint={tmp / 'imported'}", f"init.adapter={tmp / 'imported' / 'adapter'}",
                                         "optim.lr=0", "train.steps=1", "eval.max_batches=1"])
    run_training(cfg)
    assert (cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.targets) == (4, 8.0, ["q", "v", "o", "gate", "down"])
    np.testing.assert_allclose(_ours(load_model(str(tmp / "continued"))), _ours(load_model(run)), rtol=1e-5, atol=1e-5)

    with pytest.raises(ConfigError, match="differs from init.adapter") as err:
        run_training(load_config(TINY, overrides + [f"init.adapter={run}", "model.lora.rank=8",
                                                    f"run_dir={tmp / 'mismatch'}"]))
    assert "\n" not in str(err.value)


def _demo_dir(run):
    import yaml

    return os.path.dirname(yaml.safe_load(open(os.path.join(run, "config.yaml")))["data"]["tokenizer"])


def test_the_demo_path_eval_and_greedy_replies_merged_unmerged_and_peft(lora_run, tmp_path, capsys):
    """What `make demo-lora` runs after training: `eval` of the LoRA run (adapters merged at load)
    gives the bits per byte of the merged model computed directly; greedy decoding through the KV
    cache of the unmerged model (base + adapters: what on-policy sampling and in-training tasks run)
    gives the merged model's tokens, and tools/hf_greedy.py's transformers + peft reply is ours."""
    import sys

    from imitation_jax.cli import main
    from imitation_jax.convert.loading import load_model
    from imitation_jax.convert.peft_export import export_adapter
    from imitation_jax.generate import Generator, SamplingParams

    run, base, tmp = lora_run
    prompts = [[1, 45, 99, 12, 7], [1, 300, 20]]
    unmerged = Generator(load_model(run, merge=False), max_batch=2, max_len=32)
    merged = load_model(run).model()
    for prompt, completion in zip(prompts, unmerged.generate(prompts, SamplingParams(max_new_tokens=8))):
        ids = list(prompt)  # the merged model's greedy tokens by full forward passes
        for _ in range(len(completion.tokens)):
            padded = jnp.asarray([ids + [0] * (len(prompt) + 8 - len(ids))])
            ids.append(int(jnp.argmax(merged.logits(merged(padded))[0, len(ids) - 1])))
        assert completion.tokens == ids[len(prompt):], (prompt, completion.tokens, ids)
    adapter = tmp / "adapter_demo"
    export_adapter(run, str(adapter))
    out = tmp_path / "eval.json"
    assert main(["eval", run, "--tasks", "mini_perplexity", "--limit", "3", "--out", str(out)]) == 0
    score = json.load(open(out))["results"]["mini_perplexity"]["bits_per_byte,none"]
    assert score == pytest.approx(_bits_per_byte(run, 3), rel=1e-4)

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import hf_greedy
    finally:
        sys.path.pop(0)
    capsys.readouterr()
    assert hf_greedy.main([base, "--adapter", str(adapter), "--run", run, "--max-new-tokens", "8"]) == 0
    assert "same continuation: True" in capsys.readouterr().out


def _bits_per_byte(run, limit):
    """lm-eval's bits_per_byte of mini_perplexity's first `limit` documents from a direct forward
    pass: -sum log p(token | prefix) / ln 2 / UTF-8 bytes; each document is encoded with its BOS
    and conditioned on a BOS (lm-eval's HF backend on a LLaMA tokenizer does the same)."""
    import math

    from imitation_jax.convert.loading import load_model

    loaded = load_model(run)
    model, tok = loaded.model(), loaded.tokenizer
    path = os.path.join(ROOT, "imitation_jax", "evaluation", "tasks", "data", "mini_perplexity_test.jsonl")
    docs = [json.loads(line) for line in open(path)][:limit]
    nll = nbytes = 0.0
    for doc in docs:
        ids = [tok.bos_id, tok.bos_id] + tok.encode(doc["text"])
        logp = np.asarray(jax.nn.log_softmax(model.logits(model(jnp.asarray([ids], jnp.int32)))[0], -1))
        nll -= sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1))
        nbytes += len(doc["text"].encode())
    return nll / math.log(2) / nbytes
