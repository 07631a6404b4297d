"""Keeping freed host memory inside the process when JAX computes on the CPU (glibc only).

XLA's CPU runtime allocates each step's temporaries with malloc, in blocks large enough that glibc
serves them with mmap and unmaps them on free, so every step faults all of it back in page by page
(the cost measured on the bench is in docs/benchmarks.md). Three mallopt settings make steady-state steps fault-free, as an
LD_PRELOADed jemalloc/tcmalloc would, without a preload:

- M_MMAP_MAX=0: large blocks come from the heap, not from mmap;
- M_TRIM_THRESHOLD=-1, which glibc stores as a size_t (SIZE_MAX): freed heap memory is never
  returned. The largest positive int (2 GiB-1) is not enough: a step that frees more than 2 GiB at
  once had it trimmed and faulted back in every step (docs/benchmarks.md: the 135M-shape step);
- M_ARENA_MAX=1: one arena for every thread; a per-thread arena cannot grow past 64 MiB, and for
  anything larger glibc falls back to mmap whatever M_MMAP_MAX says.

The process's resident memory then stays at its peak instead of breathing with every step, which
is what a training process wants. Arenas are bound to threads at their first malloc, so this must
run before XLA starts its thread pools, i.e. before the first device is touched.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform

MODES = ("auto", "keep", "release")
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# Installed accelerator plugins: with one of these JAX computes on the accelerator by default and
# host memory is not the hot path (pinned transfer buffers have their own allocator).
_ACCELERATOR_MODULES = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm7_plugin", "jax_rocm60_plugin", "libtpu")


def cpu_only() -> bool:
    """Whether JAX will compute on the CPU, decided without initialising a backend."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_MODULES)


def configure(mode: str = "auto") -> bool:
    """Apply the settings for mode "keep", or for "auto" when JAX runs on the CPU only; returns
    whether they are in effect. A no-op (False) for "release", off Linux/glibc, or if mallopt refuses."""
    if mode not in MODES:
        raise ValueError(f"host memory mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "release" or (mode == "auto" and not cpu_only()):
        return False
    if not _glibc():
        return False
    libc = ctypes.CDLL(None)
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_ARENA_MAX, 1))
    return all(libc.mallopt(option, value) == 1 for option, value in settings)


def trim() -> None:
    """Hand the memory kept by `configure` back to the system now (malloc_trim), e.g. once a large
    model is released and the process goes on to something else; a no-op off glibc."""
    if _glibc():
        ctypes.CDLL(None).malloc_trim(0)


def _glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
