"""The teacher's stored top-K log-probabilities as sparse training targets.

Same tokenizer (exact): an answer gets exact targets when the student's tokens of that answer (in
the template's context) have, one for one, the bytes of the teacher's tokens, and every
alternative's bytes are one student token. The target at ids position j (a trained token) is the
teacher's distribution of the token at j: K student ids and their logprobs.

Different tokenizer (aligned by byte offsets): when the student's tokens of the answer spell the
teacher's bytes but not token for token, each student token's [start, end) byte span in the
answer is compared with the teacher's tokens' spans. A student token whose span is exactly one
teacher token's gets that token's top-K mapped into the student vocabulary: an alternative whose
bytes are one student token maps to it (alternatives mapping to the same id are merged, their
probabilities added), any other is dropped, so its probability falls into the tail bucket the
sparse loss forms (1 - the listed mass). A student token spanning several teacher tokens or part
of one gets no target. When the student's tokens do not spell the teacher's bytes at all the
answer falls back whole (`tokenization_mismatch`).

The end-of-turn tokens after the answer are trained with plain cross entropy (no sparse target).
Anything else falls back to cross entropy and is counted by reason (`FALLBACKS`); alternatives
folded into the tail or merged at aligned positions are counted too (`ALTERNATIVES`).

SentencePiece's dummy prefix: the teacher's first token of an answer loses its leading space when
decoding drops it (OpenAI's convention, as `serve` writes it), so the student's first token is
compared the same way, and a first-position alternative's bytes B map to the piece " "+B when
the student has one (the reading the sampled token was given), else to B. A special token among
the alternatives (EOS, an end-of-turn token: no bytes in the text, so collect stores its name)
maps to the student's special token of that name when its bytes are no piece.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from imitation_jax.data.teacher_logprobs import NEG_INF, TeacherLogprobs
from imitation_jax.data.tokenizer import Tokenizer

# Reasons a trained answer position gets no sparse target (counted in stats.json).
FALLBACKS = ("tokenization_mismatch",  # the student's tokens of the answer do not spell the teacher's bytes
             "alternative_not_a_student_token",  # an alternative is no single (distinct) student token
             "span_not_one_teacher_token",  # aligned: the student token covers several teacher tokens or part of one
             "no_alternative_a_student_token",  # aligned: not one alternative is a student token
             "changed_by_cleaning",  # cleaning changed the answer's text (strip, html, merge)
             "unaligned",  # the example's trained spans do not match its assistant turns
             "truncated")  # the answer was cut at the row's end
# Alternatives at aligned positions (different tokenizer) that are not one-to-one student ids.
ALTERNATIVES = ("folded_into_tail",  # its bytes are no student token: its probability joins the tail
                "merged")  # it maps to the same student id as an earlier alternative: probabilities added


class PieceBytes:
    """Each student id's bytes in decoded text (None: a special token), and bytes -> id."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.bytes: list[bytes | None] = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.ids: dict[bytes, int] = {}
        fallback: dict[bytes, int] = {}  # byte-fallback pieces (<0xNN>), used only if nothing else
        for i, b in enumerate(self.bytes):
            if b is None:
                continue
            (fallback if self._is_byte_piece(i) else self.ids).setdefault(b, i)
        for b, i in fallback.items():
            self.ids.setdefault(b, i)
        self._special: dict[str, int | None] = {}

    def special(self, text: str) -> int | None:
        """The student's special token (its own or one prepare added) named `text`, if any."""
        if text not in self._special:
            self._special[text] = self.tokenizer.special_id(text)
        return self._special[text]

    def _is_byte_piece(self, i: int) -> bool:
        sp = getattr(self.tokenizer, "_sp", None)
        return bool(sp.is_byte(i)) if sp is not None else False

    def first(self, i: int) -> tuple[bytes | None, bool]:
        """The bytes of id i as the first token of a decoded text, and whether a leading space
        was dropped (the tokenizer's decoding drops it: SentencePiece's dummy prefix)."""
        return self.tokenizer.first_token_bytes(i)


