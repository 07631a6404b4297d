"""Creating the sharded training state: parameters placed by the rules table, optimizer state
placed like the parameters it mirrors, everything built directly on its devices under `jax.jit`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from imitation_jax.model import Llama, ModelConfig
from imitation_jax.sharding import replicated, tree_shardings

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


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def opt_state_shardings(optimizer: optax.GradientTransformation, params: Any, mesh: Mesh) -> Any:
    """Adam moments take the sharding of the parameter whose path they end with; counters and
    other scalars are replicated."""
    by_path = {_path_key(p): (leaf.shape, leaf.sharding)
               for p, leaf in jax.tree_util.tree_leaves_with_path(params)}
    shapes = jax.eval_shape(optimizer.init, params)

    def place(path, leaf):
        key = _path_key(path)
        for start in range(len(key)):
            hit = by_path.get(key[start:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(place, shapes)


def init_opt_state(optimizer: optax.GradientTransformation, params: Any, mesh: Mesh) -> Any:
    return jax.jit(optimizer.init, out_shardings=opt_state_shardings(optimizer, params, mesh))(params)


def shardings_of(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


def step_scalar(step: int, mesh: Mesh) -> jax.Array:
    # A global array even for a scalar: multi-process Orbax saves require it.
    return jax.device_put(jnp.int32(step), NamedSharding(mesh, jax.sharding.PartitionSpec()))
