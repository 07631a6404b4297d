"""Stopping cleanly when the scheduler says so.

SIGTERM (preemption, `scancel`, Kubernetes eviction) and SIGINT (Ctrl-C) set a flag; the loop
finishes the step in flight, writes a checkpoint and exits with EXIT_PREEMPTED so a wrapper can
requeue the job. With several processes the flags (and time-based save decisions, whose clocks
differ) are combined across processes every step, so all of them stop or save at the same step.
"""

from __future__ import annotations

import signal
import sys

import jax
import numpy as np

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" — resume by running the same command


class StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {}

    def install(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nreceived {signal.Signals(signum).name}: finishing this step, then checkpointing",
              file=sys.stderr, flush=True)


def agree(*flags: bool) -> tuple[bool, ...]:
    """Logical OR of each flag over all processes (a no-op with one process)."""
    if jax.process_count() == 1:
        return tuple(bool(f) for f in flags)
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32))
    return tuple(bool(x) for x in np.asarray(gathered).reshape(-1, len(flags)).max(axis=0))
