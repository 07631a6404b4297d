"""Input files -> JSON records -> `Conversation`s, with a location for every record.

Inputs are given as `PATH` or `PATH:key=value,...` (`format=sharegpt|openai|alpaca|text`,
`weight=W` or `count=N`, see `Source`). The file kind comes from the name (`.gz` is opened
transparently) and, where that is ambiguous, from the first character:

  * `.jsonl` / `.ndjson`, or any file starting with `{`: one JSON record per line;
  * `.json` starting with `[`: a JSON array of records, parsed incrementally (bounded memory, and
    a file cut short by a partial download is recognised as such: the complete records before
    the cut are read, then a `truncated_file` error says how many);
  * `.txt` / `.md`: the whole file is one plain-text document.

The record format (`Source.format`, default `auto`) is detected from the first record of each file
and then required of all its records. Readers never raise for a bad record: they *yield* the
`DataError`, so the caller decides between stopping (the default) and counting (--skip-invalid).
Only a missing or unreadable file raises.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from imitation_jax.data.formats import (
    FORMATS, Conversation, DataError, detect_format, parse_record, text_document)

JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_SUFFIXES = (".txt", ".md", ".text")
_CHUNK = 1 << 22  # bytes read at a time from a JSON array file
_MAX_RECORD = 1 << 28  # a JSON array record that does not parse within this many chars is malformed
_OPTIONS = re.compile(r"^[a-z_]+=[^,=]+(,[a-z_]+=[^,=]+)*$")


@dataclasses.dataclass(frozen=True)
class Source:
    """One input file and how to use it.

    `weight`: use each kept conversation W times on average (0.5: a deterministic half; 2: every
    conversation twice); `count`: exactly N conversations (a deterministic subset, or repeats when
    N exceeds what the file has). Neither: every kept conversation once. Eval conversations are
    never repeated.
    """

    path: str
    format: str = "auto"
    weight: float | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        if self.format not in ("auto", *FORMATS):
            raise DataError(f"{self.path}: format {self.format!r} is not one of auto, "
                            f"{', '.join(FORMATS)}", "bad_option")
        if self.weight is not None and self.count is not None:
            raise DataError(f"{self.path}: give weight or count, not both", "bad_option")
        if self.weight is not None and not self.weight >= 0:
            raise DataError(f"{self.path}: weight must be >= 0, got {self.weight}", "bad_option")
        if self.count is not None and self.count < 0:
            raise DataError(f"{self.path}: count must be >= 0, got {self.count}", "bad_option")

    @classmethod
    def parse(cls, spec: str, default_format: str = "auto") -> Source:
        """`PATH` or `PATH:format=F,weight=W` / `PATH:count=N` (options after the last colon)."""
        path, options = spec, {}
        head, sep, tail = spec.rpartition(":")
        if sep and head and _OPTIONS.match(tail):
            path = head
            for item in tail.split(","):
                key, value = item.split("=", 1)
                options[key] = value
        unknown = set(options) - {"format", "weight", "count"}
        if unknown:
            raise DataError(f"{spec}: unknown input option {sorted(unknown)[0]!r} "
                            f"(known: format, weight, count)", "bad_option")
        try:
            weight = float(options["weight"]) if "weight" in options else None
            count = int(options["count"]) if "count" in options else None
        except ValueError:
            raise DataError(f"{spec}: weight must be a number and count an integer",
                            "bad_option") from None
        return cls(path, options.get("format", default_format), weight, count)

    def __str__(self) -> str:
        opts = [f"format={self.format}"] if self.format != "auto" else []
        opts += [f"weight={self.weight:g}"] if self.weight is not None else []
        opts += [f"count={self.count}"] if self.count is not None else []
        return self.path + (":" + ",".join(opts) if opts else "")


def check_readable(path: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file" if not os.path.exists(path)
                        else f"{path}: not a regular file", "missing_file")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror or e}", "missing_file") from None


def _open(path: str) -> BinaryIO:
    check_readable(path)
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # type: ignore


def file_kind(path: str) -> str:
    """"jsonl", "array" or "text"."""
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    with _open(path) as f:
        head = f.read(4096).decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    if head.startswith("["):
        return "array"
    if head.startswith("{") or not head:
        return "jsonl"
    raise DataError(f"{path}: not JSON lines, a JSON array or a .txt file (starts with "
                    f"{head[:20]!r})", "unknown_format")


Item = tuple[str, Any]  # (where, record)
Progress = Callable[[int], None]  # called with bytes consumed


def iter_records(path: str, progress: Progress | None = None) -> Iterator[Item | DataError]:
    """(where, record) for every record of a file, or the DataError of a record that is bad."""
    kind = file_kind(path)
    if kind == "jsonl":
        yield from _iter_jsonl(path, progress)
    elif kind == "array":
        yield from _iter_json_array(path, progress)
    else:
        yield from _iter_text(path, progress)


def _iter_jsonl(path: str, progress: Progress | None) -> Iterator[Item | DataError]:
    with _open(path) as f:
        lineno = 0
        for lineno, raw in enumerate(f, start=1):
            if progress:
                progress(len(raw))
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield DataError(f"{where}: not valid UTF-8 (byte {e.start + 1})", "invalid_utf8")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if not raw.endswith(b"\n"):  # the last line, and it does not parse
                    yield DataError(f"{where}: the last line is cut off (the file ends early: "
                                    f"a partial download?): {e.msg}", "truncated_file")
                else:
                    yield DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})",
                                    "invalid_json")
                continue
            yield where, record


def jsonl_records(path: str) -> Iterator[Item]:
    """(where, record) for each non-empty line of a JSONL file (optionally .gz); the first bad line
    raises its DataError. For small side files (prompts, answers, seeds), where one bad line
    should stop the command rather than be skipped and counted."""
    for item in _iter_jsonl(path, None):
        if isinstance(item, DataError):
            raise item
        yield item


def _iter_text(path: str, progress: Progress | None) -> Iterator[Item | DataError]:
    with _open(path) as f:
        data = f.read()
    if progress:
        progress(len(data))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        yield DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start + 1})", "invalid_utf8")
        return
    yield f"{path}:1", {"text": text.lstrip("\ufeff"), "id": path}


class _ArrayReader:
    """A growing text window over a binary file, decoded incrementally as UTF-8."""

    def __init__(self, f: BinaryIO, path: str, progress: Progress | None):
        self.f, self.path, self.progress = f, path, progress
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False
        self.bytes_read = 0

    def more(self) -> bool:
        if self.eof:
            return False
        data = self.f.read(_CHUNK)
        if self.progress and data:
            self.progress(len(data))
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:
            raise DataError(f"{self.path}:{self.line + self.buf.count(chr(10), self.pos)}: "
                            f"not valid UTF-8 (byte {self.bytes_read + e.start + 1})",
                            "invalid_utf8") from None
        self.bytes_read += len(data)
        self.eof = not data
        self.buf = self.buf[self.pos:] + text  # drop what has been consumed
        self.pos = 0
        return True

    def skip_ws(self) -> str:
        """The next non-whitespace character ("" at the end of the file)."""
        while True:
            n = len(self.buf)
            while self.pos < n and self.buf[self.pos] in " \t\r\n\ufeff":
                if self.buf[self.pos] == "\n":
                    self.line += 1
                self.pos += 1
            if self.pos < n:
                return self.buf[self.pos]
            if not self.more():
                return ""

    def advance(self, end: int) -> None:
        self.line += self.buf.count("\n", self.pos, end)
        self.pos = end


def _iter_json_array(path: str, progress: Progress | None) -> Iterator[Item | DataError]:
    decoder = json.JSONDecoder()
    with _open(path) as f:
        r = _ArrayReader(f, path, progress)
        try:
            if r.skip_ws() != "[":
                yield DataError(f"{path}:{r.line}: expected a JSON array", "invalid_json")
                return
            r.advance(r.pos + 1)
            index = 0
            while True:
                c = r.skip_ws()
                if c == "]":
                    r.advance(r.pos + 1)
                    if r.skip_ws():
                        yield DataError(f"{path}:{r.line}: unexpected text after the JSON array",
                                        "invalid_json")
                    return
                if index > 0:
                    if c == ",":
                        r.advance(r.pos + 1)
                        c = r.skip_ws()
                    elif c:
                        yield DataError(f"{path}:{r.line}: record {index}: expected ',' or ']' "
                                        f"after record {index - 1}", "invalid_json")
                        return
                if not c:
                    yield _truncated(path, index, r.line)
                    return
                start_line = r.line
                while True:
                    try:  # an object or array that decodes is complete
                        record, end = decoder.raw_decode(r.buf, r.pos)
                        break
                    except json.JSONDecodeError as e:
                        if not r.eof and len(r.buf) - r.pos < _MAX_RECORD:
                            r.more()
                            continue
                        if r.eof and not r.buf.rstrip().endswith("]"):
                            yield _truncated(path, index, start_line)
                            return
                        line = start_line + r.buf.count("\n", r.pos, e.pos)
                        yield DataError(f"{path}:{line}: record {index}: invalid JSON: {e.msg} "
                                        f"(the rest of the file cannot be read)", "invalid_json")
                        return
                r.advance(end)
                yield f"{path}:{start_line}: record {index}", record
                index += 1
        except DataError as e:
            yield e


def _truncated(path: str, complete: int, line: int) -> DataError:
    return DataError(f"{path}: the JSON array ends early (a partial download?): {complete} "
                     f"complete records read, the file is cut off at line {line}",
                     "truncated_file")


def iter_parsed(source: Source, progress: Progress | None = None, detected: dict[str, str] | None = None
                ) -> Iterator[tuple[Conversation, str, str, Any] | DataError]:
    """(conversation, "FILE:LINE", format, raw record) for each record of one input, or the
    DataError of each bad record (yielded, not raised). `detected[source.path]` is set to the format
    in use once it is known."""
    fmt = None if source.format == "auto" else source.format
    for item in iter_records(source.path, progress):
        if isinstance(item, DataError):
            yield item
            continue
        where, record = item
        try:
            if fmt is None:
                fmt = detect_format(record, where)
                if detected is not None:
                    detected[source.path] = fmt
            yield parse_record(record, fmt, where), where, fmt, record
        except DataError as e:
            yield e


def iter_conversations(source: Source, progress: Progress | None = None,
                       detected: dict[str, str] | None = None) -> Iterator[Conversation | DataError]:
    """The conversations of one input, or the DataError of each bad record (yielded, not raised).

    `detected[source.path]` is set to the format in use once it is known."""
    for item in iter_parsed(source, progress, detected):
        yield item if isinstance(item, DataError) else item[0]


def read_conversations(paths, fmt: str = "auto") -> Iterator[Conversation]:
    """Every conversation of the files; the first bad record raises its DataError."""
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        for item in iter_conversations(Source(os.fspath(path), fmt)):
            if isinstance(item, DataError):
                raise item
            yield item


def read_messages_jsonl(path: str | os.PathLike[str]) -> Iterator[Conversation]:
    """Yields one Conversation per non-blank line of an OpenAI-messages JSONL file."""
    return read_conversations(path, "openai")


__all__ = ["Source", "check_readable", "file_kind", "iter_conversations", "iter_parsed", "iter_records",
           "read_conversations", "read_messages_jsonl", "text_document"]
