"""The LLaMA model against transformers, and its invariants: packing, remat, dtypes, presets, RoPE.

Tiny configs (hidden 64-128, 2 layers, vocab ~300, seq 64-96) keep the whole file well under a
minute on two CPU cores. Reference: transformers `LlamaForCausalLM`, torch CPU, fp32, eager
attention, random weights from a fixed seed (larger than HF's init, so attention is far from uniform
and RoPE, norms and every projection matter to the logits).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from imitation_jax.convert.hf_layout import model_config_from_hf, params_from_hf
from imitation_jax.model import PRESETS, Llama, ModelConfig, RopeScaling, preset
from imitation_jax.model.layers import _rope_tables, rope_inv_freq, rope_tables
from imitation_jax.model.params import model_graph
from test_kernels import _reference_ce as reference_ce  # log-softmax cross entropy, by autodiff

PARITY_TOL = 1e-4
VOCAB = 300
SEQ = 64

# Attention implementations that run on this host: cudnn needs a GPU (and fp16/bf16).
ON_GPU = jax.devices()[0].platform == "gpu"
CPU_IMPLS = ("xla", "einsum")

# ---------------------------------------------------------------------------------------------
# Config styles: HF LlamaConfig keyword arguments (transformers 5 keeps RoPE in `rope_parameters`).
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
             max_position_embeddings=256, attention_bias=False, mlp_bias=False)
STYLES: dict[str, dict] = {
    # LLaMA-1: multi-head attention, theta 1e4, eps 1e-6.
    "llama1": dict(_BASE, num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6,
                   rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    # LLaMA-2 (70B-like): grouped-query attention, eps 1e-5.
    "llama2_gqa": dict(_BASE, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                       rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    # LLaMA-3: GQA, theta 5e5.
    "llama3": dict(_BASE, num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5,
                   rope_parameters=dict(rope_type="default", rope_theta=500000.0)),
    # LLaMA-3.1: llama3 frequency scaling with a short original context (32) and sequences of 96, so
    # the scaling matters; head_dim 32 so the 16 frequencies fall in all three bands (see
    # test_rope_llama3_scaling_matches_transformers).
    "llama31_scaled": dict(_BASE, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                           rms_norm_eps=1e-5,
                           rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                low_freq_factor=1.0, high_freq_factor=4.0,
                                                original_max_position_embeddings=32)),
    # Tied input and output embeddings.
    "tied": dict(_BASE, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                 tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
    # Explicit head_dim (32) != hidden / heads (16).
    "head_dim": dict(_BASE, num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
                     rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
}
STYLE_SEQ = {"llama31_scaled": 96}


def hf_config(style: str) -> LlamaConfig:
    return LlamaConfig(**STYLES[style], attn_implementation="eager")


def our_config(style: str, **compute) -> ModelConfig:
    """Our config, written from the style independently of the converter (which is checked against it)."""
    s = STYLES[style]
    rope = s["rope_parameters"]
    scaling = None
    if rope["rope_type"] == "llama3":
        scaling = RopeScaling(rope_type="llama3", factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
                              high_freq_factor=rope["high_freq_factor"],
                              original_max_position_embeddings=rope["original_max_position_embeddings"])
    return ModelConfig(
        vocab_size=s["vocab_size"], hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
        num_layers=s["num_hidden_layers"], num_heads=s["num_attention_heads"],
        num_kv_heads=s["num_key_value_heads"], head_dim=s.get("head_dim"),
        max_position_embeddings=s["max_position_embeddings"], rms_norm_eps=s["rms_norm_eps"],
        rope_theta=rope["rope_theta"], rope_scaling=scaling,
        tie_word_embeddings=s.get("tie_word_embeddings", False), **compute)


@functools.lru_cache(maxsize=None)
def hf_model(style: str) -> LlamaForCausalLM:
    """Random fp32 HF model, eval mode, with weights drawn from a fixed seed (norm scales too)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(hf_config(style)).float().eval()
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name == "model.embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model


@functools.lru_cache(maxsize=None)
def hf_params(style: str) -> dict:
    state = {k: v.detach().numpy() for k, v in hf_model(style).state_dict().items()}
    return params_from_hf(our_config(style), state.__getitem__)


