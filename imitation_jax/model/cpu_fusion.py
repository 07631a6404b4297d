"""Where the model runs, and the one workaround it needs for XLA:CPU's fusion.

XLA:CPU copies cheap producers (sin/cos, transposes, RoPE) into every fusion that consumes them, so
a value read by many slices is recomputed for each. `optimization_barrier` does not stop it (it is
removed before fusion on CPU); a conditional does, since nothing is fused across one.
"""

from __future__ import annotations

import jax


def default_platform() -> str:
    """The platform JAX computes on by default: "cpu", "gpu"/"cuda", "tpu", ..."""
    return jax.devices()[0].platform


def cpu_conditional(pred: jax.Array, on_true, on_false, *operands):
    """`lax.cond(pred, on_true, on_false, *operands)` on CPU, so each branch's result is computed
    once; `on_false(*operands)` elsewhere. Both branches must give the same values (up to rounding):
    the conditional is there for the fusion boundary, not for a choice that changes results."""
    if default_platform() != "cpu":
        return on_false(*operands)
    return jax.lax.cond(pred, on_true, on_false, *operands)
