"""Conversation records and the readers that turn files into them.

Every on-disk format (today: OpenAI-messages JSONL) is read into the same in-memory
`Conversation`, so templates, masking and packing never see a file format. Bad input raises
`DataError` with a one-line message `FILE:LINE: reason`, so a user can fix the record directly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad training data or a bad tokenizer path; the message is one line naming where and why."""


@dataclasses.dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclasses.dataclass(frozen=True)
class Conversation:
    id: str  # the record's "id" field if it has one, else "FILE:LINE"
    messages: tuple[Message, ...]


def parse_messages(record: Any, where: str) -> Conversation:
    """Validates one OpenAI-messages record (`{"messages": [{"role", "content"}, ...]}`).

    `where` prefixes every error ("chats.jsonl:17") and is the id of records without one.
    """
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" not in record:
        raise DataError(f'{where}: missing "messages"')
    raw = record["messages"]
    if not isinstance(raw, list) or not raw:
        raise DataError(f'{where}: "messages" must be a non-empty list')
    messages = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise DataError(f"{where}: message {i} is not an object")
        role = item.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        content = item.get("content")
        if not isinstance(content, str):
            raise DataError(
                f"{where}: message {i} ({role}): content must be a string, "
                f"got {type(content).__name__}"
            )
        if role == "system" and i != 0:
            raise DataError(f"{where}: message {i}: a system message may only come first")
        messages.append(Message(role, content))
    if not any(m.role == "assistant" for m in messages):
        raise DataError(f"{where}: conversation has no assistant turn (nothing to train on)")
    record_id = record.get("id")
    return Conversation(id=str(record_id) if record_id is not None else where,
                        messages=tuple(messages))


def read_messages_jsonl(path: str | os.PathLike[str]) -> Iterator[Conversation]:
    """Yields one Conversation per non-blank line of an OpenAI-messages JSONL file."""
    name = os.fspath(path)
    try:
        f = open(name, "rb")  # bytes, so a bad UTF-8 line is reported with its own line number
    except OSError as e:
        raise DataError(f"{name}: cannot open: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{name}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 (byte {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
            yield parse_messages(record, where)