def build(cfg: ModelConfig, params: dict) -> Llama:
    model = Llama(cfg, rngs=nnx.Rngs(0))
    nnx.update(model, jax.tree.map(jnp.asarray, params))
    return model


def our_logits(model: Llama, tokens, positions=None, segment_ids=None) -> np.ndarray:
    tokens = jnp.asarray(tokens)
    positions = None if positions is None else jnp.asarray(positions)
    segment_ids = None if segment_ids is None else jnp.asarray(segment_ids)
    return np.asarray(model.logits(model(tokens, positions, segment_ids)))


def hf_logits(style: str, tokens) -> np.ndarray:
    with torch.no_grad():
        return hf_model(style)(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def random_tokens(batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq), dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# 1. Logit parity with transformers, every config style, every CPU attention implementation.

def test_converter_reads_the_same_config():
    """`model_config_from_hf` on each style's HF config.json dict gives the config we write by hand."""
    for style in STYLES:
        got = ModelConfig(**model_config_from_hf(hf_config(style).to_dict()))
        want = our_config(style)
        # HF's config.json always spells head_dim out; ours may leave it implied.
        assert got.dim_per_head == want.dim_per_head, style
        assert dataclasses.replace(got, head_dim=None) == dataclasses.replace(want, head_dim=None), style


@pytest.mark.parametrize("style", list(STYLES))
def test_logits_match_transformers(style):
    seq = STYLE_SEQ.get(style, SEQ)
    tokens = random_tokens(2, seq, seed=1)
    ref = hf_logits(style, tokens)
    assert float(np.abs(ref).max()) > 1.0, "reference logits are too small for the test to mean much"
    per_impl = {}
    for impl in CPU_IMPLS:
        got = our_logits(build(our_config(style, attention=impl), hf_params(style)), tokens)
        assert got.dtype == np.float32 and got.shape == ref.shape
        diff = float(np.abs(got - ref).max())
        print(f"parity {style:15s} {impl:7s} max|ours - transformers| = {diff:.2e} (max|logit| {np.abs(ref).max():.1f})")
        assert diff <= PARITY_TOL, (style, impl, diff)
        per_impl[impl] = got
    a, b = per_impl.values()
    assert float(np.abs(a - b).max()) <= PARITY_TOL
    if style == "llama31_scaled":
        # The scaling is exercised: dropping it changes the logits far beyond the tolerance.
        unscaled = dataclasses.replace(our_config(style, attention="einsum"), rope_scaling=None)
        plain = our_logits(build(unscaled, hf_params(style)), tokens)
        assert float(np.abs(plain - ref).max()) > 100 * PARITY_TOL


@pytest.mark.skipif(not ON_GPU, reason="cudnn attention needs a GPU")
def test_cudnn_matches_xla_in_bf16():
    style = "llama2_gqa"
    tokens = random_tokens(2, SEQ, seed=1)
    seg = np.ones_like(tokens)
    seg[:, 40:] = 2
    pos = np.concatenate([np.arange(40), np.arange(SEQ - 40)])[None].repeat(2, 0)
    got = {impl: our_logits(build(our_config(style, attention=impl, dtype="bfloat16"), hf_params(style)),
                            tokens, pos, seg) for impl in ("xla", "cudnn")}
    scale = float(np.abs(got["xla"]).max())
    assert float(np.abs(got["cudnn"] - got["xla"]).max()) <= 0.05 * scale


# ---------------------------------------------------------------------------------------------
# 2. Packed rows: segments do not see each other; positions restart per segment.

@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_packed_row_equals_separate_sequences(impl):
    style = "llama2_gqa"
    model = build(our_config(style, attention=impl), hf_params(style))
    la, lb = 37, 19
    pad = SEQ - la - lb
    rng = np.random.default_rng(7)
    a = rng.integers(0, VOCAB, la, dtype=np.int32)
    b = rng.integers(0, VOCAB, lb, dtype=np.int32)
    pad_tokens = np.zeros(pad, np.int32)

    def row(a, b):
        tokens = np.concatenate([a, b, pad_tokens])[None]
        positions = np.concatenate([np.arange(la), np.arange(lb), np.zeros(pad, int)])[None].astype(np.int32)
        segments = np.concatenate([np.full(la, 1), np.full(lb, 2), np.zeros(pad, int)])[None].astype(np.int32)
        return our_logits(model, tokens, positions, segments)[0]

    packed = row(a, b)
    alone_a = our_logits(model, a[None])[0]
    alone_b = our_logits(model, b[None])[0]
    hf_a, hf_b = hf_logits(style, a[None])[0], hf_logits(style, b[None])[0]
    d_ours = max(np.abs(packed[:la] - alone_a).max(), np.abs(packed[la:la + lb] - alone_b).max())
    d_hf = max(np.abs(packed[:la] - hf_a).max(), np.abs(packed[la:la + lb] - hf_b).max())
    print(f"packed {impl}: vs alone {d_ours:.2e}, vs transformers alone {d_hf:.2e}")
    assert d_ours <= PARITY_TOL and d_hf <= PARITY_TOL

    # Segment 1 does not depend on segment 2's tokens; segment 2 does (the check can fail).
    other = row(a, (b + 1) % VOCAB)
    assert float(np.abs(other[:la] - packed[:la]).max()) <= 1e-6
    assert float(np.abs(other[la:la + lb] - packed[la:la + lb]).max()) > 1e-2


# ---------------------------------------------------------------------------------------------
# 3. Remat policies change memory, not the maths.

def test_remat_policies_give_identical_loss_and_grads():
    base = our_config("llama2_gqa", attention="einsum")
    tokens = jnp.asarray(random_tokens(2, SEQ, seed=3))
    targets = jnp.roll(tokens, -1, axis=1)
    params = None
    results = {}
    for policy in ("none", "full", "save_dots"):
        model = Llama(dataclasses.replace(base, remat=policy), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        if params is None:
            params = state
        else:
            jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(state), nnx.to_pure_dict(params))

        @jax.jit
        def loss_and_grad(state, graphdef=graphdef):
            def loss_fn(state):
                m = nnx.merge(graphdef, state)
                logits = m.logits(m(tokens))
                logp = jax.nn.log_softmax(logits, axis=-1)
                return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
            return jax.value_and_grad(loss_fn)(state)

        loss, grads = loss_and_grad(state)
        results[policy] = (float(loss), nnx.to_pure_dict(grads))

    loss0, grads0 = results["none"]
    assert np.isfinite(loss0)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads0)) > 0
    for policy in ("full", "save_dots"):
        loss, grads = results[policy]
        assert abs(loss - loss0) <= 1e-6, (policy, loss, loss0)
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            g0 = grads0
            for p in path:
                g0 = g0[p.key]
            np.testing.assert_allclose(np.asarray(g), np.asarray(g0), rtol=1e-6, atol=1e-6,
                                       err_msg=f"{policy} {jax.tree_util.keystr(path)}")


