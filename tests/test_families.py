"""Student families (Qwen2/2.5, Qwen3, Mistral, Gemma 3 text) against transformers 5 on tiny random
models, each in a transformers-5 style config and an older hub style one (top-level rope fields,
`torch_dtype`): logits, greedy generation through our KV cache (past the sliding window), HF -> ours
-> HF bit for bit, a 2x2x2 mesh of simulated devices, and packed training rows with a window.

Tiny shapes (hidden 64, 2-3 layers, the 600-id test BPE tokenizer, sequences <= 40, windows of 4)
keep the file within seconds per family on two CPU cores.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from imitation_jax.convert.hf_config import model_config_from_dir  # noqa: E402
from imitation_jax.convert.loading import load_model  # noqa: E402
from imitation_jax.errors import CheckpointError  # noqa: E402

VOCAB = 600  # the bpe_tokenizer fixture's
TOL = 1e-4
WINDOW = 4
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=3)

# family -> (HF model class, config class, transformers-5 config kwargs, the hub-style model's changes
# to them, keys its hub-style config.json adds). The hub-style config.json is the saved one with
# `rope_parameters` / `layer_types` / `dtype` rewritten as transformers 4 wrote them.
_ROPE6 = {"rope_type": "default", "rope_theta": 1e6}
FAMILIES = {
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config",
              dict(_BASE, num_hidden_layers=2, rope_parameters=_ROPE6),
              # As Qwen2.5's published configs: a window given but switched off.
              dict(use_sliding_window=False, sliding_window=4096, max_window_layers=2),
              dict(sliding_window=4096)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config",
              dict(_BASE, num_hidden_layers=2, head_dim=32, attention_bias=False, rope_parameters=_ROPE6),
              dict(attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 1e4}), {}),
    "mistral": ("MistralForCausalLM", "MistralConfig",
                dict(_BASE, num_hidden_layers=2, sliding_window=WINDOW,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
                dict(rope_parameters=_ROPE6), {}),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig",
               dict(_BASE, num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                    hidden_activation="gelu_pytorch_tanh",
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e5},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e3}}),
               dict(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16,
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
               dict(sliding_window_pattern=2)),
}
STYLES = ("v5", "hub")
TOKENS = np.random.default_rng(0).integers(4, VOCAB, (2, 24))


def _randomize(model, seed: int) -> None:
    """Weights far from init so every norm, bias and projection shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # Gemma's (1 + w) norms start at 0, LLaMA-style ones at 1
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


def _hub_config(family: str, v5: dict) -> dict:
    """A saved transformers-5 config.json rewritten the way older hub checkpoints store it."""
    hub = {k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types", "dtype")}
    rope = v5["rope_parameters"]
    if family == "gemma3":
        rope, hub["rope_local_base_freq"] = rope["full_attention"], rope["sliding_attention"]["rope_theta"]
    hub["rope_theta"] = rope["rope_theta"]
    hub["rope_scaling"] = None if rope["rope_type"] == "default" else {
        k: v for k, v in rope.items() if k != "rope_theta"}
    hub.update(FAMILIES[family][4], torch_dtype="float32", transformers_version="4.51.0")
    return hub


@functools.lru_cache(maxsize=None)
def hf_dir(family: str, style: str, root: str, tokenizer_path: str) -> str:
    """A saved HF dir (weights, config.json in `style`, tokenizer files) of a tiny random model."""
    model_cls, cfg_cls, kwargs, hub, _ = FAMILIES[family]
    kwargs = {**kwargs, **hub} if style == "hub" else kwargs
    path = os.path.join(root, f"{family}-{style}")
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs)).float().eval()
    _randomize(model, 1)
    model.save_pretrained(path)
    if style == "hub":
        with open(os.path.join(path, "config.json")) as f:
            v5 = json.load(f)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(_hub_config(family, v5), f)
    for name in os.listdir(tokenizer_path):
        shutil.copy(os.path.join(tokenizer_path, name), os.path.join(path, name))
    return path


