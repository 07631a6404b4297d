"""Chat templates as data, and their segment-by-segment tokenization with an exact loss mask.

A `Template` is plain strings: `begin` (once), and one format per role with a single `{content}`
placeholder. In the assistant's format, the text before `{content}` is the marker that prompts the
model's turn (untrained); the content and the end marker after it (EOS, `<|eot_id|>`,
`<|im_end|>`) are trained; `assistant_tail` (chatml's newline) follows untrained. In any literal,
`{bos}` / `{eos}` are the tokenizer's BOS/EOS and `<|name|>` (or Gemma's `<start_of_turn>` / `<end_of_turn>`) is a special token, all placed as
ids, never as text, so no conversation content can forge them.

Built-in templates (EOS shown as </s>, BOS as <s>):

  koala        <s>BEGINNING OF CONVERSATION: {system} USER: {user} GPT: {reply}</s> USER: ...
  vicuna       <s>{system or the v1.1 default} USER: {user} ASSISTANT: {reply}</s>USER: ...
  llama2-chat  <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {reply}</s><s>[INST] ...
               (Meta's reference puts a space before </s>; as a token of its own it would be
               trained noise, so it is left out)
  llama3       <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{user}<|eot_id|>
               <|start_header_id|>assistant<|end_header_id|>\\n\\n{reply}<|eot_id|>...
  chatml       <|im_start|>user\\n{user}<|im_end|>\\n<|im_start|>assistant\\n{reply}<|im_end|>\\n...
  qwen2.5      chatml without BOS, with Qwen2.5's default system message when a conversation has none
               (Qwen3 and other ChatML models without a default: chatml)
  gemma        <bos><start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n<start_of_turn>model\\n{reply}
               <end_of_turn>\\n... (Gemma's own format: no system role, the system message opens the
               first user turn; the model turn ends at <end_of_turn>)
  hf           the tokenizer's own `chat_template`; to build a training mask it must mark the
               assistant's text with `{% generation %}` ... `{% endgeneration %}` (refused
               otherwise); prompting (generate, chat, serve, export) works without them

`template.with_turn_tokens()` puts the special tokens `<|user|>` / `<|assistant|>` right before
the content of every user and model turn (the reference study marked turns this way).

Tokenization is segment by segment: each literal piece and each message content is encoded on its
own and the ids are concatenated, so a token never straddles a prompt/reply boundary and the mask
is exact by construction. Spaces follow the usual "a space belongs to the next word" rule: the
trailing spaces of a literal are moved to the start of the next segment (and dropped before a
special token), and for tokenizers whose
`encode` already starts each text as a new word (SentencePiece's dummy prefix, `prepends_space`)
one leading space is dropped so it is not encoded twice. With LLaMA-1/2 and byte-level BPE
tokenizers this reproduces the tokenization of the whole rendered text, except that a
prepends_space tokenizer also starts a word right after a newline or special token.

`encode_prompt` runs the same code for inference, so a prompt is exactly the training ids up to the
first token of the reply the model is asked to write; `stop_ids` are the ids that end a reply.
`chat_template_jinja` writes a built-in template as a Hugging Face chat_template (with generation
markers) for export; it replays these spacing rules, so the exported tokenizer turns its text into
exactly these ids (not `render_text`'s, whose spaces before special tokens would each become a
token). One case no text reproduces: with a prepends_space tokenizer, a message ending in a space
before more text (the whole-text tokenizer merges that space with the next word's).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence

import numpy as np

from imitation_jax.data.formats import ROLES, Conversation, Message
from imitation_jax.errors import DataError
from imitation_jax.data.tokenizer import HFTokenizer, Tokenizer

CONTENT = "{content}"
SPECIAL = re.compile(r"(\{bos\}|\{eos\}|<\|[A-Za-z0-9_.:-]+\|>|<start_of_turn>|<end_of_turn>)")  # Gemma's too
TURN_TOKENS = ("<|user|>", "<|assistant|>")
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@dataclasses.dataclass(frozen=True)
class Template:
    name: str
    begin: str  # literal text once at the start ("{bos}" for BOS)
    system: str  # each role: literal text around one "{content}"
    user: str
    assistant: str  # before {content}: generation marker (untrained); after: end marker (trained)
    assistant_tail: str = ""  # untrained text after each model turn
    user_after_system: str | None = None  # the first user turn right after the system message
    default_system: str | None = None  # system message used when a conversation has none
    stop: str = "{eos}"  # the end marker a model turn ends with

    def __post_init__(self) -> None:
        for field in ("system", "user", "assistant", "user_after_system"):
            value = getattr(self, field)
            if value is not None and value.count(CONTENT) != 1:
                raise ValueError(f"template {self.name!r}: {field} format must contain "
                                 f"{CONTENT} exactly once")
        for field in ("begin", "assistant_tail", "stop"):
            if CONTENT in getattr(self, field):
                raise ValueError(f"template {self.name!r}: {field} cannot contain {CONTENT}")

    def format(self, role: str, after_system: bool = False) -> tuple[str, str]:
        """(text before the content, text after it) for a role."""
        fmt = getattr(self, role)
        if role == "user" and after_system and self.user_after_system is not None:
            fmt = self.user_after_system
        before, _, after = fmt.partition(CONTENT)
        return before, after

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """The special tokens the template places (the tokenizer must have or add them)."""
        seen: dict[str, None] = {}
        for field in ("begin", "system", "user", "assistant", "assistant_tail",
                      "user_after_system", "stop"):
            for token in SPECIAL.findall(getattr(self, field) or ""):
                if token.startswith("<"):
                    seen[token] = None
        return tuple(seen)

    def with_turn_tokens(self) -> Template:
        def mark(fmt: str | None, token: str) -> str | None:
            return None if fmt is None else fmt.replace(CONTENT, token + CONTENT)
        return dataclasses.replace(
            self, name=self.name + "+turn_tokens", user=mark(self.user, TURN_TOKENS[0]),
            user_after_system=mark(self.user_after_system, TURN_TOKENS[0]),
            assistant=mark(self.assistant, TURN_TOKENS[1]))


_LLAMA3_HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"
TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template("koala", begin="{bos}BEGINNING OF CONVERSATION:", system=" {content}",
             user=" USER: {content}", assistant=" GPT: {content}{eos}"),
    Template("vicuna", begin="{bos}", system="{content} ", user="USER: {content}",
             assistant=" ASSISTANT: {content}{eos}", default_system=VICUNA_SYSTEM),
    Template("llama2-chat", begin="", system="{bos}[INST] <<SYS>>\n{content}\n<</SYS>>\n\n",
             user="{bos}[INST] {content} [/INST]", user_after_system="{content} [/INST]",
             assistant=" {content}{eos}"),
    Template("llama3", begin="{bos}",
             system=_LLAMA3_HEADER.format(role="system") + "{content}<|eot_id|>",
             user=_LLAMA3_HEADER.format(role="user") + "{content}<|eot_id|>",
             assistant=_LLAMA3_HEADER.format(role="assistant") + "{content}<|eot_id|>",
             stop="<|eot_id|>"),
    Template("chatml", begin="{bos}", system="<|im_start|>system\n{content}<|im_end|>\n",
             user="<|im_start|>user\n{content}<|im_end|>\n",
             assistant="<|im_start|>assistant\n{content}<|im_end|>", assistant_tail="\n",
             stop="<|im_end|>"),
    Template("qwen2.5", begin="", system="<|im_start|>system\n{content}<|im_end|>\n",
             user="<|im_start|>user\n{content}<|im_end|>\n",
             assistant="<|im_start|>assistant\n{content}<|im_end|>", assistant_tail="\n",
             stop="<|im_end|>", default_system=QWEN25_SYSTEM),
    Template("gemma", begin="{bos}", system="<start_of_turn>user\n{content}\n\n",
             user="<start_of_turn>user\n{content}<end_of_turn>\n", user_after_system="{content}<end_of_turn>\n",
             assistant="<start_of_turn>model\n{content}<end_of_turn>", assistant_tail="\n",
             stop="<end_of_turn>"),
)}
HF_TEMPLATE = "hf"  # the tokenizer's own chat_template
TEMPLATE_NAMES = (*TEMPLATES, HF_TEMPLATE)


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized conversation: `loss_mask[i]` says whether `ids[i]` is a trained token."""

    ids: np.ndarray  # int32 [n]
    loss_mask: np.ndarray  # bool [n], aligned with ids

    def __len__(self) -> int:
        return len(self.ids)


