"""The jitted train and eval steps: masked loss normalised over the whole global batch, gradient
accumulation by `lax.scan` over micro-batches, explicit in/out shardings, donated state."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.experimental.layout import Format, Layout
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from imitation_jax.model import cpu, lora
from imitation_jax.sharding import logical_to_spec, platform_of, replicated
from imitation_jax.train.objectives import LossFn, make_loss_fn, sft_sums

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


loss_sums = sft_sums  # cross entropy's sums (train.objectives), the default objective


def compiler_options(platform: str) -> dict | None:
    """The XLA flags the steps compile with on `platform` (only CPU has any: `model.cpu`)."""
    return dict(cpu.COMPILER_OPTIONS) if platform == "cpu" else None


def accum_batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches arrive as (grad_accum, micro_batch, seq): micro-batch rows split over data x fsdp."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    return NamedSharding(mesh, P(None, *logical_to_spec(("batch", None), None, sizes)))


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, mesh: Mesh,
                    state_shardings: Any, loss_chunk: int = 0, fuse_last_layer: bool = True,
                    platform: str | None = None, loss_fn: LossFn | None = None,
                    teacher_shardings: Any = None, frozen_shardings: Any = None,
                    dropout_seed: int | None = None) -> Callable:
    """state = {"params", "opt_state", "step"}; batch leaves (grad_accum, micro, T). `platform`: the
    model config's (ModelConfig.platform, which chose the kernels in `graphdef`); default the mesh's.
    `loss_fn` (train.objectives.make_loss_fn): the objective, cross entropy by default; with
    `teacher_shardings` the step takes the frozen teacher's parameters as its last argument.

    LoRA (`frozen_shardings` given): state["params"] holds the adapters only, and the step takes the
    frozen rest of the model (the base, and the adapters' dropout keys: model.lora) as its third
    argument, not donated, in the layout the compiler chooses (call `compile_with_frozen` first).
    Gradients, their accumulation and the optimizer see the adapters only. `dropout_seed`: adapter dropout keys drawn from (seed, step, micro-batch)."""
    param_shardings = state_shardings["params"]
    if loss_fn is None:
        loss_fn = make_loss_fn(graphdef, "sft", None, loss_chunk, fuse_last_layer)

    def grad_fn(params, micro, frozen, teacher, step, index):
        def loss(p):
            if frozen is None:
                return loss_fn(p, micro, *teacher)
            rest = frozen
            if dropout_seed is not None:
                key = jax.random.fold_in(jax.random.fold_in(jax.random.key(dropout_seed), step), index)
                rest = lora.fill_keys(frozen, key)
            return loss_fn(lora.combine(p, rest), micro, *teacher)
        return jax.value_and_grad(loss, has_aux=True)(params)

    def step(state, batch, *extra):
        frozen, teacher = (extra[0], extra[1:]) if frozen_shardings is not None else (None, extra)
        params = state["params"]
        total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        n = batch["inputs"].shape[0]
        if n == 1:
            (loss, sums), grads = grad_fn(params, jax.tree.map(lambda x: x[0], batch), frozen, teacher,
                                          state["step"], 0)
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        else:
            def micro_step(carry, xs):
                micro, index = xs
                g_acc, l_acc, s_acc = carry
                (l, s), g = grad_fn(params, micro, frozen, teacher, state["step"], index)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                g_acc = jax.lax.with_sharding_constraint(g_acc, param_shardings)
                return (g_acc, l_acc + l, jax.tree.map(jnp.add, s_acc, s)), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            zero = jnp.zeros((), jnp.float32)
            sums0 = jax.tree.map(lambda _: zero, jax.eval_shape(
                lambda: grad_fn(params, jax.tree.map(lambda x: x[0], batch), frozen, teacher, state["step"],
                                0))[0][1])
            (grads, loss, sums), _ = jax.lax.scan(micro_step, (zeros, zero, sums0), (batch, jnp.arange(n)))
        # Every trained token of the global batch weighs the same: divide the summed gradient once.
        grads = jax.tree.map(lambda g: g / total, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss / total, **{k: v / total for k, v in sums.items()},
                   "grad_norm": grad_norm, "loss_tokens": total}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    in_shardings = (state_shardings, accum_batch_sharding(mesh))
    if frozen_shardings is not None:  # laid out as the compiler likes it: `compile_with_frozen`
        in_shardings += (jax.tree.map(lambda s: Format(Layout.AUTO, s), frozen_shardings),)
    if teacher_shardings is not None:
        in_shardings += (teacher_shardings,)
    return jax.jit(step, in_shardings=in_shardings,
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,),
                   compiler_options=compiler_options(platform or platform_of(mesh)))


def compile_with_frozen(train_step: Callable, state: dict, batch: dict, frozen: Any, *rest: Any) -> tuple[Any, Any]:
    """(the compiled LoRA train step, `frozen` moved into the layouts it chose). On TPU the default
    layout of a stacked projection (d_in not minor) made XLA copy the whole frozen base into the
    layout its loop wants, every step: one more base in HBM (docs/benchmarks.md). Each leaf is
    moved and its old buffer freed before the next, so the move itself needs one leaf more."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), frozen)
    compiled = train_step.lower(state, batch, abstract, *rest).compile()
    formats = compiled.input_formats[0][2]
    leaves, treedef = jax.tree.flatten(frozen)
    for i, fmt in enumerate(jax.tree.leaves(formats, is_leaf=lambda x: isinstance(x, Format))):
        if fmt.layout is not None and leaves[i].format.layout != fmt.layout:  # None: an unused argument
            old, leaves[i] = leaves[i], jax.device_put(leaves[i], fmt)
            old.delete()  # the caller's tree is stale from here on: use the returned one
    return compiled, jax.tree.unflatten(treedef, leaves)


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh, param_shardings: Any, loss_chunk: int = 0,
                   fuse_last_layer: bool = True, platform: str | None = None) -> Callable:
    """Sums over one batch (B, T): loss, correct, trained tokens (the caller divides at the end).
    `platform` as in `make_train_step`."""
    def step(params, batch):
        loss, (correct, tokens) = sft_sums(graphdef, params, batch, loss_chunk, fuse_last_layer)
        return {"loss_sum": loss, "correct": correct, "tokens": tokens}

    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    batch_sharding = NamedSharding(mesh, logical_to_spec(("batch", None), None, sizes))
    return jax.jit(step, in_shardings=(param_shardings, batch_sharding), out_shardings=replicated(mesh),
                   compiler_options=compiler_options(platform or platform_of(mesh)))