@dataclasses.dataclass(frozen=True)
class Targets:
    """Sparse targets of one example: at ids positions `positions`, K ids and logprobs."""

    positions: np.ndarray  # int32 [P], indices into the example's ids (never 0)
    ids: np.ndarray  # int32 [P, K]
    logprobs: np.ndarray  # float32 [P, K]

    @property
    def k(self) -> int:
        return self.ids.shape[1]


def _student_id(alt, pieces: PieceBytes, first_stripped: bool) -> int | None:
    """The student id an alternative's bytes are (None: no single student token); at the first
    position of an answer whose first student token lost its dummy-prefix space, " "+bytes first."""
    j = pieces.ids.get(b" " + alt.bytes) if first_stripped else None
    if j is None:
        j = pieces.ids.get(alt.bytes)
    if j is None and alt.bytes == alt.text.encode("utf-8"):
        j = pieces.special(alt.text)
    return j


def align_answer(run: np.ndarray, teacher: TeacherLogprobs, pieces: PieceBytes
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """Targets for one trained span `run` (student ids: the answer, then its end-of-turn tokens).

    Returns (offsets into run that have targets, ids [P, K], logprobs [P, K], counts): counts has
    "exact" or "aligned" (positions with targets), "end_of_turn", the FALLBACKS reasons
    (positions) and, aligned, "alternatives_" + the ALTERNATIVES counts (alternatives)."""
    n, m, k = len(run), len(teacher.tokens), teacher.k
    stripped = False
    same = n >= m
    for i in range(m if same else 0):
        b, s = pieces.first(int(run[i])) if i == 0 else (pieces.bytes[int(run[i])], False)
        stripped = stripped or s
        if b != teacher.tokens[i].bytes:
            same = False
            break
    if not same:
        return align_by_bytes(run, teacher, pieces)
    offsets, ids, lps = [], [], []
    bad = 0
    for i, token in enumerate(teacher.tokens):
        row = [_student_id(alt, pieces, i == 0 and stripped) for alt in token.top]
        if None in row or len(set(row)) != len(row):
            bad += 1
            continue
        offsets.append(i)
        ids.append(row)
        lps.append([alt.logprob for alt in token.top])
    counts = {"exact": len(offsets), "end_of_turn": n - m}
    if bad:
        counts["alternative_not_a_student_token"] = bad
    return (*_arrays(offsets, ids, lps, k), counts)


def _arrays(offsets: list, ids: list, lps: list, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.asarray(offsets, np.int32).reshape(-1), np.asarray(ids, np.int32).reshape(-1, k),
            np.asarray(lps, np.float32).reshape(-1, k))


def align_by_bytes(run: np.ndarray, teacher: TeacherLogprobs, pieces: PieceBytes
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """`align_answer` for a student whose tokens of the answer are not the teacher's one for one
    (another tokenizer): targets where a student token's byte span is one teacher token's."""
    n, m, k = len(run), len(teacher.tokens), teacher.k
    answer = b"".join(t.bytes for t in teacher.tokens)
    # The student's answer tokens: the shortest prefix of run whose bytes spell the answer.
    spans, pos, stripped = [], 0, False
    for j in range(n):
        b, s = pieces.first(int(run[j])) if j == 0 else (pieces.bytes[int(run[j])], False)
        if b is None or answer[pos:pos + len(b)] != b:
            break
        stripped = stripped or s
        spans.append((pos, pos + len(b)))
        pos += len(b)
        if pos == len(answer):
            break
    if pos != len(answer) or not spans:
        return (*_arrays([], [], [], k), {"tokenization_mismatch": m})
    starts = teacher.offsets()
    by_span: dict[tuple[int, int], int | None] = {}
    for i in range(m):  # only a span that is one teacher token's (empty tokens may repeat one)
        span = (starts[i], starts[i + 1])
        by_span[span] = None if span in by_span else i
    offsets, ids, lps = [], [], []
    counts = dict.fromkeys(("aligned", "span_not_one_teacher_token", "no_alternative_a_student_token",
                            "alternatives_folded_into_tail", "alternatives_merged"), 0)
    for j, span in enumerate(spans):
        i = by_span.get(span)
        if i is None:
            counts["span_not_one_teacher_token"] += 1
            continue
        mapped: dict[int, list[float]] = {}  # student id -> the logprobs of its alternatives
        for alt in teacher.tokens[i].top:
            sid = _student_id(alt, pieces, j == 0 and stripped)
            if sid is None:
                counts["alternatives_folded_into_tail"] += 1
            else:
                mapped.setdefault(sid, []).append(alt.logprob)
        if not mapped:
            counts["no_alternative_a_student_token"] += 1
            continue
        counts["alternatives_merged"] += sum(len(v) - 1 for v in mapped.values())
        merged = sorted(((_logsumexp(v), sid) for sid, v in mapped.items()), key=lambda x: -x[0])
        offsets.append(j)
        ids.append([sid for _, sid in merged] + [-1] * (k - len(merged)))
        lps.append([lp for lp, _ in merged] + [NEG_INF] * (k - len(merged)))
    counts["aligned"] = len(offsets)
    counts["end_of_turn"] = n - len(spans)
    counts = {c: v for c, v in counts.items() if v or c in ("aligned", "end_of_turn")}
    return (*_arrays(offsets, ids, lps, k), counts)


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def trained_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of trained ids (position 0 is never a target)."""
    m = np.asarray(mask, np.bool_).copy()
    if len(m):
        m[0] = False
    edges = np.flatnonzero(np.diff(np.concatenate([[0], m.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def example_targets(ids: np.ndarray, mask: np.ndarray, answers: list[TeacherLogprobs | None],
                    truncated: bool, pieces: PieceBytes, counts) -> Targets | None:
    """Sparse targets of one example whose assistant turns, in order, have the teacher records
    `answers` (None: none). `counts` (a Counter) gets the answers' and positions' tallies."""
    if not any(a is not None for a in answers):
        return None
    runs = trained_runs(mask)
    positions, all_ids, all_lps = [], [], []
    for k, answer in enumerate(answers):
        if answer is None:
            continue
        counts["answers"] += 1
        reason = None
        if len(runs) != len(answers):
            reason = "unaligned"
        elif truncated and k == len(answers) - 1:
            reason = "truncated"
        if reason is not None:
            counts["answers_fallback_" + reason] += 1
            counts["positions_fallback_" + reason] += len(answer.tokens)
            continue
        start, end = runs[k]
        offsets, ids_k, lps_k, c = align_answer(np.asarray(ids[start:end]), answer, pieces)
        for name, v in c.items():
            if name.startswith("alternatives_"):
                counts[name] += v
            else:
                counts[("positions_" if name in ("exact", "aligned", "end_of_turn")
                        else "positions_fallback_") + name] += v
        fell_back = [r for r in FALLBACKS if c.get(r)]
        if c.get("exact") == len(answer.tokens):
            counts["answers_exact"] += 1
        elif c.get("aligned") and not fell_back:
            counts["answers_aligned"] += 1  # another tokenizer: every answer token got a target
        elif c.get("exact") or c.get("aligned"):
            counts["answers_partial"] += 1  # some positions fell back (counted by reason)
        else:
            counts["answers_fallback_" + fell_back[0]] += 1
        positions.append(offsets + start)
        all_ids.append(ids_k)
        all_lps.append(lps_k)
    if not positions:
        return None
    k_max = max(a.k for a in answers if a is not None)
    pad = lambda x, v: np.pad(x, ((0, 0), (0, k_max - x.shape[1])), constant_values=v)  # noqa: E731
    return Targets(np.concatenate(positions).astype(np.int32),
                   np.concatenate([pad(x, -1) for x in all_ids]).astype(np.int32),
                   np.concatenate([pad(x, NEG_INF) for x in all_lps]).astype(np.float32))