# ---------------------------------------------------------------- built-in templates


@dataclasses.dataclass(frozen=True)
class _Segment:
    text: str
    trained: bool
    literal: bool  # template text (may hold special tokens; trailing spaces move on)
    message: int | None  # index of the message it belongs to


def _segments(messages: Sequence[Message], template: Template,
              generation_marker: bool) -> list[_Segment]:
    segs = [_Segment(template.begin, False, True, None)]
    prev = None
    if (not messages or messages[0].role != "system") and template.default_system is not None:
        before, after = template.format("system")
        segs += [_Segment(before, False, True, None),
                 _Segment(template.default_system, False, False, None),
                 _Segment(after, False, True, None)]
        prev = "system"
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise ValueError(f"role {m.role!r} is not one of {', '.join(ROLES)}")
        before, after = template.format(m.role, after_system=prev == "system")
        trained = m.role == "assistant"
        segs += [_Segment(before, False, True, i), _Segment(m.content, trained, False, i),
                 _Segment(after, trained, True, i)]
        if trained and template.assistant_tail:
            segs.append(_Segment(template.assistant_tail, False, True, i))
        prev = m.role
    if generation_marker:
        segs.append(_Segment(template.format("assistant")[0], False, True, len(messages)))
    return segs


def _special_id(tokenizer: Tokenizer, token: str) -> int | None:
    if token == "{bos}":
        return tokenizer.bos_id
    if token == "{eos}":
        return tokenizer.eos_id
    i = tokenizer.special_id(token)
    if i is None:
        raise DataError(f"the chat template needs the special token {token}, which tokenizer "
                        f"{tokenizer.path} lacks (use the tokenizer saved with the prepared data, "
                        f"which has it added)", "missing_special_token")
    return i


