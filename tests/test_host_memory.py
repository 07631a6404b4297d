"""Keeping freed host memory in the process on CPU: after warm-up, a jitted step whose
temporaries are hundreds of MB takes no page faults with the settings, and faults its temporaries
back in every call without them (the cost `host_memory` exists to remove)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap

import pytest

from imitation_jax import host_memory

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc mallopt only")

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from imitation_jax import host_memory
    applied = host_memory.configure(sys.argv[1])
    import jax, jax.numpy as jnp

    @jax.jit
    def step(x):  # a 400 MB fp32 temporary (the matmul needs it materialised) from a 40 KB input
        big = jnp.exp(-jnp.outer(x, x))
        return big @ x

    x = jnp.linspace(0.0, 1.0, 10_000, dtype=jnp.float32)
    def call():
        step(x).block_until_ready()
        # XLA frees a call's temporaries on its own thread just after the result is ready; without
        # a pause the next call may allocate first, and the heap grows by a buffer (once: it then
        # holds both). The pause keeps the count about the allocator, not that race.
        time.sleep(0.05)

    for _ in range(6):
        call()
    counts = []
    for _ in range(7):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        call()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    # The median call: should that race still happen once under load (the heap then grows by one
    # buffer, once), it is one call's count, not every call's.
    print(json.dumps({"applied": applied, "faults_per_call": sorted(counts)[3], "counts": counts}))
""")


def run_child(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=300,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_memory_removes_the_page_faults_of_every_step():
    kept, released = run_child("keep"), run_child("release")
    assert kept["applied"] and not released["applied"]
    # 400 MB of temporaries are ~100K pages of 4 KiB: faulted in again on every call by default.
    assert released["faults_per_call"] > 50_000, released
    assert kept["faults_per_call"] < 10_000, kept


BIG_FREE = textwrap.dedent("""
    import ctypes, json, resource, sys
    from imitation_jax import host_memory
    host_memory.configure("keep")
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    counts = []
    for _ in range(2):  # 2.5 GiB freed at once, more than any positive int threshold would keep
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [libc.malloc(256 << 20) for _ in range(10)]
        for b in blocks:
            ctypes.memset(b, 1, 256 << 20)
        for b in reversed(blocks):
            libc.free(b)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps(counts))
""")


def test_more_than_2_gib_freed_at_once_is_kept_too():
    out = subprocess.run([sys.executable, "-c", BIG_FREE], capture_output=True, text=True, timeout=120,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}, check=True)
    first, second = json.loads(out.stdout.strip().splitlines()[-1])
    assert first > 600_000, first  # 2.5 GiB of 4 KiB pages faulted in once...
    assert second < 10_000, second  # ...and kept: none again


def test_auto_follows_the_platform(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert not host_memory.cpu_only()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.cpu_only()
    with pytest.raises(ValueError, match="host memory mode 'sometimes'"):
        host_memory.configure("sometimes")
