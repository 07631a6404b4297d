"""LoRA adapters (model/lora.py): step 0 equals the base, merged equals unmerged, the adapters'
gradients equal autodiff of the merged-weight formula, dropout keys, shardings on an 8-device mesh,
the optimizer state's share of full fine-tuning, config errors. The train step: test_lora_step.py."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imitation_jax.model import ModelConfig, lora
from imitation_jax.model.lora import LoraConfig
from imitation_jax.model.params import base_config, init_adapters, model_graph
from imitation_jax.sharding import MeshConfig, make_mesh
from imitation_jax.train.objectives import sft_sums
from imitation_jax.train.optimizer import OptimConfig, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                   platform="cpu")


def _cfg(**lora_kw):
    return dataclasses.replace(BASE, lora=LoraConfig(**{"rank": 4, "alpha": 8.0, **lora_kw}))


def _mesh():
    return make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])


def _parts(cfg, seed=0, fresh_adapters=False):
    """(base params, adapters, frozen rest: base + zero keys) on one device, drawn with numpy
    (model.params.init_params compiles for seconds); `fresh_adapters`: model.params.init_adapters."""
    _, shapes, _ = model_graph(cfg)
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = str(path[-1].key)
        if name == lora.KEY:
            return np.zeros(s.shape, s.dtype)
        if name.endswith(lora.SUFFIX_B):
            return np.zeros(s.shape, s.dtype)
        if name == "weight":  # norms
            return 1.0 + 0.1 * rng.standard_normal(s.shape).astype(s.dtype)
        return (0.1 * rng.standard_normal(s.shape)).astype(s.dtype)

    params = jax.tree.map(jnp.asarray, jax.tree_util.tree_map_with_path(draw, shapes))
    adapters, frozen = lora.split(params)
    if fresh_adapters:
        adapters = init_adapters(cfg, _mesh(), seed + 1)
    return lora.base_only(frozen), adapters, frozen


_RUNS: dict = {}


def _logits(cfg, params, tokens):
    """Logits of the model `cfg` on `params` (one compiled function per config)."""
    if repr(cfg) not in _RUNS:
        graph = model_graph(cfg)[0]

        @jax.jit
        def run(params, tokens):
            model = nnx.merge(graph, params)
            return model.logits(model(tokens))

        _RUNS[repr(cfg)] = run
    return np.asarray(_RUNS[repr(cfg)](params, tokens))


def _randomize_b(adapters, seed=3):
    """Adapters with B drawn too (B = 0 at init makes every update vanish)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)
    rng = np.random.default_rng(seed)
    out = [jnp.asarray(rng.normal(0, 0.05, x.shape).astype(np.float32)) if str(p[-1].key).endswith(lora.SUFFIX_B)
           else x for p, x in leaves]
    return jax.tree_util.tree_unflatten(treedef, out)


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 12)), jnp.int32)


def test_step_zero_equals_the_base():
    cfg = dataclasses.replace(_cfg(), remat="full")  # scanned layers, rematerialised
    base, adapters, frozen = _parts(cfg, fresh_adapters=True)
    a = adapters["layers"]["mlp"]["down_lora_a"]
    assert 0 < float(jnp.abs(a).max()) <= 1 / np.sqrt(cfg.intermediate_size)  # A drawn as PEFT does
    b = [x for p, x in jax.tree_util.tree_leaves_with_path(adapters) if str(p[-1].key).endswith(lora.SUFFIX_B)]
    assert len(b) == 7 and not any(float(jnp.abs(x).max()) for x in b)  # B = 0
    np.testing.assert_array_equal(_logits(cfg, lora.combine(adapters, frozen), TOKENS),
                                  _logits(base_config(cfg), base, TOKENS))


@pytest.mark.parametrize("targets", [list(lora.TARGETS), ["o", "down"]])
def test_merged_and_unmerged_give_the_same_logits(targets):
    cfg = dataclasses.replace(_cfg(targets=targets), scan_unroll=4)  # straight-line layers
    base, adapters, frozen = _parts(cfg)
    adapters = _randomize_b(adapters)
    full = lora.combine(adapters, frozen)
    unmerged = _logits(cfg, full, TOKENS)
    merged = _logits(base_config(cfg), lora.merged(full, cfg.lora), TOKENS)
    assert np.abs(unmerged - _logits(base_config(cfg), base, TOKENS)).max() > 1e-3  # the adapters matter
    np.testing.assert_allclose(unmerged, merged, rtol=1e-5, atol=1e-5)


def _batch(rows=2, t=12, seed=1):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 64, (rows, t + 1))
    return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
            "loss_mask": jnp.asarray(rng.random((rows, t)) < 0.7, jnp.float32),
            "segment_ids": jnp.ones((rows, t), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(t), (rows, t)).astype(jnp.int32)}


def test_adapter_gradients_equal_autodiff_of_the_merged_weights():
    """d loss / d(A, B) through the model's unmerged adapter path equals autodiff of the textbook
    formula: the loss of the plain model with W + (alpha / r) A B (lora.fold)."""
    cfg = _cfg()
    base, adapters, frozen = _parts(cfg)
    adapters = _randomize_b(adapters)
    batch = _batch()
    graph, base_graph = model_graph(cfg)[0], model_graph(base_config(cfg))[0]
    ours = jax.jit(jax.grad(lambda a: sft_sums(graph, lora.combine(a, frozen), batch, 0, True)[0]))(adapters)
    ref = jax.jit(jax.grad(lambda a: sft_sums(base_graph, lora.merged(lora.combine(a, frozen), cfg.lora), batch,
                                              0, False)[0]))(adapters)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(ref)):
        assert float(jnp.abs(r).max()) > 0, path
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-4, atol=1e-6, err_msg=str(path))