def hf_model(path: str):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").float().eval()


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


def our_logits(loaded, tokens) -> np.ndarray:
    import jax.numpy as jnp

    model = loaded.model()
    return np.asarray(model.logits(model(jnp.asarray(tokens))))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="module")
def dirs(root, bpe_tokenizer):
    return lambda family, style="v5": hf_dir(family, style, root, bpe_tokenizer.path)


# ------------------------------------------------------------------------------------------------
# Config mapping and logits.

@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("style", STYLES)
def test_logits_match_transformers(family, style, dirs):
    path = dirs(family, style)
    loaded = load_model(path)
    assert loaded.config.family == family
    hf = hf_model(path)
    assert type(hf).__name__ == FAMILIES[family][0]
    ref = hf_logits(hf, TOKENS)
    diff = float(np.abs(our_logits(loaded, TOKENS) - ref).max())
    assert diff <= TOL, f"{family}/{style}: max |ours - transformers| = {diff:.2e}"
    if (family, style) == ("gemma3", "v5"):  # the window mask through jax.nn.dot_product_attention (TPU's path)
        import dataclasses

        from imitation_jax.model.params import model_graph

        xla = dataclasses.replace(loaded, graphdef=model_graph(dataclasses.replace(loaded.config, attention="xla"))[0])
        assert float(np.abs(our_logits(xla, TOKENS) - ref).max()) <= TOL
    assert loaded.config.num_params() == sum(p.numel() for n, p in hf.named_parameters()
                                             if not (loaded.config.tie_word_embeddings and n == "lm_head.weight"))


def test_config_mapping_reads_each_family_feature(dirs):
    qwen2, qwen3h = model_config_from_dir(dirs("qwen2", "hub")), model_config_from_dir(dirs("qwen3", "hub"))
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.sliding_window) == (True, False, None)  # use_sliding_window off
    assert (qwen3h.qk_norm, qwen3h.qkv_bias, qwen3h.o_bias, qwen3h.head_dim, qwen3h.rope_theta) == (
        True, True, True, 32, 1e4)
    from imitation_jax.convert.hf_config import model_fields_from_hf

    qwen_window = model_fields_from_hf(dict(json.loads(open(os.path.join(dirs("qwen2", "hub"), "config.json")).read()),
                                            use_sliding_window=True, max_window_layers=1), "x")
    assert (qwen_window["sliding_window"], qwen_window["layer_types"]) == (4096, ["full_attention", "sliding_attention"])
    mistral = model_config_from_dir(dirs("mistral", "hub"))
    assert (mistral.sliding_window, mistral.layer_types, mistral.rope_theta) == (WINDOW, None, 1e6)
    g5, gh = model_config_from_dir(dirs("gemma3", "v5")), model_config_from_dir(dirs("gemma3", "hub"))
    assert g5.layer_types == FAMILIES["gemma3"][2]["layer_types"]
    assert (g5.rope_theta, g5.rope_local_theta, g5.rope_scaling.factor, g5.query_pre_attn_scalar) == (1e5, 1e3, 4.0, 24)
    assert gh.layer_types == ["sliding_attention", "full_attention"]  # sliding_window_pattern=2
    assert (gh.rope_theta, gh.rope_local_theta, gh.rope_scaling.rope_type, gh.tie_word_embeddings) == (
        1e6, 1e4, "linear", True)


# ------------------------------------------------------------------------------------------------
# Greedy generation through the KV cache, past the window.

