"""Conversation cleaning: every switch in `CleaningConfig`, every change and drop counted.

`clean(conversation, cfg)` returns the cleaned conversation, or the reason it is dropped, plus a
`Counter` of what it changed. In order:

  1. HTML to markdown (`html_to_markdown`): turns that are HTML fragments (ShareGPT dumps scraped
     from the ChatGPT web page: `<p>`, `<div>`, `<pre><code class="language-x">`, ...) are
     converted with `markdownify`; "Copy code" buttons and code-block headers are removed and the
     code language is kept on the fence. Plain-text turns are left alone.
  2. Surrounding whitespace stripped from every turn; empty turns removed (`turns_empty`).
  3. Conversations containing a configured phrase (`filter_phrases`, case-insensitive, any turn,
     e.g. the teacher's name) dropped (`filtered_phrase`).
  4. Consecutive turns of the same role merged with a blank line between them (`merge_same_role`).
  5. A leading assistant turn (nothing prompted it) removed (`drop_leading_assistant`).
  6. Trailing user turns (never answered, nothing to train) removed.
  7. Nothing left: dropped as `empty`; no assistant turn: dropped as `no_assistant_turn`.

Exact duplicates (`dedup`) are found by the caller with `content_hash` of the cleaned conversation,
and length handling (`split_long`, `truncate_long_turns`) happens after tokenization
(`examples.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter

from imitation_jax.data.formats import Conversation, Message

DROP_REASONS = ("empty", "no_assistant_turn", "filtered_phrase", "duplicate", "too_long",
                "contains_special_token")


@dataclasses.dataclass
class CleaningConfig:
    html_to_markdown: bool = True  # convert HTML turns (scraped ShareGPT) to markdown
    dedup: bool = True  # drop exact-duplicate conversations (after cleaning; the first one stays)
    filter_phrases: list[str] = dataclasses.field(default_factory=list)  # drop conversations containing any (case-insensitive)
    merge_same_role: bool = True  # merge consecutive turns of one role
    drop_leading_assistant: bool = True  # remove an assistant turn that opens a conversation
    split_long: bool = True  # split conversations longer than seq_len at turn boundaries
    truncate_long_turns: bool = False  # cut an exchange longer than a row (else it is dropped)


_HTML_START = re.compile(r"\s*<(p|div|ol|ul|pre|table|h[1-6]|blockquote|span|br|hr|code|em|"
                         r"strong|b|i|a)[\s>/]", re.IGNORECASE)
_HTML_TAG = re.compile(r"</(p|div|ol|ul|li|pre|table|h[1-6]|blockquote|span|code|strong|em|a)>",
                       re.IGNORECASE)


def looks_like_html(text: str) -> bool:
    """An HTML fragment: starts with a common tag and closes at least one."""
    return bool(_HTML_START.match(text)) and bool(_HTML_TAG.search(text))


def html_to_markdown(text: str) -> str:
    from bs4 import BeautifulSoup
    from markdownify import MarkdownConverter

    soup = BeautifulSoup(text, "html.parser")
    for button in soup.find_all("button"):  # "Copy code"
        button.decompose()
    for pre in soup.find_all("pre"):  # keep only the code of ChatGPT's code widget
        code = pre.find("code")
        if code is None:
            continue
        lang = next((c[len("language-"):] for c in code.get("class") or []
                     if c.startswith("language-")), "")
        body = code.get_text()
        pre.clear()
        new = soup.new_tag("code")
        new.string = body
        pre.append(new)
        pre["data-lang"] = lang
    md = MarkdownConverter(heading_style="ATX", bullets="-", escape_misc=False,
                           code_language_callback=lambda el: el.get("data-lang") or None
                           ).convert_soup(soup)
    return re.sub(r"\n{3,}", "\n\n", md).strip()


def clean(conv: Conversation, cfg: CleaningConfig, phrases: tuple[str, ...] = ()
          ) -> tuple[Conversation | str, Counter]:
    """(cleaned conversation or drop reason, counts of changes). `phrases`: lower-cased."""
    counts: Counter = Counter()
    counts["turns_read"] += len(conv.messages)
    if conv.kind == "text":
        text = conv.text.strip()
        if not text:
            return "empty", counts
        if phrases and any(p in text.lower() for p in phrases):
            return "filtered_phrase", counts
        return dataclasses.replace(conv, messages=(Message("text", text),)), counts

    messages: list[Message] = []
    for m in conv.messages:
        content = m.content
        if cfg.html_to_markdown and "<" in content and looks_like_html(content):
            content = html_to_markdown(content)
            counts["turns_html_converted"] += 1
        content = content.strip()
        if not content:
            counts["turns_empty"] += 1
            continue
        messages.append(Message(m.role, content))
    if not any(m.role != "system" for m in messages):
        return "empty", counts
    if phrases:
        for m in messages:
            low = m.content.lower()
            if any(p in low for p in phrases):
                return "filtered_phrase", counts
    if cfg.merge_same_role:
        merged: list[Message] = []
        for m in messages:
            if merged and merged[-1].role == m.role:
                merged[-1] = Message(m.role, merged[-1].content + "\n\n" + m.content)
                counts["turns_merged"] += 1
            else:
                merged.append(m)
        messages = merged
    start = 1 if messages[0].role == "system" else 0
    if cfg.drop_leading_assistant:
        while len(messages) > start and messages[start].role == "assistant":
            del messages[start]
            counts["turns_leading_assistant"] += 1
    while len(messages) > start and messages[-1].role != "assistant":
        messages.pop()
        counts["turns_unanswered"] += 1
    if len(messages) <= start:
        return "no_assistant_turn", counts
    counts["turns_kept"] += len(messages)
    return dataclasses.replace(conv, messages=tuple(messages)), counts


def content_hash(conv: Conversation) -> bytes:
    """16 bytes identifying a conversation's roles and contents (not its id or source)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(conv.kind.encode())
    for m in conv.messages:
        h.update(b"\x00" + m.role.encode() + b"\x01" + m.content.encode("utf-8", "surrogatepass"))
    return h.digest()


def normalized_phrases(cfg: CleaningConfig) -> tuple[str, ...]:
    return tuple(p.lower() for p in cfg.filter_phrases if p.strip())
