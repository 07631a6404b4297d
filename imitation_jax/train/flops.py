"""Peak FLOP/s per device, for MFU: published bf16 dense peaks for accelerators, a measured fp32
matmul rate on CPUs (there is no meaningful published figure for a shared CPU)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# device_kind substring (lower case) -> dense bf16 FLOP/s per device
PEAK_BF16 = {
    "h200": 989e12, "h100": 989e12, "a100": 312e12, "l4": 121e12, "a10": 125e12,
    "v6": 918e12, "v5p": 459e12, "v5 lite": 197e12, "v5e": 197e12, "v4": 275e12, "v3": 123e12,
}


def measured_matmul_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of an n x n matmul on the default device."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops_per_device(override: float | None = None) -> float:
    if override:
        return override
    device = jax.devices()[0]
    kind = device.device_kind.lower()
    for name, flops in PEAK_BF16.items():
        if name in kind:
            return flops
    return measured_matmul_flops()
