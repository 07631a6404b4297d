"""The teacher's per-token log-probabilities stored with a collected answer (`collect --top-logprobs K`).

Written by `collect`, read by `prepare`; this module is the one home of the format (it lives in the
data layer so that both can import it). On an assistant message of a collected record:

    {"role": "assistant", "content": ANSWER,
     "teacher_logprobs": {"version": 1, "k": K,
                          "tokens": [[TEXT, LOGPROB, [[ALT_TEXT, ALT_LOGPROB], ...]], ...]}}

Version 1, one entry per answer token in order:

  * a token is `[text, logprob, top]` or `[text, logprob, top, bytes]`; an alternative is
    `[text, logprob]` or `[text, logprob, bytes]`;
  * `bytes` (a list of ints 0-255, as the OpenAI API gives them) is stored only where it is not
    the UTF-8 of `text` (a token that splits a character); absent, it is `text`'s UTF-8;
  * `top` holds exactly `k` alternatives in descending logprob order (ties keep the API's order);
    the sampled token may or may not be among them;
  * every logprob is a finite number <= POSITIVE_TOLERANCE (values in (0, POSITIVE_TOLERANCE] are
    rounding in the server's log-softmax and mean 0); an API's -inf is stored as -9999.0, the
    value OpenAI and vLLM already use for a probability that underflows;
  * the tokens' bytes concatenate to exactly the UTF-8 of the message's content.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from imitation_jax.errors import DataError

FIELD = "teacher_logprobs"
VERSION = 1
MAX_K = 20  # the OpenAI API's limit on top_logprobs
POSITIVE_TOLERANCE = 1e-4  # fp32 log-softmax rounding can land a hair above 0
NEG_INF = -9999.0  # what -inf is stored as (standard JSON has no infinity)


@dataclasses.dataclass(frozen=True)
class Alternative:
    text: str
    bytes: bytes
    logprob: float


@dataclasses.dataclass(frozen=True)
class Token:
    text: str
    bytes: bytes
    logprob: float
    top: tuple[Alternative, ...]  # exactly k, most probable first


@dataclasses.dataclass(frozen=True)
class TeacherLogprobs:
    k: int
    tokens: tuple[Token, ...]

    def offsets(self) -> list[int]:
        """Byte offset of each token's start in the answer's UTF-8, plus the total length at the end."""
        out = [0]
        for t in self.tokens:
            out.append(out[-1] + len(t.bytes))
        return out


def check_logprob(value: float, what: str) -> None:
    if math.isnan(value):
        raise DataError(f"{what}: logprob is NaN", "bad_logprobs")
    if math.isinf(value):
        raise DataError(f"{what}: logprob is {value}", "bad_logprobs")
    if value > POSITIVE_TOLERANCE:
        raise DataError(f"{what}: logprob {value!r} is positive (a probability above 1)",
                        "bad_logprobs")


def validate(logprobs: TeacherLogprobs, content: str) -> None:
    """Raises DataError (kind "bad_logprobs", no location) unless `logprobs` is a valid record of
    the answer `content`: see the module docstring."""
    if isinstance(logprobs.k, bool) or not isinstance(logprobs.k, int) or not 1 <= logprobs.k <= MAX_K:
        raise DataError(f"k must be an integer from 1 to {MAX_K}, got {logprobs.k!r}", "bad_logprobs")
    for i, token in enumerate(logprobs.tokens):
        check_logprob(token.logprob, f"token {i}")
        if len(token.top) != logprobs.k:
            raise DataError(f"token {i}: {len(token.top)} alternatives, expected k = {logprobs.k}",
                            "bad_logprobs")
        previous = math.inf
        for j, alt in enumerate(token.top):
            check_logprob(alt.logprob, f"token {i} alternative {j}")
            if alt.logprob > previous:
                raise DataError(f"token {i}: alternatives not in descending logprob order", "bad_logprobs")
            previous = alt.logprob
    joined = b"".join(t.bytes for t in logprobs.tokens)
    expected = content.encode("utf-8")
    if joined != expected:
        at = next((n for n, (a, b) in enumerate(zip(joined, expected)) if a != b),
                  min(len(joined), len(expected)))
        token = next(i for i, end in enumerate(logprobs.offsets()[1:] + [math.inf]) if end > at)
        raise DataError(f"the tokens' bytes ({len(joined)}) do not concatenate to the answer's UTF-8 "
                        f"({len(expected)} bytes): they differ from byte {at} (token {token})",
                        "bad_logprobs")


def encode(logprobs: TeacherLogprobs) -> dict:
    """The JSON value stored under FIELD."""

    def entry(text: str, raw: bytes, logprob: float) -> list:
        return [text, logprob] if raw == text.encode("utf-8") else [text, logprob, list(raw)]

    tokens = []
    for t in logprobs.tokens:
        item = [t.text, t.logprob, [entry(a.text, a.bytes, a.logprob) for a in t.top]]
        if t.bytes != t.text.encode("utf-8"):
            item.append(list(t.bytes))
        tokens.append(item)
    return {"version": VERSION, "k": logprobs.k, "tokens": tokens}


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{what}: logprob must be a number, got {type(value).__name__}", "bad_logprobs")
    return float(value)


def _bytes(value: Any, what: str) -> bytes:
    if not (isinstance(value, list) and all(isinstance(b, int) and not isinstance(b, bool)
                                            and 0 <= b <= 255 for b in value)):
        raise DataError(f"{what}: bytes must be a list of integers 0-255", "bad_logprobs")
    return bytes(value)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{what}: text must be a string, got {type(value).__name__}", "bad_logprobs")
    return value


def decode(value: Any) -> TeacherLogprobs:
    """The stored JSON value -> TeacherLogprobs (structure only; `validate` checks the numbers)."""
    if not isinstance(value, Mapping):
        raise DataError(f"must be an object, got {type(value).__name__}", "bad_logprobs")
    version = value.get("version")
    if version != VERSION:
        raise DataError(f"format version {version!r} is not one this imitation-jax reads ({VERSION})",
                        "bad_logprobs")
    extra = set(value) - {"version", "k", "tokens"}
    if extra:
        raise DataError(f"unknown key {sorted(map(str, extra))[0]!r}", "bad_logprobs")
    k, raw = value.get("k"), value.get("tokens")
    if isinstance(k, bool) or not isinstance(k, int):
        raise DataError(f"k must be an integer, got {k!r}", "bad_logprobs")
    if not isinstance(raw, list):
        raise DataError('"tokens" must be a list', "bad_logprobs")
    tokens = []
    for i, item in enumerate(raw):
        what = f"token {i}"
        if not (isinstance(item, list) and len(item) in (3, 4) and isinstance(item[2], list)):
            raise DataError(f"{what}: expected [text, logprob, top] or [text, logprob, top, bytes]",
                            "bad_logprobs")
        text = _text(item[0], what)
        top = []
        for j, alt in enumerate(item[2]):
            at = f"{what} alternative {j}"
            if not (isinstance(alt, list) and len(alt) in (2, 3)):
                raise DataError(f"{at}: expected [text, logprob] or [text, logprob, bytes]", "bad_logprobs")
            alt_text = _text(alt[0], at)
            top.append(Alternative(alt_text, _bytes(alt[2], at) if len(alt) == 3 else alt_text.encode("utf-8"),
                                   _number(alt[1], at)))
        tokens.append(Token(text, _bytes(item[3], what) if len(item) == 4 else text.encode("utf-8"),
                            _number(item[1], what), tuple(top)))
    return TeacherLogprobs(k, tuple(tokens))


def _content(message: Mapping) -> str | None:
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...], as the openai format allows
        parts = [p.get("text") for p in content if isinstance(p, Mapping)]
        return "".join(parts) if len(parts) == len(content) and all(isinstance(p, str) for p in parts) else None
    return content if isinstance(content, str) else None


def parse(record: Any, where: str) -> dict[int, TeacherLogprobs]:
    """The validated teacher logprobs of a collected record, by message index (the messages that
    carry them: collect writes them on the final assistant message). `where` is "FILE:LINE";
    a malformed record raises DataError "FILE:LINE: message I: teacher_logprobs: reason"."""
    out: dict[int, TeacherLogprobs] = {}
    messages = record.get("messages") if isinstance(record, Mapping) else None
    if not isinstance(messages, list):
        return out
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or FIELD not in message:
            continue
        at = f"{where}: message {i}: {FIELD}"
        try:
            if message.get("role") != "assistant":
                raise DataError(f"on a {message.get('role')!r} message (only assistant messages carry them)",
                                "bad_logprobs")
            content = _content(message)
            if content is None:
                raise DataError("the message has no text content", "bad_logprobs")
            logprobs = decode(message[FIELD])
            validate(logprobs, content)
        except DataError as e:
            raise DataError(f"{at}: {e}", e.kind) from None
        out[i] = logprobs
    return out