def _encode(tokenizer: Tokenizer, segments: list[_Segment]
            ) -> tuple[list[int], list[bool], dict[int, int]]:
    """ids, mask, and the position of the first id of each message."""
    ids: list[int] = []
    mask: list[bool] = []
    starts: dict[int, int] = {}
    carry = ""  # spaces cut from the end of a literal: they start the next word
    for seg in segments:
        if seg.message is not None and seg.message not in starts:
            starts[seg.message] = len(ids)
        parts = SPECIAL.split(seg.text) if seg.literal else [seg.text]
        for k, part in enumerate(parts):
            if k % 2:  # a special token
                token_id = _special_id(tokenizer, part)
                if token_id is not None:
                    ids.append(token_id)
                    mask.append(seg.trained)
                carry = ""  # a space before a special token has no word to attach to
                continue
            text = carry + part
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
    return ids, mask, starts


# ---------------------------------------------------------------- the tokenizer's chat_template

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


class HFChatTemplate:
    """The tokenizer's own `chat_template`, with the assistant mask from its generation markers."""

    name = HF_TEMPLATE
    special_tokens: tuple[str, ...] = ()

    def __init__(self, tokenizer: Tokenizer):
        if not isinstance(tokenizer, HFTokenizer):
            raise DataError(f"{tokenizer.path}: template 'hf' uses the tokenizer's chat_template, "
                            f"which needs a Hugging Face tokenizer directory", "bad_template")
        template = tokenizer.hf.chat_template
        if not isinstance(template, str) or not template.strip():
            raise DataError(f"{tokenizer.path}: the tokenizer has no chat_template; pick a "
                            f"built-in template ({', '.join(TEMPLATES)})", "bad_template")
        self.tokenizer = tokenizer
        # Prompting (generate, chat, serve, eval, export) needs no markers; only a mask does.
        self.has_markers = bool(_GENERATION.search(template))

    def require_markers(self) -> None:
        """Refuse to build a training mask from a chat_template without generation markers."""
        if not self.has_markers:
            raise DataError(f"{self.tokenizer.path}: the tokenizer's chat_template has no "
                            "{% generation %} markers, so the assistant's tokens cannot be told "
                            "apart (training on every token would be wrong); add them around "
                            "each assistant reply or pick a built-in template "
                            f"({', '.join(TEMPLATES)})", "bad_template")

    @staticmethod
    def _dicts(messages: Sequence[Message]) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in messages]

    def encode(self, tokenizer: Tokenizer, messages: Sequence[Message]) -> Example:
        self.require_markers()
        out = self.tokenizer.hf.apply_chat_template(
            self._dicts(messages), tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True)
        ids = np.asarray(out["input_ids"], np.int32)
        mask = np.asarray(out["assistant_masks"], np.bool_)
        if any(m.role == "assistant" for m in messages) and not mask.any():
            raise DataError(f"{self.tokenizer.path}: the chat_template's generation markers "
                            "cover no token of a conversation with assistant turns",
                            "bad_template")
        return Example(ids, mask)

    def prompt(self, tokenizer: Tokenizer, messages: Sequence[Message]) -> np.ndarray:
        out = self.tokenizer.hf.apply_chat_template(
            self._dicts(messages), tokenize=True, return_dict=True, add_generation_prompt=True)
        return np.asarray(out["input_ids"], np.int32)


