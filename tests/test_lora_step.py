"""The LoRA train step (train/step.py with a frozen argument): only the adapters train (the base is
neither differentiated nor in the optimizer state, and is left untouched), gradient accumulation
equals one large batch, and the abstract program compile-check lowers compiles with
adapter-only state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from imitation_jax.model import lora
from imitation_jax.model.params import model_graph
from imitation_jax.train.optimizer import OptimConfig, make_optimizer
from imitation_jax.train.state import init_opt_state
from imitation_jax.train.step import make_train_step
from test_lora import _batch, _cfg, _mesh, _parts


def test_train_step_trains_adapters_only_and_accumulates_like_one_batch():
    """Two steps on 4 rows: the loss falls, B leaves zero, the frozen tree is untouched, the
    optimizer state holds the adapters' moments only; 2 micro-batches of 2 rows give what one
    batch of 4 gives. The second run goes as the loop runs it (`compile_with_frozen`: the base's
    layout left to the compiler) from a base in another layout (reversed dims, which the CPU
    compiler does not choose; on TPU the default layout is the one it rejects): the base is moved
    leaf by leaf into the compiled step's layouts, the old buffers freed, the results unchanged."""
    from jax.experimental.layout import Format, Layout

    from imitation_jax.train.step import compile_with_frozen

    cfg = _cfg()
    mesh = _mesh()
    _, adapters, frozen = _parts(cfg)
    optimizer, _ = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0), 10)
    shard = lambda t: jax.tree.map(lambda x: x.sharding, t)  # noqa: E731
    before = jax.tree.map(np.asarray, frozen)
    outs = []
    for accum in (1, 2):
        params = jax.tree.map(jnp.copy, adapters)
        opt_state = init_opt_state(optimizer, params, mesh)
        moments = [x for x in jax.tree.leaves(opt_state) if x.ndim > 0]
        assert sum(x.size for x in moments) == 2 * lora.count(adapters)  # nothing of the base
        state = {"params": params, "opt_state": opt_state, "step": jnp.int32(0)}
        state_sh = {"params": shard(params), "opt_state": shard(opt_state),
                    "step": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())}
        with jax.set_mesh(mesh):
            step = make_train_step(model_graph(cfg)[0], optimizer, mesh, state_sh, 0, True, "cpu",
                                   frozen_shardings=shard(frozen))
            batch = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), _batch(rows=4))
            base = frozen
            if accum == 2:
                base = jax.tree.map(lambda x: jax.device_put(x, Format(Layout(tuple(reversed(range(x.ndim)))),
                                                                       x.sharding))
                                    if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating) else x,
                                    jax.tree.map(jnp.copy, frozen))
                moved = [x for x in jax.tree.leaves(base) if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating)]
                step, base = compile_with_frozen(step, state, batch, base)
                assert moved and all(x.is_deleted() for x in moved)
                for x, fmt in zip(jax.tree.leaves(base), jax.tree.leaves(step.input_formats[0][2],
                                                                         is_leaf=lambda f: isinstance(f, Format))):
                    assert fmt.layout is None or x.format.layout == fmt.layout
            state, m1 = step(state, batch, base)
            state, m2 = step(state, batch, base)
        assert float(m2["loss"]) < float(m1["loss"])
        assert float(jnp.abs(state["params"]["layers"]["attn"]["q_lora_b"]).max()) > 0  # B left zero
        outs.append(state["params"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen), before)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-7), *outs)


def test_the_abstract_lora_program_compiles_with_adapter_only_state():
    """What compile-check lowers: the LoRA train step against abstract state (adapters + their
    optimizer state), batch and frozen base; the base is an argument, not donated state."""
    from imitation_jax.train.builder import build_program
    from imitation_jax.train.config import Config

    cfg = Config()
    cfg.train.batch_size = 2
    mesh = _mesh()
    with jax.set_mesh(mesh):
        program = build_program(cfg, mesh, _cfg(), 10)
        assert program.lora and not program.base_model.lora.enabled
        assert set(program.abstract["params"]["layers"]["mlp"]) == {"gate_lora_a", "gate_lora_b", "up_lora_a",
                                                                    "up_lora_b", "down_lora_a", "down_lora_b"}
        assert "q" in program.abstract_base()["layers"]["attn"] and "embed" in program.abstract_base()
        compiled = program.train_step.lower(program.abstract_step_state(), program.abstract_batch(16),
                                            program.frozen).compile()
    assert compiled.memory_analysis().argument_size_in_bytes > 0

