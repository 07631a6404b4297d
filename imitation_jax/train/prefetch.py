"""Reading the next batch while the device computes: a background thread takes host batches from
the loader and places them on the mesh (`make_array_from_process_local_data`) `depth` steps ahead,
in order, so the loop only waits when reading is slower than a step. `mean_wait()` is how long
the loop waited per step since it was last asked (logged as data_wait_s)."""

from __future__ import annotations

import concurrent.futures
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any


class DevicePrefetch:
    def __init__(self, host_batches: Iterator[Any], to_device: Callable[[Any], Any], depth: int = 2):
        self._host, self._to_device, self.depth = host_batches, to_device, depth
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch") if depth > 0 else None
        self._ahead: deque[concurrent.futures.Future] = deque()
        self._waited, self._steps = 0.0, 0

    def _produce(self) -> Any:
        return self._to_device(next(self._host))

    def __iter__(self) -> "DevicePrefetch":
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        if self._pool is None:
            batch = self._produce()
        else:
            while len(self._ahead) < self.depth + 1:
                self._ahead.append(self._pool.submit(self._produce))
            batch = self._ahead.popleft().result()  # re-raises a reader's error here, in order
        self._waited += time.perf_counter() - start
        self._steps += 1
        return batch

    def mean_wait(self) -> float:
        """Seconds the loop waited for a batch, per step, since the last call."""
        mean = self._waited / max(self._steps, 1)
        self._waited, self._steps = 0.0, 0
        return mean

    def close(self) -> None:
        if self._pool is not None:
            for future in self._ahead:
                future.cancel()
            self._pool.shutdown(wait=True)
            self._ahead.clear()
        close = getattr(self._host, "close", None)
        if close is not None:
            close()
