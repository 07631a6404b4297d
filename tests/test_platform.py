"""The platform (cpu/gpu/tpu) is decided once, from the mesh, and carried in ModelConfig.platform:
a train step traced for a TPU contains none of the CPU path's conditionals (while the CPU one
does), both programs compute the same numbers, and loading or generating on a CPU mesh takes the
CPU path whatever platform the saved config names."""

from __future__ import annotations

import importlib.util
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from imitation_jax.generate import cache as decode_cache
from imitation_jax.model import Llama, ModelConfig
from imitation_jax.model.attention import resolve_impl
from imitation_jax.model.config import with_platform
from imitation_jax.model.params import abstract_params, init_params, model_graph
from imitation_jax.sharding import MESH_AXES, MeshConfig, make_mesh, platform_of, replicated
from imitation_jax.train.optimizer import OptimConfig, make_optimizer
from imitation_jax.train.state import opt_state_shardings
from imitation_jax.train.step import BATCH_KEYS, accum_batch_sharding, loss_sums, make_train_step

CPU_SOURCE = os.path.join("imitation_jax", "model", "cpu.py")
LOSS_SOURCE = os.path.join("imitation_jax", "train", "loss.py")
SEQ = 256  # two einsum-attention query blocks
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2,
            max_position_embeddings=SEQ, initializer_range=0.1)


def cpu_mesh():
    return make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])


def tiny(platform, attention="auto", **kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw}, attention=attention, platform=platform)


# ---------------------------------------------------------------------------------- deciding it


def test_platform_is_decided_from_the_mesh_once():
    mesh = cpu_mesh()
    assert platform_of(mesh) == "cpu"
    for undecided in (None, "auto"):
        assert with_platform(tiny(undecided), mesh).platform == "cpu"
    assert with_platform(tiny("tpu"), mesh).platform == "tpu"  # a user's choice is kept
    # What devices report: libtpu's compile-only devices say "tpu" (test below), CUDA ones "gpu".
    fake = lambda name: types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform=name)]))  # noqa: E731
    assert [platform_of(fake(p)) for p in ("tpu", "gpu", "cuda", "rocm", "cpu")] == ["tpu", "gpu", "gpu", "gpu", "cpu"]
    with pytest.raises(ValueError, match="model.platform='TPU' is not one of auto, cpu, gpu, tpu"):
        tiny("TPU")


def test_undecided_platform_falls_back_to_the_default_backend_in_llama_only():
    """A Llama built from a config without a platform (tests, tools) takes the default backend's;
    the kernels below it refuse an undecided one rather than guess."""
    model = Llama(tiny(None), rngs=nnx.Rngs(0))
    assert model.cfg.platform == jax.default_backend()
    with pytest.raises(ValueError, match="not decided"):
        resolve_impl("auto", None)
    assert [resolve_impl("auto", p, jnp.bfloat16) for p in ("cpu", "gpu", "tpu")] == ["einsum", "cudnn", "xla"]
    assert resolve_impl("auto", "gpu", jnp.float32) == "xla"  # cuDNN has no fp32 attention


# ------------------------------------------------------------------- what the train step contains


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(item, "eqns"):
                yield item
            elif hasattr(getattr(item, "jaxpr", None), "eqns"):
                yield item.jaxpr