def test_layer_loop_equals_scan_for_training_and_cached_decoding():
    """scan_unroll = num_layers runs the layers as a Python loop over unstacked parameters
    (the CPU fast path): the same loss and gradients as nnx.scan, plain and under remat, and the
    same logits and cache contents when decoding with a KV cache."""
    from imitation_jax.model.kv_cache import KVCache

    base = our_config("llama2_gqa", attention="einsum")
    tokens = jnp.asarray(random_tokens(2, SEQ, seed=5))
    targets = jnp.roll(tokens, -1, axis=1)
    results = {}
    for name, unroll, remat in (("scan", 1, "none"), ("loop", base.num_layers, "none"),
                                ("loop_remat", base.num_layers, "full")):
        model = Llama(dataclasses.replace(base, scan_unroll=unroll, remat=remat), rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        @jax.jit
        def run(state, graphdef=graphdef):
            def loss_fn(state):
                m = nnx.merge(graphdef, state)
                logp = jax.nn.log_softmax(m.logits(m(tokens)), axis=-1)
                return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))
            loss, grads = jax.value_and_grad(loss_fn)(state)
            m = nnx.merge(graphdef, state)
            cache = KVCache.create(m.cfg, jnp.zeros((2,), jnp.int32), SEQ)
            hidden, cache = m.decode(tokens[:, :SEQ - 1], jnp.broadcast_to(jnp.arange(SEQ - 1), (2, SEQ - 1)), cache)
            hidden, cache = m.decode(tokens[:, SEQ - 1:], jnp.full((2, 1), SEQ - 1), cache)
            return loss, grads, m.logits(hidden[:, -1]), cache.k
        loss, grads, last_logits, cache_k = run(state)
        results[name] = (float(loss), nnx.to_pure_dict(grads), np.asarray(last_logits), np.asarray(cache_k))

    loss0, grads0, logits0, k0 = results["scan"]
    assert cache_k.shape[0] == base.num_layers and np.abs(k0).max() > 0
    for name in ("loop", "loop_remat"):
        loss, grads, logits, k = results[name]
        assert abs(loss - loss0) <= 1e-6, (name, loss, loss0)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name), grads, grads0)
        np.testing.assert_allclose(logits, logits0, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(k, k0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style,unroll,remat,chunk", [
    ("llama2_gqa", 1, "none", 16),     # nnx.scan over all but the last layer
    ("llama2_gqa", 2, "full", 16),     # the layer loop, under remat
    ("tied", 2, "none", 0),            # tied output layer, one chunk of everything
    ("llama3", 1, "save_dots", 24),    # 24 does not divide 64: padded chunks
])
def test_last_layer_inside_the_loss_equals_autodiff_of_the_whole_model(style, unroll, remat, chunk):
    """train.fuse_last_layer: the model stops after the last layer's attention, and the loss runs
    the rest (output projection, MLP, final norm) on the chunks with trained tokens only. Loss,
    accuracy and every gradient equal autodiff of log-softmax over the plain model's logits."""
    from imitation_jax.train.step import loss_sums

    cfg = dataclasses.replace(our_config(style, attention="einsum"), scan_unroll=unroll, remat=remat)
    graphdef, state = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(random_tokens(3, SEQ, seed=7))
    mask = np.zeros((3, SEQ), np.float32)
    mask[0, 40:52] = 1  # trained tokens late in a row: sorting brings them to the first chunk
    mask[1, 5:9] = 1
    mask[1, 60:] = 1    # row 2 trains nothing
    seg = np.ones((3, SEQ), np.int32)
    seg[1, 30:] = 2     # two examples packed in row 1
    pos = np.where(seg == 2, np.arange(SEQ) - 30, np.arange(SEQ)).astype(np.int32)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1), "loss_mask": jnp.asarray(mask),
             "segment_ids": jnp.asarray(seg), "positions": jnp.asarray(pos)}

    def reference(state):
        m = nnx.merge(graphdef, state)
        hidden = m(batch["inputs"], batch["positions"], batch["segment_ids"])
        loss, correct, tokens = reference_ce(hidden, m.output_kernel(), batch["targets"], jnp.asarray(mask))
        return loss, (correct, tokens)

    fused = lambda state: loss_sums(graphdef, state, batch, chunk, fuse_last_layer=True)  # noqa: E731
    (loss0, (correct0, tokens0)), grads0 = jax.jit(jax.value_and_grad(reference, has_aux=True))(state)
    (loss, (correct, n)), grads = jax.jit(jax.value_and_grad(fused, has_aux=True))(state)
    assert float(tokens0) == float(n) == mask.sum()
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-5)
    assert float(correct) == float(correct0)
    # Every parameter gets its gradient, the last layer's MLP too (through the loss's own backward).
    flat0 = dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads0)))
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads)):
        g0 = np.asarray(flat0[path])
        assert np.abs(g0).max() > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(g), g0, rtol=2e-4, atol=2e-6, err_msg=jax.tree_util.keystr(path))
    # The eval path (no gradients) gives the same sums.
    loss_eval, (correct_eval, _) = jax.jit(fused)(state)
    np.testing.assert_allclose(float(loss_eval), float(loss0), rtol=1e-5)
    assert float(correct_eval) == float(correct0)


