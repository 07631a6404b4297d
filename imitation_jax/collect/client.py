"""The `openai` client, configured once for collect, bootstrap and judge.

Retries are the client's own: `max_retries` re-sends a request after a connection error, a
timeout, 408, 409, 429 or any 5xx, with exponential backoff (0.5 s doubling to 8 s, times a
random factor in [0.75, 1]) and honouring a `Retry-After` header. That is exactly the policy a
teacher API needs, so nothing is layered on top; `HttpStats` only counts what happened (every
response status, seen through an httpx event hook) for the final summary.

The API key comes from `OPENAI_API_KEY`; local servers started without `--api-key` accept any
key, so a placeholder is used when it is unset. The key is never printed or written.
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
PLACEHOLDER_KEY = "not-needed"  # local endpoints without auth accept anything


class HttpStats:
    """Counts of HTTP responses by status code (retried attempts included)."""

    def __init__(self) -> None:
        self.status: collections.Counter[int] = collections.Counter()

    async def hook(self, response) -> None:
        self.status[response.status_code] += 1

    @property
    def attempts(self) -> int:
        return sum(self.status.values())

    def describe(self) -> str:
        return ", ".join(f"{code}: {n}" for code, n in sorted(self.status.items())) or "none"


def make_client(base_url: str, *, timeout: float = 600.0, max_retries: int = 8,
                stats: HttpStats | None = None):
    """An `openai.AsyncOpenAI` for `base_url` with the retry policy above."""
    import openai

    # The client's default pool (100 connections) is larger than any sensible concurrency.
    hooks = {"response": [stats.hook]} if stats is not None else {}
    http_client = openai.DefaultAsyncHttpxClient(timeout=timeout, event_hooks=hooks)
    return openai.AsyncOpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY") or PLACEHOLDER_KEY,
                              timeout=timeout, max_retries=max_retries, http_client=http_client)


async def bounded_map(fn: Callable[[T], Awaitable[R]], items: Iterable[T], concurrency: int
                      ) -> AsyncIterator[tuple[T, R | BaseException]]:
    """Runs `fn` over `items` with at most `concurrency` calls in flight and yields (item, result
    or exception) as each finishes. A fixed pool of workers pulls from the iterator, so a million
    prompts never become a million pending tasks."""
    it = iter(items)
    done: asyncio.Queue = asyncio.Queue()
    stop = object()

    async def worker() -> None:
        try:
            for item in it:  # shared iterator: each item goes to exactly one worker
                try:
                    result: R | BaseException = await fn(item)
                except Exception as exc:  # noqa: BLE001 - reported to the caller, per item
                    result = exc
                await done.put((item, result))
        finally:
            await done.put(stop)

    workers = [asyncio.create_task(worker()) for _ in range(max(concurrency, 1))]
    running = len(workers)
    try:
        while running:
            got = await done.get()
            if got is stop:
                running -= 1
                continue
            yield got
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


def is_fatal(exc: BaseException) -> bool:
    """Errors that every further request would hit too (bad key, unknown model, wrong URL path)."""
    import openai

    return isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError,
                            openai.NotFoundError))


def describe_error(exc: BaseException) -> str:
    import openai

    if isinstance(exc, openai.APIStatusError):
        message = exc.message
        body = exc.body if isinstance(exc.body, dict) else None
        if body and isinstance(body.get("message"), str):
            message = body["message"]
        return f"HTTP {exc.status_code}: {' '.join(str(message).split())[:300]}"
    if isinstance(exc, openai.APITimeoutError):
        return "timed out"
    if isinstance(exc, openai.APIConnectionError):
        return f"connection failed: {exc.__cause__ or exc}"
    return f"{type(exc).__name__}: {exc}"