@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_matches_transformers(family, dirs):
    from imitation_jax.generate.engine import Generator
    from imitation_jax.generate.sampling import SamplingParams

    path = dirs(family)
    loaded = load_model(path)
    gen = Generator(loaded, max_batch=2, steps_per_call=4, buckets=[32], max_len=40)
    prompts = [TOKENS[0, :7].tolist(), TOKENS[1, :3].tolist()]  # left-padded together; both pass the window
    ours = gen.generate(prompts, SamplingParams(max_new_tokens=12))
    hf = hf_model(path)
    for prompt, completion in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=3)[0, len(prompt):].tolist()
        cut = next((i for i, t in enumerate(out) if t in gen.stop_ids), len(out))
        assert completion.tokens == out[:cut], (family, prompt)
    if family == "gemma3":  # serve's continuous batching: rows inserted and moved, windows kept
        from imitation_jax.generate.slots import SlotEngine

        more = [prompts[0], TOKENS[0, 10:15].tolist()]  # the second joins when the first leaves
        params = [SamplingParams(max_new_tokens=n) for n in (8, 8)]
        got = SlotEngine(gen, slots=1).run(more, params)
        for prompt, sp, c in zip(more, params, got):
            with torch.no_grad():
                out = hf.generate(torch.tensor([prompt]), max_new_tokens=sp.max_new_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=3)[0, len(prompt):].tolist()
            assert c.tokens == out[:next((i for i, t in enumerate(out) if t in gen.stop_ids), len(out))], prompt


# ------------------------------------------------------------------------------------------------
# HF -> ours -> HF, bit for bit, in each dtype; transformers loads the export.