# ---------------------------------------------------------------------------------------------
# 4. bf16 compute with fp32 parameters.

def test_bf16_compute_returns_fp32_logits_close_to_fp32():
    style = "llama2_gqa"
    tokens = jnp.asarray(random_tokens(2, SEQ, seed=5))
    ref = our_logits(build(our_config(style, attention="einsum"), hf_params(style)), tokens)
    model = build(our_config(style, attention="einsum", dtype="bfloat16"), hf_params(style))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    hidden = model(tokens)
    assert hidden.dtype == jnp.bfloat16
    logits = model.logits(hidden)
    assert logits.dtype == jnp.float32
    logits = np.asarray(logits)
    diff = np.abs(logits - ref)
    scale = float(np.abs(ref).max())
    rel = float(np.linalg.norm(logits - ref) / np.linalg.norm(ref))
    print(f"bf16 vs fp32: max abs {diff.max():.3f} (max|logit| {scale:.1f}), relative L2 {rel:.4f}")
    assert diff.max() <= 0.1 * scale
    assert rel <= 0.03
    assert diff.max() > 1e-4  # bf16 really was used
    # And the argmax agrees almost everywhere.
    assert float(np.mean(logits.argmax(-1) == ref.argmax(-1))) >= 0.9


# ---------------------------------------------------------------------------------------------
# 5. Presets against the published Hugging Face config.json files and parameter counts.

