"""A LoRA run on an HF base, end to end: loading merges the adapters (the same logits as the
unmerged model), plain export-hf writes merged weights transformers runs with the same logits, and
`export-hf --adapter` writes a PEFT adapter that `peft.PeftModel.from_pretrained(base, DIR)` runs
with the same logits as ours; a changed base is a one-line CheckpointError on load and export."""

from __future__ import annotations

import json
import os

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


def test_greedy_replies_merged_unmerged_and_peft_agree(lora_run):
    """Greedy decoding (KV cache) of the merged model, of the unmerged one (base + adapters: what
    on-policy sampling and in-training tasks run) and of transformers + peft give the same tokens."""
    from transformers import LlamaForCausalLM

    from imitation_jax.convert.loading import load_model
    from imitation_jax.convert.peft_export import export_adapter
    from imitation_jax.generate import Generator, SamplingParams

    run, base, tmp = lora_run
    adapter = tmp / "adapter_greedy"
    export_adapter(run, str(adapter))
    prompts = [[1, 45, 99, 12, 7], [1, 300, 20]]
    replies = []
    for merge in (True, False):
        generator = Generator(load_model(run, merge=merge), max_batch=2, max_len=32)
        replies.append([c.tokens for c in generator.generate(prompts, SamplingParams(max_new_tokens=8))])
    assert replies[0] == replies[1]
    with torch.no_grad():
        model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32),
                                               str(adapter))
        for prompt, ours in zip(prompts, replies[0]):
            theirs = model.generate(torch.tensor([prompt]), max_new_tokens=len(ours), do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
            assert theirs == ours, (prompt, ours, theirs)