@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_is_bitwise_in_each_dtype(family, dirs, tmp_path):
    from safetensors.numpy import load_file

    from imitation_jax.convert.hf_export import export_hf

    src = dirs(family)
    hf = hf_model(src)
    for dtype, torch_dtype in (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        typed = tmp_path / f"in-{dtype}"
        hf.to(torch_dtype).save_pretrained(typed)  # (in place: fp32 first)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(src, name), typed / name)
        out = tmp_path / f"out-{dtype}"
        export_hf(load_model(str(typed), dtype=dtype), str(out), dtype=dtype)
        before = {k: v for k, v in load_file(typed / "model.safetensors").items()}
        after = {}
        for name in os.listdir(out):
            if name.endswith(".safetensors"):
                after.update(load_file(out / name))
        if hf.config.tie_word_embeddings:
            before.pop("lm_head.weight", None)
        assert set(before) == set(after), set(before) ^ set(after)
        for k in before:
            assert before[k].dtype == after[k].dtype and before[k].tobytes() == after[k].tobytes(), (family, dtype, k)
        exported = json.loads((out / "config.json").read_text())
        assert exported["architectures"] == [FAMILIES[family][0]]
    again = hf_model(str(tmp_path / "out-float32"))
    np.testing.assert_array_equal(hf_logits(again, TOKENS), hf_logits(hf_model(src), TOKENS))


# ------------------------------------------------------------------------------------------------
# Packed rows with a sliding window: the training loss and gradients of a packed row equal the
# unpacked rows' (segments never see each other, and the window counts from each token).

@pytest.mark.parametrize("family", ["gemma3"])  # sliding and full layers; Mistral's are all sliding
def test_packed_training_step_equals_unpacked_rows(family, dirs):
    import jax
    import jax.numpy as jnp

    from imitation_jax.train.objectives import make_loss_fn

    loaded = load_model(dirs(family))
    graphdef = loaded.graphdef
    loss_fn = make_loss_fn(graphdef, "sft", None, 0, True)
    grad = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b)[0]))
    rng = np.random.default_rng(3)
    lengths, t = (13, 9), 26
    seqs = [rng.integers(4, VOCAB, n + 1) for n in lengths]

    def batch(rows):  # rows: list of lists of sequences packed into one row each
        out = {k: np.zeros((len(rows), t), np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
        out["loss_mask"] = np.zeros((len(rows), t), np.float32)
        for r, row in enumerate(rows):
            at = 0
            for s, seq in enumerate(row):
                n = len(seq) - 1
                out["inputs"][r, at:at + n], out["targets"][r, at:at + n] = seq[:-1], seq[1:]
                out["positions"][r, at:at + n], out["segment_ids"][r, at:at + n] = np.arange(n), s + 1
                out["loss_mask"][r, at + 2:at + n] = 1.0  # a prompt of 2, like an assistant mask
                at += n
        return {k: jnp.asarray(v) for k, v in out.items()}

    # Both batches two rows (one compile): the packed one's second row is all padding.
    packed_loss, packed_grads = grad(loaded.params, batch([seqs, []]))
    rows_loss, rows_grads = grad(loaded.params, batch([[s] for s in seqs]))
    np.testing.assert_allclose(float(packed_loss), float(rows_loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(rows_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


# ------------------------------------------------------------------------------------------------
# A (2, 2, 2) mesh of 8 simulated devices equals one device, for every family.

SHARDED = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from imitation_jax.convert.hf_import import load_hf_params, read_hf_config
from imitation_jax.model.config import with_platform
from imitation_jax.model.params import model_graph
from imitation_jax.sharding import MeshConfig, make_mesh
tokens = jnp.asarray(np.random.default_rng(0).integers(4, 600, (4, 24)), jnp.int32)
meshes = [make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1]), make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))]
for path in sys.argv[1:]:
    out = []
    for mesh in meshes:
        cfg = with_platform(read_hf_config(path), mesh)
        graphdef = model_graph(cfg)[0]
        with jax.set_mesh(mesh):
            params = load_hf_params(path, cfg, mesh)
            out.append(np.asarray(jax.jit(lambda p, t: (lambda m: m.logits(m(t)))(nnx.merge(graphdef, p)))(params, tokens)))
    np.testing.assert_allclose(out[1], out[0], rtol=1e-5, atol=1e-4, err_msg=path)
print("SHARDED_OK")
"""


def test_eight_device_mesh_equals_one_device(dirs):
    """Every family's parameters (biases on heads, q/k norms, Gemma's four norms) sharded by the rules
    table, with its windows and per-layer RoPE tables in the scan."""
    paths = [dirs(f) for f in FAMILIES]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SHARDED, *paths], env=env, capture_output=True, text=True,
                          timeout=300)
    assert "SHARDED_OK" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------------------------------------------
# What stays unsupported: one line naming the field.

@pytest.mark.parametrize("change, words", [
    (dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=8), "num_experts=8"),
    (dict(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=8), "num_local_experts=8"),
    (dict(architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3", vision_config={"a": 1}),
     "vision_config"),
    (dict(final_logit_softcapping=30.0), "final_logit_softcapping"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None), "'yarn'"),
    (dict(architectures=["Phi3ForCausalLM"], model_type="phi3"), "Phi3ForCausalLM"),
    (dict(hidden_activation="gelu"), "hidden_activation='gelu'"),
])
def test_unsupported_configs_are_one_line_errors(change, words, dirs, tmp_path):
    path = dirs("gemma3", "hub")
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(change)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        load_model(str(bad))
    assert words in str(err.value) and "\n" not in str(err.value), str(err.value)


# ------------------------------------------------------------------------------------------------
# LoRA adapts every family's seven projections; merged == unmerged.

def test_lora_on_gemma3_targets_all_projections_and_merges(dirs):
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from imitation_jax.model import lora
    from imitation_jax.model.params import model_graph

    loaded = load_model(dirs("gemma3"))
    cfg = dataclasses.replace(loaded.config, lora=lora.LoraConfig(rank=2, alpha=4.0))
    graphdef, shapes, _ = model_graph(cfg)
    adapters = lora.split(shapes)[0]["layers"]
    assert sorted(k[:-7] for k in {**adapters["attn"], **adapters["mlp"]} if k.endswith("_lora_a")) == sorted(
        lora.TARGETS)
    rng = np.random.default_rng(0)
    ad = jax.tree.map(lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype), lora.split(shapes)[0])
    tokens = jnp.asarray(TOKENS)

    @functools.partial(jax.jit, static_argnums=0)
    def logits(merge, base, ad):
        if merge:
            m = nnx.merge(loaded.graphdef, lora.merged(lora.combine(base, ad), cfg.lora))
        else:
            m = nnx.merge(graphdef, lora.combine(base, ad))
        return m.logits(m(tokens))

    a, b = np.asarray(logits(False, loaded.params, ad)), np.asarray(logits(True, loaded.params, ad))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    base = np.asarray(logits(False, loaded.params, jax.tree.map(jnp.zeros_like, ad)))  # B = 0: the base
    np.testing.assert_allclose(base, hf_logits(hf_model(dirs("gemma3")), TOKENS), atol=TOL)
    assert np.abs(a - base).max() > 1e-2  # the adapters change the model


# ------------------------------------------------------------------------------------------------
# Presets: the published shapes, as transformers builds them from our exported config.json.

PRESET_COUNTS = {"qwen2.5-7b": 7_615_616_512, "qwen3-8b": 8_190_735_360, "mistral-7b": 7_241_732_096,
                 "gemma3-4b": 3_880_263_168}  # the published models' parameter counts


def test_every_family_preset_is_checked():
    from imitation_jax.model.presets import PRESETS

    assert set(PRESET_COUNTS) == {n for n, fields in PRESETS.items() if fields.get("family", "llama") != "llama"}


@pytest.mark.parametrize("name, count", PRESET_COUNTS.items())
def test_family_presets_are_the_published_models(name, count):
    from imitation_jax.convert.hf_config import hf_config_dict, model_fields_from_hf
    from imitation_jax.model import preset

    cfg = preset(name)
    hf = hf_config_dict(cfg, "bfloat16", 1, 2, None)
    fields = model_fields_from_hf(json.loads(json.dumps(hf)), name)  # read back: the same architecture
    assert {k: getattr(cfg, k) for k in fields} == fields
    config = getattr(transformers, {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "MistralConfig",
                                    "gemma3": "Gemma3TextConfig"}[cfg.family])(**{
        k: v for k, v in hf.items() if k not in ("architectures", "model_type", "transformers_version")})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == hf["architectures"][0]
    assert cfg.num_params() == count == sum(p.numel() for p in model.parameters())


def test_a_family_run_builds_its_train_step(tmp_path):
    """train's run builder (also compile-check's) takes a family preset; the lowered step runs the
    window (a shrunken gemma3-4b: its own layer pattern)."""
    import jax

    from imitation_jax.sharding import make_mesh
    from imitation_jax.train.builder import build_program, resolve_model
    from imitation_jax.train.config import load_config

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml"), [
        f"run_dir={tmp_path}", "model.preset=gemma3-4b", "model.vocab_size=300", "model.hidden_size=64",
        "model.intermediate_size=128", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.head_dim=16", "model.layer_types=[sliding_attention,full_attention]", "model.sliding_window=8",
        "data.seq_len=32", "train.batch_size=2", "train.steps=1"])
    assert cfg.model.family == "gemma3" and cfg.model.rope_scaling.rope_type == "linear"
    mesh = make_mesh(cfg.mesh, devices=jax.devices()[:1])
    with jax.set_mesh(mesh):
        program = build_program(cfg, mesh, resolve_model(cfg.model, mesh), 2)
        text = program.train_step.lower(program.abstract_step_state(), program.abstract_batch(32)).as_text()
    assert "stablehlo" in text


def test_family_features_are_checked_and_listed():
    from imitation_jax.model import ModelConfig, families

    assert {k for f in families.FAMILIES.values() for k in f} <= set(families.FIELDS)
    for fields, words in [(dict(family="qwen3"), "model.qk_norm=False: model.family=qwen3 has qk_norm=True"),
                          (dict(family="llama", sliding_window=4), "model.sliding_window=4"),
                          (dict(family="falcon"), "model.family='falcon' is not one of"),
                          (dict(family="mistral", sliding_window=4, layer_types=["full_attention"] * 2),
                           "model.layer_types=["),
                          (dict(family="qwen2", qkv_bias=True, sliding_window=4, layer_types=["sliding_attention"]),
                           "1 entries for 2 layers")]:
        cfg = ModelConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, **fields)
        with pytest.raises(ValueError) as err:
            cfg.validate()
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
