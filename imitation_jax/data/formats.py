"""Conversation records and the parsers that turn one JSON record of each format into them.

Every on-disk format is parsed into the same in-memory `Conversation`, so cleaning, templates,
masking and packing never see a file format:

  * `sharegpt`: `{"id", "conversations": [{"from": "human"|"user"|"gpt"|"chatgpt"|"bard"|
    "assistant"|"system", "value": str}, ...]}` (`role`/`content` keys are accepted too);
  * `openai`: `{"messages": [{"role": "system"|"developer"|"user"|"assistant", "content": str or
    [{"type": "text", "text": str}, ...]}, ...]}`;
  * `alpaca`: `{"instruction", "input" (optional), "output", "system" (optional)}`: one exchange,
    the user turn is the instruction followed by the input after a blank line;
  * `text`: `{"text": str}` (or a whole .txt file): a plain document, every token trained.

Bad input raises `DataError` with a one-line message `WHERE: reason` (WHERE is `FILE:LINE`, plus
the record index inside a JSON array) and a short `kind` used to count skipped records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from imitation_jax.errors import DataError

ROLES = ("system", "user", "assistant")
FORMATS = ("sharegpt", "openai", "alpaca", "text")

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant",
                  "bard": "assistant", "assistant": "assistant", "system": "system"}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user",
                "assistant": "assistant"}


@dataclasses.dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclasses.dataclass(frozen=True)
class Conversation:
    id: str  # the record's "id" field if it has one, else its location ("FILE:LINE")
    messages: tuple[Message, ...]
    kind: str = "chat"  # "chat", or "text": one document (a single message of role "text")

    @property
    def text(self) -> str:
        return self.messages[0].content


def _id(record: Mapping, where: str) -> str:
    value = record.get("id")
    return str(value) if value is not None and value != "" else where


def _check_system_first(messages: list[Message], where: str) -> None:
    for i, m in enumerate(messages):
        if m.role == "system" and i != 0:
            raise DataError(f"{where}: message {i}: a system message may only come first",
                            "system_not_first")


def _expect_object(record: Any, where: str) -> Mapping:
    if not isinstance(record, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}",
                        "not_an_object")
    return record


def _list_field(record: Mapping, key: str, where: str) -> list:
    """record[key], which must be present and a list (the turns of a conversation)."""
    if key not in record:
        raise DataError(f'{where}: missing "{key}"', "missing_field")
    raw = record[key]
    if not isinstance(raw, list):
        raise DataError(f'{where}: "{key}" must be a list, got {type(raw).__name__}', "bad_field")
    return raw


def parse_messages(record: Any, where: str) -> Conversation:
    """One OpenAI-messages record: `{"messages": [{"role", "content"}, ...]}`.

    An empty list is not an error here (cleaning drops it as an empty conversation).
    """
    record = _expect_object(record, where)
    raw = _list_field(record, "messages", where)
    messages = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise DataError(f"{where}: message {i} is not an object", "bad_message")
        role = item.get("role")
        if role not in OPENAI_ROLES:
            raise DataError(f"{where}: message {i}: role {role!r} is not one of "
                            f"{', '.join(OPENAI_ROLES)}", "bad_role")
        messages.append(Message(OPENAI_ROLES[role], _openai_content(item.get("content"),
                                                                    f"{where}: message {i} ({role})")))
    _check_system_first(messages, where)
    return Conversation(_id(record, where), tuple(messages))


def _openai_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": "..."}, ...]
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, Mapping) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise DataError(f"{where}: content part {j} is not text (type {kind!r})",
                                "bad_content")
            parts.append(part["text"])
        return "".join(parts)
    raise DataError(f"{where}: content must be a string, got {type(content).__name__}",
                    "bad_content")


def parse_sharegpt(record: Any, where: str) -> Conversation:
    """One ShareGPT record: `{"id", "conversations": [{"from", "value"}, ...]}`."""
    record = _expect_object(record, where)
    raw = _list_field(record, "conversations", where)
    messages = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise DataError(f"{where}: turn {i} is not an object", "bad_message")
        role = item.get("from", item.get("role"))
        if role not in SHAREGPT_ROLES:
            raise DataError(f"{where}: turn {i}: role {role!r} is not one of "
                            f"{', '.join(SHAREGPT_ROLES)}", "bad_role")
        value = item.get("value", item.get("content"))
        if not isinstance(value, str):
            raise DataError(f"{where}: turn {i} ({role}): value must be a string, got "
                            f"{type(value).__name__}", "bad_content")
        messages.append(Message(SHAREGPT_ROLES[role], value))
    _check_system_first(messages, where)
    return Conversation(_id(record, where), tuple(messages))


def parse_alpaca(record: Any, where: str) -> Conversation:
    """One Alpaca record: `{"instruction", "input", "output"}` -> one user/assistant exchange."""
    record = _expect_object(record, where)
    fields = {}
    for name, required in (("instruction", True), ("input", False), ("output", True),
                           ("system", False)):
        value = record.get(name)
        if value is None and not required:
            value = ""
        if value is None:
            raise DataError(f'{where}: missing "{name}"', "missing_field")
        if not isinstance(value, str):
            raise DataError(f'{where}: "{name}" must be a string, got {type(value).__name__}',
                            "bad_content")
        fields[name] = value
    user = fields["instruction"]
    if fields["input"].strip():
        user = f"{user.rstrip()}\n\n{fields['input'].strip()}"
    messages = [Message("user", user), Message("assistant", fields["output"])]
    if fields["system"].strip():
        messages.insert(0, Message("system", fields["system"]))
    return Conversation(_id(record, where), tuple(messages))


def parse_text(record: Any, where: str) -> Conversation:
    """One plain-text record `{"text": str}`: a document whose every token is trained."""
    record = _expect_object(record, where)
    if "text" not in record:
        raise DataError(f'{where}: missing "text"', "missing_field")
    if not isinstance(record["text"], str):
        raise DataError(f'{where}: "text" must be a string, got {type(record["text"]).__name__}',
                        "bad_content")
    return text_document(record["text"], _id(record, where))


def text_document(text: str, id: str) -> Conversation:
    return Conversation(id, (Message("text", text),), kind="text")


PARSERS = {"sharegpt": parse_sharegpt, "openai": parse_messages, "alpaca": parse_alpaca,
           "text": parse_text}


def detect_format(record: Any, where: str) -> str:
    """The format of a record, from its keys."""
    if isinstance(record, Mapping):
        if "conversations" in record:
            return "sharegpt"
        if "messages" in record:
            return "openai"
        if "instruction" in record and "output" in record:
            return "alpaca"
        if "text" in record:
            return "text"
        keys = ", ".join(sorted(map(str, record))[:8]) or "none"
        raise DataError(f"{where}: cannot tell the format of this record (keys: {keys}); "
                        f"expected one of {', '.join(FORMATS)} (give the format: "
                        f"FILE:format=NAME or --format)", "unknown_format")
    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}",
                    "not_an_object")


def parse_record(record: Any, fmt: str, where: str) -> Conversation:
    return PARSERS[fmt](record, where)
