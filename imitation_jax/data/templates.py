"""Chat templates as data, and their segment-by-segment tokenization with an exact loss mask.

A `Template` is plain strings: `begin` (once, after BOS) and one format per role with a single
`{content}` placeholder. The text before `{content}` in `assistant` is the marker that prompts the
model's turn; the content, any text after it and the EOS that ends each model turn are trained.

koala (the Koala/EasyLM format used by the reference study), with EOS shown as </s>:

    <s>BEGINNING OF CONVERSATION: {system} USER: {user} GPT: {reply}</s> USER: {user} GPT: ...

(without a system message: `BEGINNING OF CONVERSATION: USER: ...`). BOS and EOS are inserted as
token ids, never as text, so no user content can forge them.

Tokenization is segment by segment: each literal piece and each message content is encoded on its
own and the ids are concatenated, so a token never straddles a prompt/reply boundary and the mask
is exact by construction. Spaces follow the usual "a space belongs to the next word" rule: the
trailing spaces of a literal are moved to the start of the next segment, and for tokenizers whose
`encode` already starts each text as a new word (SentencePiece's dummy prefix, `prepends_space`)
one leading space is dropped so it is not encoded twice. With LLaMA-1/2 and byte-level BPE
tokenizers this reproduces the tokenization of the whole rendered text. (A prepends_space
tokenizer also starts a word at a boundary without a space, e.g. after EOS; formats whose literals
glue onto content without a space would need a tokenizer without that prefix.)

`encode_prompt` runs the same code for inference, so a prompt is exactly the training ids up to the
first token of the reply the model is asked to write.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from imitation_jax.data.formats import ROLES, Conversation, Message
from imitation_jax.data.tokenizer import Tokenizer

CONTENT = "{content}"


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    begin: str  # literal text once after BOS
    system: str  # each role: literal text around one "{content}"
    user: str
    assistant: str  # text before {content} is the generation marker
    eos_after_assistant: bool = True  # EOS (as an id, trained) ends every model turn

    def __post_init__(self) -> None:
        for role in ("system", "user", "assistant"):
            if getattr(self, role).count(CONTENT) != 1:
                raise ValueError(f"template {self.name!r}: {role} format must contain "
                                 f"{CONTENT} exactly once")

    def split(self, role: str) -> tuple[str, str]:
        """(text before the content, text after it) for a role."""
        before, _, after = getattr(self, role).partition(CONTENT)
        return before, after


TEMPLATES: dict[str, Template] = {
    "koala": Template(
        name="koala",
        begin="BEGINNING OF CONVERSATION:",
        system=" {content}",
        user=" USER: {content}",
        assistant=" GPT: {content}",
    ),
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}"
                         ) from None


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized conversation: `loss_mask[i]` says whether `ids[i]` is a trained token."""

    ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # bool [n], aligned with ids

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass(frozen=True)
class _Segment:
    text: str | None  # None: the EOS token
    trained: bool
    literal: bool  # template text (its trailing spaces move on) rather than message content


def _segments(messages: Sequence[Message], template: Template,
              generation_marker: bool) -> list[_Segment]:
    segs = [_Segment(template.begin, False, True)]
    for m in messages:
        if m.role not in ROLES:
            raise ValueError(f"role {m.role!r} is not one of {', '.join(ROLES)}")
        before, after = template.split(m.role)
        trained = m.role == "assistant"
        segs += [_Segment(before, False, True), _Segment(m.content, trained, False),
                 _Segment(after, trained, True)]
        if trained and template.eos_after_assistant:
            segs.append(_Segment(None, True, True))
    if generation_marker:
        segs.append(_Segment(template.split("assistant")[0], False, True))
    return segs


def _encode(tokenizer: Tokenizer, segments: list[_Segment]) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    mask: list[bool] = []
    if tokenizer.bos_id is not None:
        ids.append(tokenizer.bos_id)
        mask.append(False)
    carry = ""  # spaces cut from the end of a literal: they start the next word
    for seg in segments:
        if seg.text is None:
            ids.append(tokenizer.eos_id)
            mask.append(seg.trained)
            carry = ""  # a space before EOS has no word to attach to
            continue
        text = carry + seg.text
        carry = ""
        if seg.literal:
            body = text.rstrip(" ")
            carry = text[len(body):]
            text = body
        if not text:
            continue
        if tokenizer.prepends_space and text.startswith(" "):
            text = text[1:]
        piece = tokenizer.encode(text)
        ids += piece
        mask += [seg.trained] * len(piece)
    return ids, mask


def _messages(conversation: Conversation | Sequence[Message]) -> Sequence[Message]:
    return conversation.messages if isinstance(conversation, Conversation) else conversation


def encode_conversation(tokenizer: Tokenizer, conversation: Conversation | Sequence[Message],
                        template: Template) -> Example:
    """Training ids and mask: True exactly on assistant contents and the EOS after each."""
    ids, mask = _encode(tokenizer, _segments(_messages(conversation), template, False))
    return Example(np.asarray(ids, np.int32), np.asarray(mask, np.bool_))


def encode_prompt(tokenizer: Tokenizer, messages: Conversation | Sequence[Message],
                  template: Template) -> np.ndarray:
    """Inference prompt: the history followed by the marker of the next model turn (int32)."""
    ids, _ = _encode(tokenizer, _segments(_messages(messages), template, True))
    return np.asarray(ids, np.int32)


def render_text(messages: Conversation | Sequence[Message], template: Template, *,
                bos: str = "", eos: str = "", generation_marker: bool = False) -> str:
    """The conversation as text (for reading, and for training a tokenizer on the format).

    BOS/EOS are shown as the given strings; tokenize with `encode_conversation`, never this text.
    """
    parts = [bos, template.begin]
    for m in _messages(messages):
        before, after = template.split(m.role)
        parts += [before, m.content, after]
        if m.role == "assistant" and template.eos_after_assistant:
            parts.append(eos)
    if generation_marker:
        parts.append(template.split("assistant")[0].rstrip(" "))
    return "".join(parts)
