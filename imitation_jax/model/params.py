"""Parameter construction, one home: the model's graph and parameter shapes with their logical
axis names, shardings from the rules table, abstract (restorable) params, fresh init placed on
its devices, and vocabulary growth for special tokens added by `prepare`.

New vocabulary rows are drawn like the model's own init, normal(0, initializer_range), from a
generator seeded by (seed, which table), so every process and every shard layout gets the same
rows. Small random rows keep the new tokens' logits near zero instead of copying an old token.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from imitation_jax.model import lora
from imitation_jax.model.config import ModelConfig
from imitation_jax.model.llama import Llama
from imitation_jax.sharding import tree_shardings

Params = dict  # nested dict of arrays, our parameter layout


def model_graph(cfg: ModelConfig) -> tuple[nnx.GraphDef, Params, Params]:
    """Graph definition, parameter shapes and logical axis names, allocating nothing.

    Plain `jax.eval_shape` rather than `nnx.eval_shape`: under an active mesh the latter resolves
    logical names against the mesh itself, and our rules table must be the only place that does.
    """
    found = {}

    def build():
        graphdef, state = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))
        found["graphdef"] = graphdef
        found["names"] = nnx.to_pure_dict(jax.tree.map(
            lambda v: tuple(v.get_metadata().get("out_sharding") or (None,) * v.ndim),
            state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
        return nnx.to_pure_dict(state)

    shapes = jax.eval_shape(build)
    return found["graphdef"], shapes, found["names"]


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Params:
    _, shapes, names = model_graph(cfg)
    return tree_shardings(shapes, names, mesh)


def abstract_params(cfg: ModelConfig, mesh: Mesh) -> Params:
    """ShapeDtypeStructs with target shardings, e.g. for restoring a checkpoint into this mesh."""
    _, shapes, names = model_graph(cfg)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, tree_shardings(shapes, names, mesh))


def init_params(cfg: ModelConfig, mesh: Mesh, seed: int) -> Params:
    def init():
        return nnx.to_pure_dict(nnx.split(Llama(cfg, rngs=nnx.Rngs(seed)))[1])

    return jax.jit(init, out_shardings=param_shardings(cfg, mesh))()


def base_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` without adapters: the frozen base of a LoRA model (or `cfg` itself)."""
    return dataclasses.replace(cfg, lora=lora.LoraConfig()) if cfg.lora.enabled else cfg


def init_adapters(cfg: ModelConfig, mesh: Mesh, seed: int) -> Params:
    """Fresh LoRA adapters (A drawn, B zero) on their devices; nothing else of the model is made."""
    _, shapes, names = model_graph(cfg)
    adapters, _ = lora.split(tree_shardings(shapes, names, mesh))

    def init():
        return lora.split(nnx.to_pure_dict(nnx.split(Llama(cfg, rngs=nnx.Rngs(seed)))[1]))[0]

    return jax.jit(init, out_shardings=adapters)()


def frozen_keys(abstract_frozen: Params) -> Params:
    """Zero (= dropout off) keys for the LoRA dropout-key leaves of an abstract frozen tree."""
    return jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding),
                        lora.keys_only(abstract_frozen))


def new_rows(old: int, new: int, width: int, std: float, seed: int, table: str) -> np.ndarray:
    """(new - old, width) float32 rows for ids old..new-1 of `table` ('embed' or 'lm_head')."""
    rng = np.random.default_rng([seed, zlib.crc32(table.encode()), old, new])
    return (rng.standard_normal((new - old, width), dtype=np.float32) * std).astype(np.float32)


def grow_params(params: dict, cfg, old_vocab: int, seed: int) -> dict:
    """`params` (pure dict of jax.Arrays with `old_vocab` rows) grown to `cfg.vocab_size`, each
    grown table keeping its sharding."""
    if cfg.vocab_size == old_vocab:
        return params
    _, shapes, names = model_graph(cfg)
    shardings = tree_shardings(shapes, names, jax.tree.leaves(params)[0].sharding.mesh)
    out = dict(params)
    for table, axis in (("embed", 0), ("lm_head", 1)):
        if table not in params:
            continue
        rows = new_rows(old_vocab, cfg.vocab_size, cfg.hidden_size, cfg.initializer_range, seed, table)
        rows = rows if axis == 0 else rows.T
        out[table] = jax.jit(lambda t, r: jnp.concatenate([t, r.astype(t.dtype)], axis=axis),
                             out_shardings=shardings[table])(params[table], rows)
    return out
