"""The jitted train and eval steps: masked loss normalised over the whole global batch, gradient
accumulation by `lax.scan` over micro-batches, explicit in/out shardings, donated state."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imitation_jax.model import cpu
from imitation_jax.sharding import logical_to_spec, platform_of, replicated
from imitation_jax.train.loss import masked_cross_entropy

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def loss_sums(graphdef: nnx.GraphDef, params, batch: dict, loss_chunk: int = 0, fuse_last_layer: bool = True):
    """(loss sum, (correct, trained tokens)) for one (micro-)batch of rows (B, T).

    fuse_last_layer: the model stops before the last layer's position-wise part, which the chunked
    loss then runs for the chunks holding trained tokens only (the same sums, less work)."""
    model = nnx.merge(graphdef, params)
    args = batch["inputs"], batch["positions"], batch["segment_ids"]
    if fuse_last_layer:
        hidden, tail = model.trunk(*args)
    else:
        hidden, tail = model(*args), None
    loss, correct, tokens = masked_cross_entropy(hidden, model.output_kernel(), batch["targets"],
                                                 batch["loss_mask"], loss_chunk, tail)
    return loss, (correct, tokens)


def compiler_options(platform: str) -> dict | None:
    """The XLA flags the steps compile with on `platform` (only CPU has any: `model.cpu`)."""
    return dict(cpu.COMPILER_OPTIONS) if platform == "cpu" else None


def accum_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches arrive as (grad_accum, micro_batch, seq): micro-batch rows split over data x fsdp."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    return NamedSharding(mesh, P(None, *logical_to_spec(("batch", None), None, sizes)))


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, mesh: Mesh,
                    state_shardings: Any, loss_chunk: int = 0, fuse_last_layer: bool = True,
                    platform: str | None = None) -> Callable:
    """state = {"params", "opt_state", "step"}; batch leaves (grad_accum, micro, T). `platform`: the
    model config's (ModelConfig.platform, which chose the kernels in `graphdef`); default the mesh's."""
    param_shardings = state_shardings["params"]

    def grad_fn(params, micro):
        return jax.value_and_grad(lambda p: loss_sums(graphdef, p, micro, loss_chunk, fuse_last_layer),
                                  has_aux=True)(params)

    def step(state, batch):
        params = state["params"]
        total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        if batch["inputs"].shape[0] == 1:
            (loss, (correct, _)), grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch))
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        else:
            def micro_step(carry, micro):
                g_acc, l_acc, c_acc = carry
                (l, (c, _)), g = grad_fn(params, micro)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                g_acc = jax.lax.with_sharding_constraint(g_acc, param_shardings)
                return (g_acc, l_acc + l, c_acc + c), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            zero = jnp.zeros((), jnp.float32)
            (grads, loss, correct), _ = jax.lax.scan(micro_step, (zeros, zero, zero), batch)
        # Every trained token of the global batch weighs the same: divide the summed gradient once.
        grads = jax.tree.map(lambda g: g / total, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss / total, "accuracy": correct / total, "grad_norm": grad_norm, "loss_tokens": total}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return jax.jit(step, in_shardings=(state_shardings, accum_batch_sharding(mesh)),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,),
                   compiler_options=compiler_options(platform or platform_of(mesh)))


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh, param_shardings: Any, loss_chunk: int = 0,
                   fuse_last_layer: bool = True, platform: str | None = None) -> Callable:
    """Sums over one batch (B, T): loss, correct, trained tokens (the caller divides at the end).
    `platform` as in `make_train_step`."""
    def step(params, batch):
        loss, (correct, tokens) = loss_sums(graphdef, params, batch, loss_chunk, fuse_last_layer)
        return {"loss_sum": loss, "correct": correct, "tokens": tokens}

    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    batch_sharding = NamedSharding(mesh, logical_to_spec(("batch", None), None, sizes))
    return jax.jit(step, in_shardings=(param_shardings, batch_sharding), out_shardings=replicated(mesh),
                   compiler_options=compiler_options(platform or platform_of(mesh)))
