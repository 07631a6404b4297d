"""The sharded training state beyond the parameters (imitation_jax.model.params): optimizer state
placed like the parameters it mirrors, built directly on its devices under `jax.jit`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from imitation_jax.sharding import replicated


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