AnyTemplate = Template | HFChatTemplate


def get_template(name: str, tokenizer: Tokenizer | None = None, *,
                 turn_tokens: bool = False) -> AnyTemplate:
    """A built-in template by name, or "hf" (needs the tokenizer). Unknown name: ValueError."""
    if name == HF_TEMPLATE:
        if tokenizer is None:
            raise ValueError("template 'hf' needs the tokenizer")
        if turn_tokens:
            raise DataError("turn tokens need a built-in template, not 'hf'", "bad_template")
        return HFChatTemplate(tokenizer)
    try:
        template = TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; known: "
                         f"{', '.join(TEMPLATE_NAMES)}") from None
    return template.with_turn_tokens() if turn_tokens else template


# ---------------------------------------------------------------- encoding


def _messages(conversation: Conversation | Sequence[Message]) -> Sequence[Message]:
    return conversation.messages if isinstance(conversation, Conversation) else conversation


def encode_with_starts(tokenizer: Tokenizer, messages: Sequence[Message], template: AnyTemplate
                       ) -> tuple[Example, dict[int, int] | None]:
    """The training example and where each message's tokens start (None for "hf")."""
    if isinstance(template, HFChatTemplate):
        return template.encode(tokenizer, messages), None
    ids, mask, starts = _encode(tokenizer, _segments(messages, template, False))
    return Example(np.asarray(ids, np.int32), np.asarray(mask, np.bool_)), starts


def encode_conversation(tokenizer: Tokenizer, conversation: Conversation | Sequence[Message],
                        template: AnyTemplate) -> Example:
    """Training ids and mask: True exactly on assistant contents and the end marker after each
    (for a plain-text document: every token but BOS)."""
    if isinstance(conversation, Conversation) and conversation.kind == "text":
        return encode_document(tokenizer, conversation.text)
    return encode_with_starts(tokenizer, _messages(conversation), template)[0]


def encode_prompt(tokenizer: Tokenizer, messages: Conversation | Sequence[Message],
                  template: AnyTemplate) -> np.ndarray:
    """Inference prompt: the history followed by the marker of the next model turn (int32)."""
    if isinstance(template, HFChatTemplate):
        return template.prompt(tokenizer, _messages(messages))
    ids, _, _ = _encode(tokenizer, _segments(_messages(messages), template, True))
    return np.asarray(ids, np.int32)


def encode_document(tokenizer: Tokenizer, text: str) -> Example:
    """A plain-text document: BOS (untrained), the text and EOS (trained)."""
    ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(text)
    ids.append(tokenizer.eos_id)
    mask = np.ones(len(ids), np.bool_)
    if tokenizer.bos_id is not None:
        mask[0] = False
    return Example(np.asarray(ids, np.int32), mask)


