"""Device mesh and the one table that maps logical axis names to mesh axes.

Parameters and activations are annotated with logical names ("embed", "mlp", ...); only this
module knows how those names land on the ("data", "fsdp", "tensor") mesh, so a new parallelism
layout is a change to `LOGICAL_RULES`, not to the model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated).
LOGICAL_RULES: dict[str, Any] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "layers": None,
    # activations
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


@dataclasses.dataclass
class MeshConfig:
    """Mesh axis sizes; one of them may be -1 to take the devices left over."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: only one of data/fsdp/tensor may be -1, got {sizes}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: sizes must be positive or -1, got data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes ({known})")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh: data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
            f"does not match the {num_devices} available devices"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    if len(devices) == len(jax.devices()):
        # make_mesh orders devices by the physical topology (ICI rings on TPU).
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    return Mesh(np.array(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def platform_of(mesh: Mesh) -> str:
    """"cpu", "gpu" or "tpu": what the mesh's devices are (ModelConfig.platform is decided from this)."""
    return device_platform(mesh.devices.flat[0])


def device_platform(device: jax.Device) -> str:
    """A device's platform as the model names it: libtpu's compile-only devices (compile-check) say
    "tpu", CUDA and ROCm devices "gpu"."""
    return "gpu" if device.platform in ("cuda", "rocm") else device.platform


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh_axis_sizes: dict[str, int] | None = None, rules: dict[str, Any] = LOGICAL_RULES) -> P:
    """PartitionSpec for logical `names`. A mesh axis is used at most once, and a dimension that
    the mesh axes do not divide stays replicated (e.g. 4 KV heads on 8-way tensor parallelism)."""
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        if name is not None and name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule")
        axes = rules.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used)
        if mesh_axis_sizes is not None:
            axes = tuple(a for a in axes if mesh_axis_sizes.get(a, 1) > 1)
            if shape is not None and axes and shape[i] % math.prod(mesh_axis_sizes[a] for a in axes):
                axes = ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*spec)


def _axis_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def tree_shardings(shapes: Any, logical_names: Any, mesh: Mesh) -> Any:
    """NamedSharding for every array of `shapes` (a pytree of arrays or ShapeDtypeStructs) from
    the matching tuple of logical names in `logical_names` (same tree structure)."""
    sizes = _axis_sizes(mesh)
    names_leaves = jax.tree.leaves(logical_names, is_leaf=lambda x: isinstance(x, tuple))
    shape_leaves, treedef = jax.tree.flatten(shapes)
    return treedef.unflatten([NamedSharding(mesh, logical_to_spec(n, s.shape, sizes))
                              for n, s in zip(names_leaves, shape_leaves, strict=True)])


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), None, _axis_sizes(mesh)))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's layout to the logical `names` when tracing under a mesh (no-op otherwise)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, _axis_sizes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
