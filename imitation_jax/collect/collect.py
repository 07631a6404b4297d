"""Collect a teacher's answers to a prompts file into OpenAI-messages JSONL.

Prompts (JSONL, one per line): `{"id", "prompt": str}` (the Koala test set's form) or
`{"id", "messages": [{"role", "content"}, ...]}`; a trailing assistant message is dropped (so an
existing data set can be re-answered). A record without an id gets a stable one, a hash of its
messages, so re-runs agree on it.

Output, one line per answer, appended and fsynced as soon as the answer arrives:

    {"id": ..., "messages": [..., {"role": "assistant", "content": ANSWER}],
     "provenance": {"teacher": MODEL (as the API reports it), "requested_model": NAME,
                    "params": {max_tokens, temperature, top_p, seed}, "created": ISO time (UTC),
                    "finish_reason": ..., "usage": {prompt_tokens, completion_tokens, ...},
                    "latency_s": ...}}

which `prepare` reads as it is (it uses "id" and "messages"). A re-run reads the ids already in
OUT and asks only for the rest; a line torn by a crash mid-write is cut off first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence

from imitation_jax.collect.client import HttpStats, bounded_map, describe_error, is_fatal, make_client
from imitation_jax.errors import DataError
from imitation_jax.data.readers import jsonl_records


@dataclasses.dataclass(frozen=True)
class Prompt:
    id: str
    messages: tuple[dict, ...]  # OpenAI chat messages, ending with a user turn


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    def as_kwargs(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def stable_id(messages: Sequence[dict]) -> str:
    blob = json.dumps(list(messages), sort_keys=True, ensure_ascii=False).encode()
    return "p-" + hashlib.sha256(blob).hexdigest()[:16]


def _messages(record: dict, where: str) -> list[dict]:
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise DataError(f'{where}: "messages" must be a non-empty list', "bad_field")
        out = []
        for i, m in enumerate(raw):
            if not (isinstance(m, dict) and m.get("role") in ("system", "developer", "user", "assistant")
                    and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: message {i} needs a role (system/user/assistant) and "
                                f"string content", "bad_message")
            out.append({"role": m["role"], "content": m["content"]})
        while out and out[-1]["role"] == "assistant":
            out.pop()
        if not out or out[-1]["role"] != "user":
            raise DataError(f"{where}: the messages must end with a user turn", "bad_message")
        return out
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f'{where}: needs "prompt" (a non-empty string) or "messages"', "missing_field")
    return [{"role": "user", "content": prompt}]


def read_prompts(path: str, system: str | None = None) -> list[Prompt]:
    """The prompts of a JSONL file; `system` is put first where a prompt has no system message."""
    prompts: list[Prompt] = []
    seen: dict[str, str] = {}
    for where, record in jsonl_records(path):
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object", "not_an_object")
        messages = _messages(record, where)
        if system and messages[0]["role"] not in ("system", "developer"):
            messages.insert(0, {"role": "system", "content": system})
        pid = record.get("id")
        pid = str(pid) if pid not in (None, "") else stable_id(messages)
        if pid in seen:
            raise DataError(f"{where}: id {pid!r} already used at {seen[pid]}", "duplicate_id")
        seen[pid] = where
        prompts.append(Prompt(pid, tuple(messages)))
    return prompts


def answered_ids(out: str) -> set[str]:
    """Ids already in OUT. A last line cut short by a crash is truncated away (it was never
    complete, so its prompt is asked again); a bad line anywhere else is an error."""
    if not os.path.exists(out):
        return set()
    ids: set[str] = set()
    with open(out, "rb+") as f:
        data = f.read()
        good_end = 0
        for lineno, line in enumerate(data.splitlines(keepends=True), 1):
            if not line.strip():
                good_end += len(line)
                continue
            complete = line.endswith(b"\n")
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "id" not in record:
                    raise ValueError("no id")
            except ValueError:
                if not complete:  # torn final write
                    print(f"collect: {out}:{lineno}: dropping a partial last line", file=sys.stderr)
                    f.truncate(good_end)
                    break
                raise DataError(f"{out}:{lineno}: not a collected record (invalid JSON or no id); "
                                f"fix or move the file", "invalid_json") from None
            if not complete:  # valid JSON but no newline: finish the line
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            ids.add(str(record["id"]))
            good_end += len(line)
    return ids


class JsonlAppender:
    """Appends one JSON record per line; each line is flushed and fsynced before the next."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "ab")

    def write(self, record: dict) -> None:
        self._f.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


