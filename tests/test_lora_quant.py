"""QLoRA's quantized base (model/quant.py, model.lora.base_quant): int8 and nf4 dequantization
error within their bounds, memory per base parameter, the quantized forward within a stated
tolerance of the float one, and LoRA training on the quantized base."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imitation_jax.model import ModelConfig, lora, quant
from imitation_jax.model.lora import LoraConfig
from imitation_jax.model.params import base_config, model_graph

BASE = ModelConfig(vocab_size=64, hidden_size=128, intermediate_size=192, num_layers=2, num_heads=4, num_kv_heads=2,
                   platform="cpu", scan_unroll=2)
# Largest gap between neighbouring NF4 levels: a value is at most half of it (x absmax) from its level.
NF4_HALF_GAP = float(np.max(np.diff(quant.NF4_LEVELS))) / 2


@pytest.mark.parametrize("mode, bound, rms, bytes_per_param", [("int8", 0.5 / 127, 0.01, 1 + 4 / 64),
                                                               ("nf4", NF4_HALF_GAP, 0.1, 0.5 + 4 / 64)])
def test_dequantization_error_is_bounded_and_memory_per_parameter(mode, bound, rms, bytes_per_param):
    """Every weight within half a level (x its block's absmax) of its value; Gaussian weights'
    relative RMS error (measured: int8 0.006, nf4 0.092) below `rms`."""
    w = jnp.asarray(np.random.default_rng(0).standard_normal((2, 128, 4, 16)).astype(np.float32) * 0.02)
    codes, scale = quant.quantize(w, mode, 1)
    back = quant.dequantize(codes, scale, mode, 1, jnp.float32)
    absmax = np.abs(np.asarray(w).reshape(2, 2, 64, 4, 16)).max(axis=2, keepdims=True)
    err = np.abs(np.asarray(back - w)).reshape(2, 2, 64, 4, 16)
    assert np.all(err <= bound * absmax * (1 + 1e-6) + 1e-12), float((err / absmax).max())
    assert float((err / absmax).mean()) < bound / 2  # typical error well inside the bound
    assert float(jnp.sqrt(jnp.mean((back - w) ** 2) / jnp.mean(w ** 2))) < rms
    # Each block's absmax is represented exactly (level +-1).
    np.testing.assert_allclose(np.abs(np.asarray(back)).reshape(2, 2, 64, 4, 16).max(axis=2, keepdims=True),
                               absmax, rtol=1e-6)
    assert (codes.nbytes + scale.nbytes) / w.size == pytest.approx(bytes_per_param)
    print(f"{mode}: {(codes.nbytes + scale.nbytes) / w.size:.4f} bytes per base parameter "
          f"(float32 4, bfloat16 2); max error {float((err / absmax).max()):.4f} x block absmax")


def _params(cfg, seed=0):
    _, shapes, _ = model_graph(cfg)
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = str(path[-1].key)
        if name == lora.KEY or name.endswith(lora.SUFFIX_B):
            return np.zeros(s.shape, s.dtype)
        if name == "weight":
            return np.ones(s.shape, s.dtype)
        return (0.02 * rng.standard_normal(s.shape)).astype(s.dtype)

    return jax.tree.map(jnp.asarray, jax.tree_util.tree_map_with_path(draw, shapes))


def _logits(cfg, params, tokens):
    graph = model_graph(cfg)[0]

    @jax.jit
    def run(p, t):
        model = nnx.merge(graph, p)
        return model.logits(model(t))

    return np.asarray(run(params, tokens))


TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 16)), jnp.int32)


# Measured on this random model (weights N(0, 0.02)): int8 0.0097, nf4 0.145.
@pytest.mark.parametrize("mode, tolerance", [("int8", 0.02), ("nf4", 0.25)])
def test_quantized_forward_is_within_tolerance_of_the_float_one(mode, tolerance):
    """Step 0 of a QLoRA model (B = 0) runs the dequantized base: its logits equal the plain model's
    on the dequantized weights, and differ from the float base's by less than `tolerance` (relative
    RMS)."""
    cfg = dataclasses.replace(BASE, lora=LoraConfig(rank=4, base_quant=mode))
    plain = base_config(cfg)
    base = _params(plain)
    adapters, rest = lora.split(_params(dataclasses.replace(BASE, lora=LoraConfig(rank=4))))
    keys = lora.keys_only(rest)
    stored = quant.quantize_tree(base, mode)
    assert stored["layers"]["attn"]["q_codes"].dtype == (jnp.int8 if mode == "int8" else jnp.uint8)
    assert "embed" in stored and "q" not in stored["layers"]["attn"]
    ours = _logits(cfg, lora.combine(stored, adapters, keys), TOKENS)
    dequantized = _logits(plain, quant.dequantize_tree(stored, mode, jnp.float32), TOKENS)
    np.testing.assert_allclose(ours, dequantized, rtol=1e-5, atol=1e-5)
    full = _logits(plain, base, TOKENS)
    rel = float(np.sqrt(np.mean((ours - full) ** 2) / np.mean(full ** 2)))
    print(f"{mode}: quantized forward relative RMS error {rel:.4f}")
    assert rel < tolerance


def test_qlora_run_trains_and_loads_merged_as_it_trained(demo_dir, tmp_path):
    """`train` with model.lora.base_quant=nf4 on a base checkpoint: the frozen base is stored as
    codes; load_model merges the adapters into the dequantized base, with the logits of the
    unmerged quantized model."""
    import os

    from conftest import small_run_overrides
    from imitation_jax.checkpoint import save_params
    from imitation_jax.commands.train import run_training
    from imitation_jax.convert.loading import load_model
    from imitation_jax.train.config import load_config

    plain = dataclasses.replace(BASE, vocab_size=512, hidden_size=64, intermediate_size=160, scan_unroll=1)
    base = save_params(str(tmp_path / "base"), _params(plain))
    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")
    overrides = [o for o in small_run_overrides(demo_dir, tmp_path / "run") if not o.startswith("train.steps=")]
    run_training(load_config(tiny, overrides + [f"init.checkpoint={base}", "model.lora.rank=4", "model.scan_unroll=1",
                                                "model.lora.base_quant=nf4", "optim.lr=3e-2", "train.steps=2",
                                                "data.seq_len=64", "eval.max_batches=1"]))
    merged, apart = load_model(str(tmp_path / "run")), load_model(str(tmp_path / "run"), merge=False)
    assert not merged.config.lora.enabled and apart.config.lora.base_quant == "nf4"
    assert apart.params["layers"]["mlp"]["up_codes"].dtype == jnp.uint8
    assert float(jnp.abs(apart.params["layers"]["mlp"]["up_lora_b"]).max()) > 0
    tokens = jnp.asarray(np.random.default_rng(3).integers(4, 512, (2, 12)), jnp.int32)
    m, u = merged.model(), apart.model()
    np.testing.assert_allclose(np.asarray(m.logits(m(tokens))), np.asarray(u.logits(u(tokens))), rtol=1e-5,
                               atol=1e-5)