def test_dropout_keys_switch_dropout_on_and_zero_keys_off():
    cfg = dataclasses.replace(_cfg(dropout=0.5), scan_unroll=4)
    base, adapters, frozen = _parts(cfg)
    adapters = _randomize_b(adapters)
    off = _logits(cfg, lora.combine(adapters, frozen), TOKENS)
    on1 = _logits(cfg, lora.combine(adapters, lora.fill_keys(frozen, jax.random.key(1))), TOKENS)
    on2 = _logits(cfg, lora.combine(adapters, lora.fill_keys(frozen, jax.random.key(2))), TOKENS)
    plain = _logits(base_config(cfg), lora.merged(lora.combine(adapters, frozen), cfg.lora), TOKENS)
    np.testing.assert_allclose(off, plain, rtol=1e-5, atol=1e-5)  # zero keys: no dropout
    assert np.abs(on1 - off).max() > 1e-4 and np.abs(on1 - on2).max() > 1e-4


def test_bad_lora_settings_are_one_line_config_errors():
    from imitation_jax.errors import ConfigError
    from imitation_jax.train.config import load_config

    tiny = os.path.join(ROOT, "configs", "tiny.yaml")
    for override, named in [("model.lora.rank=-1", "model.lora.rank"), ("model.lora.targets=[q,qq]", "model.lora.targets"),
                            ("model.lora.dropout=1.5", "model.lora.dropout")]:
        with pytest.raises(ConfigError, match=named):
            load_config(tiny, [override])


def test_optimizer_state_share_at_rank_16():
    """LLaMA-7B shapes (abstract, nothing allocated): AdamW state of rank-16 adapters on all seven
    projections as a share of full fine-tuning's (goal <= 2%)."""
    from imitation_jax.model.presets import preset

    full = dataclasses.replace(preset("llama-7b"), vocab_size=32000, platform="cpu")
    adapted = dataclasses.replace(full, lora=LoraConfig(rank=16, alpha=32))
    optimizer, _ = make_optimizer(OptimConfig(), 10)

    def state_bytes(params):
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(optimizer.init, params)))

    full_bytes = state_bytes(model_graph(full)[1])
    lora_bytes = state_bytes(lora.split(model_graph(adapted)[1])[0])
    share = lora_bytes / full_bytes
    print(f"llama-7b rank 16: optimizer state {lora_bytes / 2**20:.1f} MiB vs {full_bytes / 2**30:.2f} GiB "
          f"= {share:.3%} of full fine-tuning")
    assert share <= 0.02


SHARDING_PROBE = r"""
import dataclasses, jax
from imitation_jax.model import ModelConfig, lora
from imitation_jax.model.lora import LoraConfig
from imitation_jax.model.params import init_adapters
from imitation_jax.sharding import MeshConfig, make_mesh
from imitation_jax.train.optimizer import OptimConfig, make_optimizer
from imitation_jax.train.state import init_opt_state
cfg = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
                  lora=LoraConfig(rank=8))
mesh = make_mesh(MeshConfig(2, 2, 2))
with jax.set_mesh(mesh):
    ad = init_adapters(cfg, mesh, 0)
    opt = init_opt_state(make_optimizer(OptimConfig(), 10)[0], ad, mesh)
spec = lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
expect = {("attn", "q_lora_a"): (None, "fsdp", None), ("attn", "q_lora_b"): (None, None, "tensor", None),
          ("attn", "k_lora_b"): (None, None, "tensor", None), ("attn", "o_lora_a"): (None, "tensor", None, None),
          ("attn", "o_lora_b"): (None, None, "fsdp"), ("mlp", "gate_lora_a"): (None, "fsdp", None),
          ("mlp", "gate_lora_b"): (None, None, "tensor"), ("mlp", "down_lora_a"): (None, "tensor", None),
          ("mlp", "down_lora_b"): (None, None, "fsdp")}
for (block, name), want in expect.items():
    assert spec(ad["layers"][block][name]) == want, (name, spec(ad["layers"][block][name]))
    assert ad["layers"][block][name].dtype == jax.numpy.float32
mu = opt[1][0].mu
assert spec(mu["layers"]["attn"]["q_lora_b"]) == (None, None, "tensor", None)
assert set(mu) == {"layers"} and set(mu["layers"]["attn"]) == {n + s for n in "qkvo" for s in ("_lora_a", "_lora_b")}
print("OK")
"""


def test_adapters_and_their_optimizer_state_follow_the_layer_sharding_rules():
    out = subprocess.run([sys.executable, "-c", SHARDING_PROBE], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"), timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_lora_without_a_base_is_a_one_line_config_error(small_overrides):
    from imitation_jax.commands.train import run_training
    from imitation_jax.errors import ConfigError
    from imitation_jax.train.config import load_config

    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), small_overrides + ["model.lora.rank=4"])
    with pytest.raises(ConfigError, match="init.hf .* or init.checkpoint"):
        run_training(cfg)
