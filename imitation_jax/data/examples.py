"""From one cleaned conversation to the training examples that fit a row of `seq_len` tokens.

An example of n ids occupies n - 1 row positions (inputs ids[:-1], targets ids[1:]), so it fits a
row when n <= seq_len + 1. A longer conversation is, with `split_long` (the default), split at turn
boundaries into pieces that fit: each piece repeats the system message and carries whole exchanges
(the user turns and the reply that answers them), so no reply is cut. An exchange that alone does
not fit is dropped and counted (`exchanges_too_long`), unless `truncate_long_turns` cuts it at the
row's end (`exchanges_truncated`; the reply is then incomplete, which is why it is an explicit
option). Without `split_long`, a long conversation is dropped (`too_long`) or, with
`truncate_long_turns`, truncated. Plain-text documents are cut into row-sized chunks (every token
is trained, so nothing is "an answer").
"""

from __future__ import annotations

from collections import Counter

from imitation_jax.data.formats import Conversation, Message
from imitation_jax.data.templates import (
    AnyTemplate, Example, HFChatTemplate, encode_document, encode_with_starts)
from imitation_jax.data.tokenizer import Tokenizer


def _truncate(ex: Example, limit: int) -> Example | None:
    cut = Example(ex.ids[:limit], ex.loss_mask[:limit])
    return cut if cut.loss_mask[1:].any() else None


def _exchanges(body: tuple[Message, ...]) -> list[tuple[int, int]]:
    """[start, end) of each exchange: a run of prompt turns and the replies that follow."""
    bounds = [k for k in range(len(body))
              if k == 0 or (body[k].role != "assistant" and body[k - 1].role == "assistant")]
    return list(zip(bounds, bounds[1:] + [len(body)]))


def _answers(messages, offset: int = 0) -> tuple[int, ...]:
    """Indices (plus `offset`) of the assistant messages among `messages`, in order."""
    return tuple(offset + k for k, m in enumerate(messages) if m.role == "assistant")


def conversation_examples(conv: Conversation, tokenizer: Tokenizer, template: AnyTemplate,
                          seq_len: int, split_long: bool = True, truncate_long_turns: bool = False,
                          turns: list | None = None) -> tuple[list[Example], Counter, str | None]:
    """(examples, counts, drop reason or None). `turns`, if given, gets one entry per example:
    (the indices in conv.messages of the assistant turns it holds, in order; whether it was cut
    at the row's end), which is how the teacher's records of those turns find their tokens."""
    counts: Counter = Counter()
    if turns is None:
        turns = []
    limit = seq_len + 1
    if conv.kind == "text":
        ex = encode_document(tokenizer, conv.text)
        if len(ex) <= limit:
            turns.append(((), False))
            return [ex], counts, None
        pieces = [Example(ex.ids[s:s + limit], ex.loss_mask[s:s + limit])
                  for s in range(0, len(ex) - 1, seq_len)]
        counts["documents_split"] += 1
        pieces = [p for p in pieces if len(p) > 1 and p.loss_mask[1:].any()]
        turns += [((), False)] * len(pieces)
        return pieces, counts, None

    if isinstance(template, HFChatTemplate):  # a whole-text template would parse forged tokens
        specials = [s for s in tokenizer.special_strings() if s]
        if any(s in m.content for m in conv.messages for s in specials):
            return [], counts, "contains_special_token"

    ex, starts = encode_with_starts(tokenizer, conv.messages, template)
    if len(ex) <= limit:
        turns.append((_answers(conv.messages), False))
        return [ex], counts, None
    if not split_long:
        cut = _truncate(ex, limit) if truncate_long_turns else None
        if cut is None:
            return [], counts, "too_long"
        counts["exchanges_truncated"] += 1
        turns.append((_answers(conv.messages), True))
        return [cut], counts, None

    head = conv.messages[:1] if conv.messages[0].role == "system" else ()
    body = conv.messages[len(head):]
    exchanges = _exchanges(body)
    if starts is not None:  # token spans of each exchange in the whole conversation
        offsets = [starts[len(head) + s] for s, _ in exchanges] + [len(ex)]
        prefix = offsets[0]
        sizes = [b - a for a, b in zip(offsets, offsets[1:])]
    else:  # each exchange encoded alone (an over-estimate: it includes the prefix)
        prefix = 0
        sizes = [len(encode_with_starts(tokenizer, head + body[s:e], template)[0])
                 for s, e in exchanges]

    pieces: list[Example] = []
    i = 0
    while i < len(exchanges):
        j, total = i, prefix
        while j < len(exchanges) and total + sizes[j] <= limit:
            total += sizes[j]
            j += 1
        piece = None
        while j > i:  # the estimate can be off by a token at a boundary: check and back off
            piece = encode_with_starts(tokenizer, head + body[exchanges[i][0]:exchanges[j - 1][1]],
                                       template)[0]
            if len(piece) <= limit:
                break
            j -= 1
            piece = None
        if piece is None:  # exchange i alone does not fit a row
            alone = encode_with_starts(tokenizer, head + body[slice(*exchanges[i])], template)[0]
            cut = _truncate(alone, limit) if truncate_long_turns else None
            if cut is None:
                counts["exchanges_too_long"] += 1
            else:
                counts["exchanges_truncated"] += 1
                pieces.append(cut)
                turns.append((_answers(body[slice(*exchanges[i])], len(head) + exchanges[i][0]), True))
            i += 1
            continue
        pieces.append(piece)
        turns.append((_answers(body[exchanges[i][0]:exchanges[j - 1][1]], len(head) + exchanges[i][0]),
                      False))
        i = j
    if not pieces:
        return [], counts, "too_long"
    counts["conversations_split"] += 1
    counts["split_pieces"] += len(pieces)
    return pieces, counts, None
