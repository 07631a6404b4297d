"""Collect a teacher's answers to a prompts file into OpenAI-messages JSONL.

Prompts (JSONL, one per line): `{"id", "prompt": str}` (the Koala test set's form) or
`{"id", "messages": [{"role", "content"}, ...]}`; a trailing assistant message is dropped (so an
existing data set can be re-answered). A record without an id gets a stable one, a hash of its
messages, so re-runs agree on it.

Output, one line per answer, appended and fsynced as soon as the answer arrives:

    {"id": ..., "messages": [..., {"role": "assistant", "content": ANSWER}],
     "provenance": {"teacher": MODEL (as the API reports it), "requested_model": NAME,
                    "params": {max_tokens, temperature, top_p, seed, top_logprobs},
                    "created": ISO time (UTC), "finish_reason": ..., "latency_s": ...,
                    "usage": {prompt_tokens, completion_tokens, ...}}}

which `prepare` reads as it is (it uses "id" and "messages"). A re-run reads the ids already in
OUT and asks only for the rest; a line torn by a crash mid-write is cut off first. One process
writes OUT at a time (`output_lock`: a second one on the same OUT stops with an error naming the
holder), so two runs never answer the same prompts twice.

With `top_logprobs` K (1-20) each request also asks for `logprobs=true, top_logprobs=K`, and the
assistant message carries the teacher's tokens with their top-K alternatives under
"teacher_logprobs" (format: `imitation_jax.data.teacher_logprobs`). An answer whose logprobs are
missing or invalid (tokens that do not concatenate to the text, NaN, positive, fewer than K
alternatives) is a failure like a failed request: counted, listed, not written, asked again by a
re-run.
"""

from __future__ import annotations

import asyncio
import collections
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
from imitation_jax.collect.output_lock import hold_output
from imitation_jax.data import teacher_logprobs as tlp
from imitation_jax.data.readers import jsonl_records
from imitation_jax.errors import ConfigError, DataError


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


def _stored_k(record: dict) -> int:
    """The K of the teacher logprobs on a record's last message (0: none)."""
    messages = record.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    value = last.get(tlp.FIELD) if isinstance(last, dict) else None
    if value is None:
        return 0
    return value.get("k", -1) if isinstance(value, dict) else -1


def answered_ids(out: str, top_logprobs: int | None = None) -> set[str]:
    """Ids already in OUT. A last line cut short by a crash is truncated away (it was never
    complete, so its prompt is asked again); a bad line anywhere else is an error. With
    `top_logprobs` (0 for none), a record collected with another K is an error too: one file holds
    one kind of record."""
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
            if top_logprobs is not None and _stored_k(record) != top_logprobs:
                has = _stored_k(record)
                has = f"teacher logprobs with k = {has}" if has else "no teacher logprobs"
                asked = f"--top-logprobs {top_logprobs}" if top_logprobs else "no --top-logprobs"
                raise DataError(f"{out}:{lineno}: this record has {has}, but this run has {asked}; "
                                f"collect into another --out (one file holds one kind)", "mixed_logprobs")
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
    failed_by: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    seconds: float = 0.0
    top_logprobs: int = 0
    logprob_tokens: int = 0  # answer tokens stored with their top-K alternatives

    def fail(self, pid: str, kind: str, reason: str) -> None:
        """`kind`: "request" (HTTP or connection error), "no text", "bad logprobs"."""
        self.failed += 1
        self.failed_by[kind] += 1
        self.failures.append((pid, reason))

    def describe(self) -> str:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.failed_by.items()))
        lines = [f"prompts:   {self.prompts} ({self.skipped} already in the output)",
                 f"answered:  {self.answered}", f"failed:    {self.failed}" + (f" ({kinds})" if kinds else ""),
                 f"requests:  {self.attempts} HTTP responses ({self.http})",
                 f"tokens:    {self.prompt_tokens} prompt + {self.completion_tokens} completion",
                 f"time:      {self.seconds:.1f} s"]
        if self.top_logprobs:
            lines.insert(4, f"logprobs:  top {self.top_logprobs} alternatives stored for "
                            f"{self.logprob_tokens} answer tokens")
        for pid, reason in self.failures[:10]:
            lines.append(f"  failed {pid}: {reason}")
        if len(self.failures) > 10:
            lines.append(f"  ... and {len(self.failures) - 10} more")
        if self.failed:
            lines.append("re-run the same command to retry the failed prompts")
        return "\n".join(lines)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _logprob(value) -> float:
    value = float(value)
    return tlp.NEG_INF if value == -float("inf") else value


def _raw_bytes(item) -> bytes:
    """A token's bytes as the API gives them; servers that leave them out get the text's UTF-8."""
    if not isinstance(item.token, str):
        raise TypeError(f"a token is {type(item.token).__name__}, not a string")
    raw = getattr(item, "bytes", None)
    return bytes(raw) if raw is not None else item.token.encode("utf-8")


def teacher_logprobs(choice, k: int) -> tlp.TeacherLogprobs:
    """The validated top-k logprobs of an OpenAI chat completion choice; DataError (kind
    "bad_logprobs", no location) when they are missing or invalid for the choice's text."""
    content = choice.logprobs.content if choice.logprobs is not None else None
    if content is None:
        raise DataError("the reply has no logprobs", "no_logprobs")
    try:
        return _teacher_logprobs(content, choice.message.content, k)
    except DataError:
        raise
    except (TypeError, ValueError, AttributeError) as e:  # a field of the wrong type
        raise DataError(f"malformed logprobs ({type(e).__name__}: {e})", "bad_logprobs") from None


