"""Concurrent requests -> batched `Generator.generate` calls on one worker thread.

Requests wait in a thread-safe queue. The worker takes the first, then whatever else arrives
within `max_wait_s` (a few ms), up to `max_batch`, and decodes them together in one `generate`
call. While a batch decodes, new requests queue up, so under load the next batch is full as soon
as the previous one ends: batches grow with the load without any fixed delay. (Requests do not
join a batch already decoding; that would need continuous batching inside the generator.)

Each request has an asyncio queue on the server's event loop; the worker pushes text deltas
(the generator's `on_text`, already held back at possible stop strings, each with the
log-probabilities of the tokens produced since the previous delta when the request asked for
them), the prompt's log-probabilities (echo) and then the final `Completion` (or an exception)
into it with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import math
import threading
import time
from typing import Any, Optional

log = logging.getLogger("imitation_jax.serving")


@dataclasses.dataclass
class Request:
    prompt: list[int]
    params: Any  # SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    cancelled: bool = False  # the client went away: drop it if not started, ignore its output
    stream: bool = True  # False: only the final Done (and errors) are pushed, no deltas

    def push(self, item: Any) -> None:
        if not self.cancelled:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class QueueFull(Exception):
    """The request queue is full; `retry_after`: seconds after which a place is likely free."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server's request queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclasses.dataclass
class Delta:
    text: str
    logprobs: list  # generate.TokenLogprob of the tokens since the previous delta (empty if not asked)


@dataclasses.dataclass
class PromptLogprobs:
    entries: list  # Completion.prompt_logprobs, pushed as soon as the prefill has them


@dataclasses.dataclass
class Done:
    completion: Any  # generate.Completion


class Batcher:
    def __init__(self, generator, *, max_batch: int = 8, max_wait_s: float = 0.005, max_queue: int = 256):
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.generator = generator
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.ready = True  # no warm-up: each batch shape compiles at its first use
        self._queue: queue.Queue[Optional[Request]] = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self.batches = 0  # counters for /health and the load figures
        self.requests = 0
        self.rejected = 0
        self._batch_s = 1.0  # running mean of a batch's time, for Retry-After

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=60)
            self._thread = None

    def submit(self, prompt: list[int], params, stream: bool = True) -> Request:
        """Queues a request; read its events with `await request.events.get()` (not streamed: the
        final Done only). QueueFull when `max_queue` requests already wait."""
        waiting = self._queue.qsize()
        if waiting >= self.max_queue:
            self.rejected += 1
            raise QueueFull(max(1, math.ceil(self._batch_s * (waiting // self.max_batch + 1))))
        req = Request(prompt, params, asyncio.get_running_loop(), stream=stream)
        self._queue.put(req)
        return req

    def health(self) -> dict:
        return {"scheduler": "batch", "ready": self.ready, "batches": self.batches, "requests": self.requests,
                "queued": self._queue.qsize(), "rejected": self.rejected,
                "compiles": sum(getattr(self.generator, "traces", {}).values())}

    def _gather(self, first: Request) -> tuple[list[Request], bool]:
        batch, deadline = [first], time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch, stopping = self._gather(first)
            batch = [r for r in batch if not r.cancelled]
            if not batch:
                continue
            self.batches += 1
            self.requests += len(batch)

            pending: list[list] = [[] for _ in batch]

            def on_text(i: int, delta: str) -> None:
                if batch[i].stream:
                    batch[i].push(Delta(delta, pending[i]))
                pending[i] = []

            def on_logprob(i: int, entry) -> None:
                if batch[i].stream:
                    pending[i].append(entry)

            def on_prompt_logprobs(i: int, entries) -> None:
                if batch[i].stream:
                    batch[i].push(PromptLogprobs(entries))

            t0 = time.monotonic()
            try:
                done = self.generator.generate([r.prompt for r in batch], [r.params for r in batch],
                                               on_text=on_text, on_logprob=on_logprob,
                                               on_prompt_logprobs=on_prompt_logprobs)
            except Exception as exc:  # noqa: BLE001 - every waiting request must hear about it
                log.exception("generation failed")
                for r in batch:
                    r.push(exc)
                continue
            self._batch_s = 0.9 * self._batch_s + 0.1 * (time.monotonic() - t0)
            for r, c in zip(batch, done):
                r.push(Done(c))
