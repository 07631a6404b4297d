"""Joining a multi-process JAX job before anything touches a device.

Explicit settings come from the `distributed` config group or the environment variables that
`launch/` scripts set (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID). With none
set, a single process runs; cluster auto-detection (SLURM, TPU VMs) is JAX's own.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax


@dataclasses.dataclass
class DistributedConfig:
    coordinator: Optional[str] = None  # host:port of process 0; env JAX_COORDINATOR_ADDRESS
    num_processes: Optional[int] = None  # env JAX_NUM_PROCESSES
    process_id: Optional[int] = None  # env JAX_PROCESS_ID
    auto_detect: bool = False  # let JAX detect SLURM / TPU VM / MPI clusters
    initialization_timeout: int = 300  # seconds to wait for every process to join
    heartbeat_timeout: int = 100  # seconds before a silent peer counts as dead


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def initialize(cfg: DistributedConfig) -> bool:
    """Initialise jax.distributed if configured; returns whether this is a multi-process run."""
    coordinator = cfg.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = cfg.num_processes if cfg.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = cfg.process_id if cfg.process_id is not None else _env_int("JAX_PROCESS_ID")
    if coordinator is None and not cfg.auto_detect:
        return False
    if coordinator is not None and (num is None or pid is None):
        raise ValueError("distributed: a coordinator needs num_processes and process_id "
                         "(or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num, process_id=pid,
        initialization_timeout=cfg.initialization_timeout, heartbeat_timeout_seconds=cfg.heartbeat_timeout)
    return jax.process_count() > 1