_L1 = dict(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0,
           rope_scaling=None, tie_word_embeddings=False)
_L2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
           rope_scaling=None, tie_word_embeddings=False)
_L3 = dict(vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
           rope_scaling=None, tie_word_embeddings=False)
_L31_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
_L31 = dict(_L3, max_position_embeddings=131072, rope_scaling=_L31_SCALING)


def _hf(base, hidden, inter, layers, heads, kv):
    return dict(base, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv)


# Published config.json numbers (huggyllama/llama-*, meta-llama/Llama-2-*-hf, meta-llama/Meta-Llama-3-*,
# meta-llama/Llama-3.1-*), and the parameter counts of those checkpoints.
PUBLISHED = {
    "llama-7b": (_hf(_L1, 4096, 11008, 32, 32, 32), 6_738_415_616),
    "llama-13b": (_hf(_L1, 5120, 13824, 40, 40, 40), 13_015_864_320),
    "llama-30b": (_hf(_L1, 6656, 17920, 60, 52, 52), 32_528_943_616),
    "llama-65b": (_hf(dict(_L1, rms_norm_eps=1e-5), 8192, 22016, 80, 64, 64), 65_285_660_672),
    "llama2-7b": (_hf(_L2, 4096, 11008, 32, 32, 32), 6_738_415_616),
    "llama2-13b": (_hf(_L2, 5120, 13824, 40, 40, 40), 13_015_864_320),
    "llama2-70b": (_hf(_L2, 8192, 28672, 80, 64, 8), 68_976_648_192),
    "llama3-8b": (_hf(_L3, 4096, 14336, 32, 32, 8), 8_030_261_248),
    "llama3-70b": (_hf(_L3, 8192, 28672, 80, 64, 8), 70_553_706_496),
    "llama3.1-8b": (_hf(_L31, 4096, 14336, 32, 32, 8), 8_030_261_248),
    "llama3.1-70b": (_hf(_L31, 8192, 28672, 80, 64, 8), 70_553_706_496),
}


def _as_hf_numbers(cfg: ModelConfig) -> dict:
    scaling = None if cfg.rope_scaling is None else dataclasses.asdict(cfg.rope_scaling)
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_position_embeddings,
                rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, rope_scaling=scaling,
                tie_word_embeddings=cfg.tie_word_embeddings)


def shape_param_count(cfg: ModelConfig) -> int:
    _, shapes, _ = model_graph(cfg)
    return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def test_every_preset_is_checked():
    # the other families' presets are checked against transformers' counts in test_families
    families = {name for name, fields in PRESETS.items() if fields.get("family", "llama") != "llama"}
    assert set(PRESETS) - {"tiny"} - families == set(PUBLISHED)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_matches_published_config_and_param_count(name):
    numbers, count = PUBLISHED[name]
    cfg = preset(name)
    assert cfg.dim_per_head == 128
    ours = _as_hf_numbers(cfg)
    mismatched = {k: (ours[k], v) for k, v in numbers.items() if ours[k] != v}
    assert not mismatched, f"{name}: (ours, published) {mismatched}"
    start = time.perf_counter()
    from_shapes = shape_param_count(cfg)
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"model_graph({name}) took {elapsed:.1f}s"
    assert from_shapes == count, (name, from_shapes, count)
    assert cfg.num_params() == from_shapes