def _teacher_logprobs(content: list, text: str, k: int) -> tlp.TeacherLogprobs:
    tokens = []
    for i, item in enumerate(content):
        raw = _raw_bytes(item)
        tlp.check_logprob(_logprob(item.logprob), f"token {i}")
        alternatives = [tlp.Alternative(a.token, _raw_bytes(a), _logprob(a.logprob))
                        for a in item.top_logprobs or ()]
        if len(alternatives) < k:
            raise DataError(f"token {i} has {len(alternatives)} alternatives, fewer than the {k} asked for",
                            "bad_logprobs")
        for j, a in enumerate(alternatives):  # before sorting: a NaN has no place in an order
            tlp.check_logprob(a.logprob, f"token {i} alternative {j}")
        # The API lists them most probable first; a stable sort keeps that contract for any server.
        top = sorted(alternatives, key=lambda a: -a.logprob)[:k]
        tokens.append(tlp.Token(item.token, raw, _logprob(item.logprob), tuple(top)))
    result = tlp.TeacherLogprobs(k, tuple(tokens))
    tlp.validate(result, text)
    return result


def _refuses_logprobs(exc: BaseException) -> bool:
    """A 400 about logprobs: the model or server does not give them, for any request."""
    import openai

    return isinstance(exc, openai.BadRequestError) and "logprob" in describe_error(exc).lower()


async def _collect(prompts: list[Prompt], out: str, model: str, base_url: str, sampling: Sampling,
                   concurrency: int, timeout: float, max_retries: int, progress: bool,
                   summary: Summary, top_logprobs: int = 0) -> None:
    from tqdm import tqdm

    stats = HttpStats()
    client = make_client(base_url, timeout=timeout, max_retries=max_retries, stats=stats)
    writer = JsonlAppender(out)
    bar = tqdm(total=len(prompts), desc="collect", unit="prompt", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    extra = {"logprobs": True, "top_logprobs": top_logprobs} if top_logprobs else {}
    params = {**sampling.as_kwargs(), **({"top_logprobs": top_logprobs} if top_logprobs else {})}
    logprobs_seen = False  # has any reply carried logprobs? (if the first does not, none will)

    async def ask(p: Prompt):
        start = time.monotonic()
        resp = await client.chat.completions.create(model=model, messages=list(p.messages),
                                                    **sampling.as_kwargs(), **extra)
        return resp, time.monotonic() - start

    try:
        async with contextlib.aclosing(bounded_map(ask, prompts, concurrency)) as finished:
            async for p, result in finished:
                bar.update(1)
                if isinstance(result, BaseException):
                    if is_fatal(result) or (top_logprobs and _refuses_logprobs(result)):
                        raise DataError(f"{base_url}: {describe_error(result)} (stopping: every "
                                        f"request would fail the same way)", "api_error")
                    summary.fail(p.id, "request", describe_error(result))
                    continue
                resp, latency = result
                choice = resp.choices[0] if resp.choices else None
                content = choice.message.content if choice is not None else None
                usage = resp.usage.model_dump(exclude_none=True) if resp.usage is not None else None
                if usage:  # tokens were spent (and paid for) even when the answer is not kept
                    summary.prompt_tokens += usage.get("prompt_tokens", 0)
                    summary.completion_tokens += usage.get("completion_tokens", 0)
                if content is None:
                    summary.fail(p.id, "no text", "the reply has no text content")
                    continue
                message = {"role": "assistant", "content": content}
                if top_logprobs:
                    try:
                        logprobs = teacher_logprobs(choice, top_logprobs)
                    except DataError as e:
                        if e.kind == "no_logprobs" and not logprobs_seen:
                            raise DataError(f"{base_url}: the reply to {p.id} has no logprobs although "
                                            f"logprobs=true, top_logprobs={top_logprobs} were asked for "
                                            f"(stopping: this server or model does not return them)",
                                            "api_error") from None
                        summary.fail(p.id, "bad logprobs", f"bad logprobs: {e}")
                        continue
                    logprobs_seen = True
                    message[tlp.FIELD] = tlp.encode(logprobs)
                    summary.logprob_tokens += len(logprobs.tokens)
                writer.write({
                    "id": p.id,
                    "messages": [*p.messages, message],
                    "provenance": {"teacher": resp.model or model, "requested_model": model,
                                   "params": params, "created": _now(),
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
            progress: bool = True, top_logprobs: int = 0) -> Summary:
    """Asks for every prompt not yet answered in `out`; returns the counts. `top_logprobs` K > 0
    also stores the teacher's top-K logprobs per answer token (see the module docstring)."""
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or not 0 <= top_logprobs <= tlp.MAX_K:
        raise ConfigError(f"--top-logprobs must be an integer from 0 (off) to {tlp.MAX_K}, got {top_logprobs!r}")
    start = time.monotonic()
    with hold_output(out, "collect"):  # one writer: a second run would append the same answers
        done = answered_ids(out, top_logprobs)
        summary = Summary(prompts=len(prompts), top_logprobs=top_logprobs)
        pending = [p for p in prompts if p.id not in done]
        summary.skipped = len(prompts) - len(pending)
        try:
            asyncio.run(_collect(pending, out, model, base_url, sampling, concurrency, timeout,
                                 max_retries, progress, summary, top_logprobs))
        finally:
            summary.seconds = time.monotonic() - start
    return summary