@dataclasses.dataclass
class Summary:
    prompts: int = 0
    skipped: int = 0  # already in OUT
    answered: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    http: str = ""
    attempts: int = 0
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def describe(self) -> str:
        lines = [f"prompts:   {self.prompts} ({self.skipped} already in the output)",
                 f"answered:  {self.answered}", f"failed:    {self.failed}",
                 f"requests:  {self.attempts} HTTP responses ({self.http})",
                 f"tokens:    {self.prompt_tokens} prompt + {self.completion_tokens} completion",
                 f"time:      {self.seconds:.1f} s"]
        for pid, reason in self.failures[:10]:
            lines.append(f"  failed {pid}: {reason}")
        if len(self.failures) > 10:
            lines.append(f"  ... and {len(self.failures) - 10} more")
        if self.failed:
            lines.append("re-run the same command to retry the failed prompts")
        return "\n".join(lines)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


async def _collect(prompts: list[Prompt], out: str, model: str, base_url: str, sampling: Sampling,
                   concurrency: int, timeout: float, max_retries: int, progress: bool,
                   summary: Summary) -> None:
    from tqdm import tqdm

    stats = HttpStats()
    client = make_client(base_url, timeout=timeout, max_retries=max_retries, stats=stats)
    writer = JsonlAppender(out)
    bar = tqdm(total=len(prompts), desc="collect", unit="prompt", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)

    async def ask(p: Prompt):
        start = time.monotonic()
        resp = await client.chat.completions.create(model=model, messages=list(p.messages),
                                                    **sampling.as_kwargs())
        return resp, time.monotonic() - start

    try:
        async with contextlib.aclosing(bounded_map(ask, prompts, concurrency)) as finished:
            async for p, result in finished:
                bar.update(1)
                if isinstance(result, BaseException):
                    if is_fatal(result):
                        raise DataError(f"{base_url}: {describe_error(result)} (stopping: every "
                                        f"request would fail the same way)", "api_error")
                    summary.failed += 1
                    summary.failures.append((p.id, describe_error(result)))
                    continue
                resp, latency = result
                choice = resp.choices[0] if resp.choices else None
                content = choice.message.content if choice is not None else None
                if content is None:
                    summary.failed += 1
                    summary.failures.append((p.id, "the reply has no text content"))
                    continue
                usage = resp.usage.model_dump(exclude_none=True) if resp.usage is not None else None
                if usage:
                    summary.prompt_tokens += usage.get("prompt_tokens", 0)
                    summary.completion_tokens += usage.get("completion_tokens", 0)
                writer.write({
                    "id": p.id,
                    "messages": [*p.messages, {"role": "assistant", "content": content}],
                    "provenance": {"teacher": resp.model or model, "requested_model": model,
                                   "params": sampling.as_kwargs(), "created": _now(),
                                   "finish_reason": choice.finish_reason, "usage": usage,
                                   "latency_s": round(latency, 3)}})
                summary.answered += 1
                bar.set_postfix(failed=summary.failed, refresh=False)
    finally:
        bar.close()
        writer.close()
        summary.http, summary.attempts = stats.describe(), stats.attempts
        await client.close()


def collect(prompts: list[Prompt], out: str, *, model: str, base_url: str, sampling: Sampling = Sampling(),
            concurrency: int = 8, timeout: float = 600.0, max_retries: int = 8,
            progress: bool = True) -> Summary:
    """Asks for every prompt not yet answered in `out`; returns the counts."""
    start = time.monotonic()
    done = answered_ids(out)
    summary = Summary(prompts=len(prompts))
    pending = [p for p in prompts if p.id not in done]
    summary.skipped = len(prompts) - len(pending)
    try:
        asyncio.run(_collect(pending, out, model, base_url, sampling, concurrency, timeout,
                             max_retries, progress, summary))
    finally:
        summary.seconds = time.monotonic() - start
    return summary