def _conditionals(jaxpr) -> list[str]:
    """For each `cond` in the program, the project file that created it (innermost frame)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cond":
            frames = eqn.source_info.traceback.frames if eqn.source_info.traceback is not None else []
            ours = [f.file_name for f in frames if os.sep + "imitation_jax" + os.sep in f.file_name]
            found.append(ours[0] if ours else "?")
        for sub in _subjaxprs(eqn):
            found += _conditionals(sub)
    return found


def _train_step(cfg: ModelConfig, mesh):
    """(traced train step, lowered StableHLO text) of make_train_step for `cfg` on `mesh`."""
    optimizer, _ = make_optimizer(OptimConfig(warmup_steps=0), 100)
    with jax.set_mesh(mesh):
        params = abstract_params(cfg, mesh)
        opt = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                           jax.eval_shape(optimizer.init, params), opt_state_shardings(optimizer, params, mesh))
        state = {"params": params, "opt_state": opt,
                 "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))}
        micro = mesh.shape["data"] * mesh.shape["fsdp"]
        batch = {k: jax.ShapeDtypeStruct((1, micro, SEQ), jnp.float32 if k == "loss_mask" else jnp.int32,
                                         sharding=accum_batch_sharding(mesh)) for k in BATCH_KEYS}
        step = make_train_step(model_graph(cfg)[0], optimizer, mesh, jax.tree.map(lambda x: x.sharding, state),
                               loss_chunk=64, platform=cfg.platform)
        traced = step.trace(state, batch)
        return traced, traced.lower().as_text()


@pytest.mark.parametrize("scan_unroll", [2, 1])  # layer loop / nnx.scan
def test_tpu_train_step_has_no_cpu_conditionals(scan_unroll):
    """Lowered on this machine's CPU, the step of a model traced for TPU has no conditional from
    model/cpu.py: its only `stablehlo.case` is the loss's chunk skipping. Traced for CPU it has the
    RoPE tables' and the attention's (transposed keys and values): one per layer in the layer loop."""
    mesh = cpu_mesh()
    found = {}
    for name, cfg in (("cpu", tiny("cpu", scan_unroll=scan_unroll)),
                      ("tpu", tiny("tpu", "xla", scan_unroll=scan_unroll)),
                      ("tpu auto", tiny("tpu", scan_unroll=scan_unroll))):
        traced, text = _train_step(cfg, mesh)
        cases = text.count("stablehlo.case") + text.count("stablehlo.if")
        found[name] = (_conditionals(traced.jaxpr.jaxpr), cases, text)
    (cpu_conds, cpu_cases, _), (tpu_conds, tpu_cases, tpu_text) = found["cpu"], found["tpu"]
    assert len(tpu_conds) == tpu_cases == 1 and tpu_conds[0].endswith(LOSS_SOURCE), tpu_conds
    assert sum(f.endswith(CPU_SOURCE) for f in cpu_conds) >= 2  # RoPE tables, attention
    assert cpu_cases > tpu_cases
    if scan_unroll == TINY["num_layers"]:
        assert cpu_cases - tpu_cases == 1 + TINY["num_layers"]
    assert found["tpu auto"][2] == tpu_text  # attention="auto" is xla on a TPU: nothing to force


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (the compile-check venv: make install-tpu)")


@needs_libtpu
def test_compile_check_devices_decide_tpu():
    """The compile-only devices of a TPU topology (what compile-check lowers for) say "tpu", so the
    config resolved from that mesh traces the TPU program: no conditional from the CPU path."""
    from imitation_jax.train.compile_check import parse_topology, topology_devices

    devices = topology_devices(parse_topology("v5e-4"))
    mesh = jax.make_mesh((4, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    cfg = with_platform(tiny(None), mesh)
    assert cfg.platform == "tpu"
    traced, _ = _train_step(cfg, mesh)
    conds = _conditionals(traced.jaxpr.jaxpr)
    assert conds and not any(f.endswith(CPU_SOURCE) for f in conds), conds


# ------------------------------------------------------------------------ the same numbers


def _batch(seed: int = 0) -> dict:
    """Two rows of two packed examples each, about half of each example trained."""
    rng = np.random.default_rng(seed)
    rows, cuts = 2, (100, 170)
    vocab = TINY["vocab_size"]
    batch = {"inputs": rng.integers(0, vocab, (rows, SEQ)), "targets": rng.integers(0, vocab, (rows, SEQ)),
             "loss_mask": np.zeros((rows, SEQ), np.float32), "segment_ids": np.ones((rows, SEQ), np.int32),
             "positions": np.zeros((rows, SEQ), np.int32)}
    for r, cut in enumerate(cuts):
        for s, (lo, hi) in enumerate(((0, cut), (cut, SEQ))):
            batch["segment_ids"][r, lo:hi] = s + 1
            batch["positions"][r, lo:hi] = np.arange(hi - lo)
            batch["loss_mask"][r, (lo + hi) // 2:hi] = 1
    return {k: jnp.asarray(v, jnp.float32 if k == "loss_mask" else jnp.int32) for k, v in batch.items()}


@pytest.mark.parametrize("attention", ["auto", "einsum"])  # auto: einsum on CPU, xla on TPU
def test_cpu_and_tpu_programs_compute_the_same(attention):
    """fp32 on this CPU: loss, gradients (the CPU's hand-written SwiGLU backward and conditionals
    against the TPU program's autodiff) and prefill + decode logits agree to float tolerance."""
    mesh = cpu_mesh()
    cfgs = {p: with_platform(tiny(p, attention, scan_unroll=2), mesh) for p in ("cpu", "tpu")}
    params = init_params(cfgs["cpu"], mesh, seed=0)
    batch = _batch()
    out = {}
    for p, cfg in cfgs.items():
        graphdef = model_graph(cfg)[0]
        fn = jax.jit(jax.value_and_grad(lambda prm, b: loss_sums(graphdef, prm, b, 64), has_aux=True))
        (loss, (correct, tokens)), grads = fn(params, batch)
        model = nnx.merge(graphdef, params)
        tokens_in = batch["inputs"][:, :24]
        logits, cache = jax.jit(lambda t: decode_cache.prefill(model, t, jnp.array([0, 5]), 32))(tokens_in)
        steps = [logits]
        extend = jax.jit(lambda c, t: decode_cache.extend(model, c, t))
        for _ in range(3):  # decode positions lie beyond the prefill row: the RoPE tables' other branch
            logits, cache = extend(cache, jnp.argmax(logits, -1).astype(jnp.int32))
            steps.append(logits)
        out[p] = (loss, correct, tokens, grads, steps)
    (l_c, c_c, t_c, g_c, s_c), (l_t, c_t, t_t, g_t, s_t) = out["cpu"], out["tpu"]
    assert float(t_c) == float(t_t) == float(jnp.sum(batch["loss_mask"]))
    np.testing.assert_allclose(l_c, l_t, rtol=1e-5)
    assert float(c_c) == float(c_t)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_c), jax.tree.leaves(g_t)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))),
                                   err_msg=jax.tree_util.keystr(path))
    for a, b in zip(s_c, s_t):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------- inference paths