def stop_ids(tokenizer: Tokenizer, template: AnyTemplate) -> list[int]:
    """Ids that end a model turn (generation stops at any of them)."""
    if isinstance(template, HFChatTemplate):
        return [tokenizer.eos_id]
    ids = [i for token in SPECIAL.findall(template.stop)
           if (i := _special_id(tokenizer, token)) is not None]
    return ids if tokenizer.eos_id in ids else ids + [tokenizer.eos_id]


def render_text(messages: Conversation | Sequence[Message], template: Template, *,
                bos: str = "", eos: str = "", generation_marker: bool = False) -> str:
    """The conversation as text (for reading, and for training a tokenizer on the format).

    BOS/EOS are shown as the given strings and special tokens as their names; tokenize with
    `encode_conversation`, never this text.
    """
    def lit(text: str) -> str:
        return text.replace("{bos}", bos).replace("{eos}", eos)
    segs = _segments(_messages(messages), template, generation_marker)
    text = "".join(lit(s.text) if s.literal else s.text for s in segs)
    return text.rstrip(" ") if generation_marker else text


def chat_template_jinja(template: Template, prepends_space: bool = False) -> str:
    """A Hugging Face chat_template rendering `template` (with `{% generation %}` markers).

    The Jinja replays `_encode`'s spacing rules as it renders (a namespace carries the spaces cut
    from the end of a literal), so tokenizing its text gives exactly our ids: spaces before a
    special token (or at the end) are left out, as `_encode` drops them. `prepends_space` (the
    tokenizer's): `_encode` starts every segment as a new word, so the text also starts each
    segment with a space (inserted where none is, except right after a special token or at the
    start, where the tokenizer prepends it itself), e.g. chatml's `"user\\n" + " Hi"`.
    """
    def text(expr: str, literal: bool) -> str:
        out = "{%- set ns.t = ns.carry + " + expr + " -%}{%- set ns.carry = '' -%}"
        if literal:  # trailing spaces belong to the next segment
            out += ("{%- set ns.body = ns.t.rstrip(' ') -%}"
                    "{%- set ns.carry = ns.t[ns.body|length:] -%}{%- set ns.t = ns.body -%}")
        if not prepends_space:
            return out + "{{ ns.t }}"
        return out + ("{%- if ns.t.startswith(' ') -%}{%- set ns.t = ns.t[1:] -%}{%- endif -%}"
                      "{%- if ns.t -%}"
                      "{{ ns.t if ns.fresh and not ns.t.startswith(' ') else ' ' + ns.t }}"
                      "{%- set ns.fresh = false -%}{%- endif -%}")

    def lit(literal: str) -> str:
        out = []
        for k, part in enumerate(SPECIAL.split(literal)):
            if k % 2:
                out.append("{%- set ns.carry = '' -%}{%- set ns.fresh = true -%}" +
                           {"{bos}": "{{ bos_token }}", "{eos}": "{{ eos_token }}"}.get(part, part))
            elif part:
                out.append(text(json.dumps(part), literal=True))
        return "".join(out)

    content = text("message['content']", literal=False)

    def role(fmt: str, trained: bool = False) -> str:
        before, _, after = fmt.partition(CONTENT)
        if trained:  # spaces carried from the marker start the reply's first token: trained
            return lit(before) + "{% generation %}" + content + lit(after) + "{% endgeneration %}"
        return lit(before) + content + lit(after)

    default = ""
    if template.default_system is not None:
        before, after = template.format("system")
        default = ("{%- if messages|length == 0 or messages[0]['role'] != 'system' -%}"
                   + lit(before) + text(json.dumps(template.default_system), literal=False)
                   + lit(after) + "{%- set ns.prev = 'system' -%}{%- endif -%}")
    return ("{%- set ns = namespace(prev='', carry='', t='', body='', fresh=true) -%}"
            + lit(template.begin) + default +
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'system' -%}" + role(template.system) +
            "{%- elif message['role'] == 'user' and ns.prev == 'system' -%}"
            + role(template.user_after_system or template.user) +
            "{%- elif message['role'] == 'user' -%}" + role(template.user) +
            "{%- else -%}" + role(template.assistant, trained=True) + lit(template.assistant_tail) +
            "{%- endif -%}{%- set ns.prev = message['role'] -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}" + lit(template.format("assistant")[0])
            + "{%- endif -%}")
