"""Concurrent requests -> continuous batching (`generate.slots.SlotEngine`) on one worker thread.

A request that arrives while others decode joins them at the next decode call (prefilled alone,
then given a free row); one that finishes, or whose client goes away (`Request.cancelled`), frees
its row at once. Requests beyond the free rows wait in a bounded queue: `submit` raises
`QueueFull` when it holds `max_queue`, and the app answers 429 with a Retry-After.

At start the worker warms up (`SlotEngine.warm_up_tasks`: the prefill of every prompt bucket and
the decode shapes of the chosen scope), one compile at a time, serving any request that arrives in
between (so a client that does not wait for /health is not held up by shapes it does not need);
`ready`, which /health reports, is set when the last one is done.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from typing import Optional

from imitation_jax.serving.batcher import Delta, Done, PromptLogprobs, QueueFull, Request

log = logging.getLogger("imitation_jax.serving")


class _Sink:
    """A `Request` as the engine's output sink: deltas carry the logprobs since the previous one."""

    def __init__(self, request: Request):
        self.request = request
        self.pending: list = []

    @property
    def cancelled(self) -> bool:
        return self.request.cancelled

    def text(self, delta: str) -> None:
        if self.request.stream:  # (not streamed: the final Done only, no wake-up of the loop per token)
            self.request.push(Delta(delta, self.pending))
        self.pending = []

    def logprob(self, entry) -> None:
        if self.request.stream:
            self.pending.append(entry)

    def prompt_logprobs(self, entries) -> None:
        if self.request.stream:
            self.request.push(PromptLogprobs(entries))

    def done(self, completion) -> None:
        self.request.push(Done(completion))

    def error(self, exc: BaseException) -> None:
        self.request.push(exc)


class ContinuousScheduler:
    def __init__(self, generator, *, max_batch: int = 16, max_wait_s: float = 0.005, max_queue: int = 256,
                 warmup: str = "none"):
        from imitation_jax.generate.slots import SlotEngine

        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.engine = SlotEngine(generator, slots=max_batch)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._warmup = self.engine.warm_up_tasks(warmup)
        self.ready = not self._warmup
        self.warmup_s = 0.0
        self._queue: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None
        self.batches = 0  # admission rounds (requests prefilled together between two decode calls)
        self.requests = 0
        self.rejected = 0
        self._service_s = 1.0  # running mean of a request's time in a row, for Retry-After

    # ------------------------------------------------------------------ API for the app

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify()
            self._thread.join(timeout=60)
            self._thread = None

    def queued(self) -> int:
        with self._cond:
            return sum(1 for r in self._queue if not r.cancelled)

    def submit(self, prompt: list[int], params, stream: bool = True) -> Request:
        """Queues a request (read its events with `await request.events.get()`; not streamed: the
        final Done only); QueueFull when `max_queue` requests already wait."""
        req = Request(prompt, params, asyncio.get_running_loop(), stream=stream)
        with self._cond:
            waiting = sum(1 for r in self._queue if not r.cancelled)
            if waiting >= self.max_queue:
                self.rejected += 1
                raise QueueFull(self.retry_after(waiting))
            self._queue.append(req)
            self._cond.notify()
        return req

    def retry_after(self, waiting: int) -> int:
        """Seconds until a queue place is likely free: the queue ahead drains max_batch at a time."""
        return max(1, math.ceil(self._service_s * (waiting + 1) / self.max_batch))

    def health(self) -> dict:
        e = self.engine
        return {"scheduler": "continuous", "ready": self.ready, "warmup_s": round(self.warmup_s, 1), "batches": self.batches, "requests": self.requests,
                "running": e.active, "queued": self.queued(), "rejected": self.rejected, **e.stats,
                "compiles": sum(e.gen.traces.values()) + sum(e.traces.values())}

    # ------------------------------------------------------------------ worker

    def _take(self, block: bool) -> list[Request]:
        """Up to `engine.free` queued requests (cancelled ones dropped). Blocking (nothing runs):
        waits for a first one, then `max_wait_s` for others to join it."""
        with self._cond:
            if block:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                deadline = time.monotonic() + self.max_wait_s
                while len(self._queue) < self.engine.free and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            out = []
            while self._queue and len(out) < self.engine.free:
                r = self._queue.popleft()
                if not r.cancelled:
                    out.append(r)
            return out

    def _warm_up_one(self) -> None:
        t0 = time.perf_counter()
        task = self._warmup.pop(0)
        try:
            task()
        except Exception:  # noqa: BLE001 - that shape compiles at its first use instead
            log.exception("warm-up of %s failed", task.what)
        self.warmup_s += time.perf_counter() - t0
        if not self._warmup:
            self.ready = True
            log.warning("serve: warm-up done (%.1f s)", self.warmup_s)

    def _run(self) -> None:
        started: dict[int, float] = {}
        while True:
            busy = self.engine.busy()
            if not busy and self._warmup and not self._stopping:
                with self._cond:
                    waiting = bool(self._queue)
                if not waiting:
                    self._warm_up_one()
                    continue
            batch = self._take(block=not busy) if self.engine.free or not busy else []
            if self._stopping:
                for r in batch:
                    r.push(RuntimeError("the server is shutting down"))
                break
            if batch:
                self.batches += 1
                self.requests += len(batch)
                now = time.monotonic()
                for r in batch:
                    started[id(r)] = now
                try:
                    self.engine.admit([(r.prompt, r.params, _Sink(r)) for r in batch])
                except Exception as exc:  # noqa: BLE001 - every waiting request must hear about it
                    log.exception("admission failed")
                    for r in batch:
                        r.push(exc)
            try:
                self.engine.step()
            except Exception as exc:  # noqa: BLE001
                log.exception("decoding failed")
                self._fail_running(exc)
            self._note_finished(started)
        self._fail_running(RuntimeError("the server is shutting down"))
        with self._cond:
            for r in self._queue:
                r.push(RuntimeError("the server is shutting down"))
            self._queue.clear()

    def _note_finished(self, started: dict[int, float]) -> None:
        running = {id(s.sink.request) for s in self.engine.rows if s is not None}
        now = time.monotonic()
        for key in [k for k in started if k not in running]:
            # (a request still prefilling is not in `started` yet; admitted ones are in a row or done)
            self._service_s = 0.9 * self._service_s + 0.1 * (now - started.pop(key))

    def _fail_running(self, exc: BaseException) -> None:
        self.engine.fail_all(exc)