def test_tiny_preset_size():
    cfg = preset("tiny", vocab_size=2048)
    n = shape_param_count(cfg)
    assert cfg.num_params() == n
    assert 1_000_000 <= n <= 10_000_000, n


@pytest.mark.parametrize("style", list(STYLES))
def test_num_params_matches_shapes_and_transformers(style):
    """Also for tied, GQA and explicit-head_dim configs, and equal to the HF model's count."""
    cfg = our_config(style)
    n = shape_param_count(cfg)
    assert cfg.num_params() == n
    assert n == sum(p.numel() for p in hf_model(style).parameters())


# ---------------------------------------------------------------------------------------------
# 6. RoPE frequencies, including LLaMA-3.1 scaling, against transformers' own init functions.

def _hf_inv_freq(**kwargs) -> np.ndarray:
    config = LlamaConfig(**kwargs)
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        inv_freq, scale = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config)
    assert scale == 1.0
    return inv_freq.numpy()


@pytest.mark.parametrize("style", list(STYLES))
def test_rope_inv_freq_matches_transformers(style):
    cfg = our_config(style)
    ours = rope_inv_freq(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling)
    ref = _hf_inv_freq(**STYLES[style])
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (cfg.dim_per_head // 2,)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)  # HF computes in fp32, we in fp64


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_rope_tables_match_float64_for_positions_inside_and_beyond_the_row(platform):
    """rope_tables looks positions within the row up in a table (on CPU, behind a conditional) and
    computes any others directly: both routes give the float64 values to float32 rounding, and the
    same float32 values for the same position; traced for another platform it computes them all."""
    inv_freq = rope_inv_freq(64, 500000.0, None)
    rng = np.random.default_rng(0)
    inside = np.stack([np.arange(256), rng.integers(0, 256, 256)]).astype(np.int32)
    beyond = inside + np.int32(3000)  # beyond the row's length: computed directly
    tables = jax.jit(lambda p: rope_tables(p, inv_freq, platform))
    got = {name: [np.asarray(t) for t in tables(jnp.asarray(pos))] for name, pos in (("in", inside), ("out", beyond))}
    for name, pos in (("in", inside), ("out", beyond)):
        angle = pos.astype(np.float32)[..., None].astype(np.float64) * inv_freq.astype(np.float64)
        angle = np.concatenate([angle, angle], -1).astype(np.float32).astype(np.float64)  # the fp32 angle
        np.testing.assert_allclose(got[name][0], np.cos(angle), rtol=0, atol=2e-6)
        np.testing.assert_allclose(got[name][1], np.sin(angle), rtol=0, atol=2e-6)
    direct = [np.asarray(t) for t in jax.jit(lambda p: _rope_tables(p, inv_freq))(jnp.asarray(inside))]
    assert all(np.array_equal(a, b) for a, b in zip(got["in"], direct))


@pytest.mark.parametrize("name", ["llama3.1-8b", "llama3.1-70b"])
def test_rope_llama3_scaling_matches_transformers(name):
    cfg = preset(name)
    s = cfg.rope_scaling
    ours = rope_inv_freq(cfg.dim_per_head, cfg.rope_theta, s)
    ref = _hf_inv_freq(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
                       max_position_embeddings=cfg.max_position_embeddings,
                       rope_parameters=dict(rope_type="llama3", rope_theta=cfg.rope_theta, factor=s.factor,
                                            low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                                            original_max_position_embeddings=s.original_max_position_embeddings))
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=0)  # HF computes in fp32, we in fp64


def test_llama31_style_exercises_all_three_bands():
    """The tiny 3.1 style has unchanged, smoothed and divided frequencies, so parity covers each."""
    cfg = our_config("llama31_scaled")
    plain = rope_inv_freq(cfg.dim_per_head, cfg.rope_theta, None)
    scaled = rope_inv_freq(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling)
    ratio = plain / scaled
    factor = cfg.rope_scaling.factor
    unchanged = np.isclose(ratio, 1.0, rtol=1e-6)
    divided = np.isclose(ratio, factor, rtol=1e-6)
    smoothed = ~unchanged & ~divided
    assert unchanged.any() and divided.any() and smoothed.any(), ratio
    assert np.all((ratio[smoothed] > 1) & (ratio[smoothed] < factor))