def test_load_model_and_generator_take_the_platform_of_their_mesh(tmp_path, tiny_tokenizer):
    """A params dir saved with platform "tpu" loads onto this CPU mesh as a CPU model; a Generator
    given a model whose config is for another platform runs the graph for its own mesh."""
    from imitation_jax.checkpoint import save_params
    from imitation_jax.convert import params_dir
    from imitation_jax.convert.loading import LoadedModel, load_model
    from imitation_jax.data.templates import get_template
    from imitation_jax.generate.engine import _graph_for

    mesh = cpu_mesh()
    saved = tiny("tpu", vocab_size=tiny_tokenizer.vocab_size)
    params = init_params(saved, mesh, seed=0)
    save_params(str(tmp_path / params_dir.PARAMS_DIR), params)
    params_dir.write_meta(str(tmp_path), saved, None, "test")
    tiny_tokenizer.save(str(tmp_path / params_dir.TOKENIZER_DIR))

    loaded = load_model(str(tmp_path), mesh=mesh)
    assert loaded.config.platform == "cpu"
    assert nnx.merge(loaded.graphdef, loaded.params).cfg.platform == "cpu"

    by_hand = LoadedModel(saved, model_graph(saved)[0], params, tiny_tokenizer, get_template("koala"), "test")
    assert nnx.merge(by_hand.graphdef, params).cfg.platform == "tpu"
    assert nnx.merge(_graph_for(by_hand, mesh), params).cfg.platform == "cpu"
    assert _graph_for(loaded, mesh) is loaded.graphdef  # already for this mesh: not rebuilt
