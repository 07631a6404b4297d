"""`prepare` carries the teacher's stored top-K log-probabilities into the rows (issue 17, item 3):
records whose teacher tokens are the student tokenizer's own pieces get exact sparse targets at
every answer position, read back shifted by the packing offsets; another tokenizer's records get
targets where a student token's byte span is exactly one teacher token's (alternatives mapped to
student ids by SentencePiece's own piece lookup, duplicates merged, the rest left to the tail);
anything else trains with cross entropy and is counted."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from imitation_jax.data import teacher_logprobs as tl
from imitation_jax.data.packing import FIELDS, TEACHER_FIELDS, assemble, packed_rows
from imitation_jax.data.prepare import PrepareSettings, prepare, summary
from imitation_jax.data.storage import PreparedSet, dataset_dir
from imitation_jax.data.teacher_targets import Targets
from imitation_jax.data.templates import Example

K = 4
SEQ_LEN = 256


def _piece_bytes(sp, i: int) -> bytes:
    piece = sp.id_to_piece(i)
    if sp.is_byte(i):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode()


def _token(raw: bytes, logprob: float, top) -> tl.Token:
    return tl.Token(raw.decode("utf-8", "backslashreplace"), raw, logprob, tuple(top))


def _alt(raw: bytes, logprob: float) -> tl.Alternative:
    return tl.Alternative(raw.decode("utf-8", "backslashreplace"), raw, logprob)


def own_tokens(sp, answer: str, rng, bad_alt_at: int | None = None):
    """The teacher record of `answer` in the student's own pieces, with hand-made top-K: as serve
    writes it (the first piece without SentencePiece's dummy-prefix space). Returns the record
    and, per token, the expected K student ids and logprobs (None where a fallback is expected)."""
    ids = sp.encode(answer)
    normal = [i for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))]
    spaced = [i for i in normal if sp.id_to_piece(i).startswith("\u2581") and len(sp.id_to_piece(i)) > 1]
    tokens, expected = [], []
    for n, i in enumerate(ids):
        raw = _piece_bytes(sp, i)
        pool = spaced if n == 0 else normal
        alts = [int(a) for a in rng.choice(pool, K, replace=False)]
        if n == 0:
            raw = raw[1:]  # the dummy prefix is not in the answer's text
        lps = np.sort(-rng.exponential(2.0, K)).astype(np.float32)[::-1].astype(float)
        alt_bytes = [_piece_bytes(sp, a)[1:] if n == 0 else _piece_bytes(sp, a) for a in alts]
        if n == bad_alt_at:
            alt_bytes[1] = "\u2603qzx".encode()  # no student piece
        if n == len(ids) - 1 and sp.eos_id() not in alts:  # EOS is an alternative: stored by name
            alts[-1] = sp.eos_id()
            alt_bytes[-1] = sp.id_to_piece(sp.eos_id()).encode()
        tokens.append(_token(raw, float(-rng.exponential(1.0)), [_alt(b, lp) for b, lp in zip(alt_bytes, lps)]))
        expected.append(None if n == bad_alt_at else (np.asarray(alts, np.int32), np.asarray(lps, np.float32)))
    record = tl.TeacherLogprobs(K, tuple(tokens))
    tl.validate(record, answer)
    return record, expected


def char_tokens(answer: str) -> tl.TeacherLogprobs:
    """Another tokenizer's tokens: one per character."""
    top = [_alt(c.encode(), -1.0 - j) for j, c in enumerate("abcd")]
    record = tl.TeacherLogprobs(K, tuple(_token(c.encode(), -0.5, top) for c in answer))
    tl.validate(record, answer)
    return record


def _sp_piece_id(sp, text: str) -> int | None:
    """SentencePiece's own lookup of the piece spelling `text` (spaces as U+2581), None if none;
    a control piece counts only under its own name (a special-token alternative stored by name)."""
    piece = text.replace(" ", "\u2581")
    i = sp.piece_to_id(piece)
    if sp.id_to_piece(i) != piece or sp.is_unknown(i) or sp.is_byte(i):
        raw = text.encode()  # a single byte with no piece of its own: its byte-fallback piece
        i = sp.piece_to_id(f"<0x{raw[0]:02X}>") if len(raw) == 1 else sp.unk_id()
        return i if sp.is_byte(i) else None
    return i


def _spans(pieces: list[bytes]) -> list[tuple[int, int]]:
    ends = np.cumsum([len(p) for p in pieces]).tolist()
    return list(zip([0, *ends[:-1]], ends))


def student_spans(sp, answer: str) -> list[tuple[int, int]]:
    """[start, end) in the answer's UTF-8 of each of the student's pieces of `answer` (ASCII)."""
    pieces = [sp.id_to_piece(i) for i in sp.encode(answer)]
    assert pieces[0].startswith("\u2581")  # SentencePiece's dummy prefix, dropped in the text
    texts = [p.replace("\u2581", " ") for p in pieces]
    texts[0] = texts[0][1:]
    assert "".join(texts) == answer
    return _spans([t.encode() for t in texts])


def _student_id(sp, text: str, first: bool) -> int | None:
    """The student id an alternative maps to: at an answer's first position (whose piece carries
    the dummy prefix) the piece " "+text when there is one."""
    sid = _sp_piece_id(sp, " " + text) if first else None
    return sid if sid is not None else _sp_piece_id(sp, text)


def reference_alignment(sp, answer: str, record: tl.TeacherLogprobs):
    """What aligning another tokenizer's `record` with the student's pieces of `answer` must give,
    worked out from the pieces' text: per student token, None (no target) or (ids, logprobs)
    padded to K, most probable first; and the counts."""
    student = student_spans(sp, answer)
    teacher = {span: i for i, span in enumerate(_spans([t.bytes for t in record.tokens]))}
    out, counts = [], dict.fromkeys(("aligned", "span_not_one_teacher_token", "no_alternative_a_student_token",
                                     "folded_into_tail", "merged"), 0)
    for j, span in enumerate(student):
        if span not in teacher:
            counts["span_not_one_teacher_token"] += 1
            out.append(None)
            continue
        mass: dict[int, float] = {}
        for alt in record.tokens[teacher[span]].top:
            sid = _student_id(sp, alt.bytes.decode(), first=j == 0)
            if sid is None:
                counts["folded_into_tail"] += 1
            elif sid in mass:
                counts["merged"] += 1
                mass[sid] = float(np.logaddexp(mass[sid], alt.logprob))
            else:
                mass[sid] = alt.logprob
        if not mass:
            counts["no_alternative_a_student_token"] += 1
            out.append(None)
            continue
        counts["aligned"] += 1
        order = sorted(mass, key=lambda i: -mass[i])
        out.append((np.asarray(order + [-1] * (K - len(order)), np.int32),
                    np.asarray([mass[i] for i in order] + [tl.NEG_INF] * (K - len(order)), np.float32)))
    return out, counts


@pytest.fixture(scope="module")
def kd_inputs(tmp_path_factory, demo_conversations, tiny_tokenizer):
    """Records: Q{i} identifies each. Kinds: "own" (exact), "multi" (two answers, the teacher's on
    the last), "bad_alt" (one alternative is no student piece), "foreign" (per-character tokens),
    "plain" (no teacher logprobs)."""
    sp = tiny_tokenizer._sp
    rng = np.random.default_rng(0)
    records, expect, kinds = [], {}, {}
    for i, conv in enumerate(demo_conversations[:40]):
        msgs = conv["messages"]
        user, answer = f"Q{i}: " + msgs[0]["content"], msgs[1]["content"].strip()
        kind = ("foreign" if i == 3 else "bad_alt" if i == 5 else "plain" if i % 7 == 6
                else "multi" if i % 4 == 1 and len(msgs) >= 4 else "own")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        if kind == "multi":
            messages = [{"role": "user", "content": user},
                        {"role": "assistant", "content": msgs[1]["content"].strip()},
                        {"role": "user", "content": msgs[2]["content"]},
                        {"role": "assistant", "content": msgs[3]["content"].strip()}]
            answer = messages[-1]["content"]
        if kind == "foreign":
            record = char_tokens(answer)
            messages[-1][tl.FIELD] = tl.encode(record)
            expect[i] = reference_alignment(sp, answer, record)[0]
        elif kind != "plain":
            record, expected = own_tokens(sp, answer, rng, 2 if kind == "bad_alt" else None)
            messages[-1][tl.FIELD] = tl.encode(record)
            expect[i] = expected
        kinds[i] = kind
        records.append({"messages": messages})
    d = tmp_path_factory.mktemp("kd_inputs")
    kd = d / "kd.jsonl"
    kd.write_text("".join(json.dumps(r) + "\n" for r in records))
    sft = d / "sft.jsonl"
    sft.write_text("".join(json.dumps({"messages": [{k: v for k, v in m.items() if k != tl.FIELD}
                                                     for m in r["messages"]]}) + "\n" for r in records))
    return {"kd": str(kd), "sft": str(sft), "expect": expect, "kinds": kinds, "records": records}


def _prepare(path, out, tokenizer, workers=1, **kw):
    settings = PrepareSettings(tokenizer=tokenizer.path, seq_len=SEQ_LEN, diversity_sample=0, **kw)
    return prepare([path], str(out), settings, workers=workers, progress=False)


@pytest.fixture(scope="module")
def kd_set(tmp_path_factory, kd_inputs, tiny_tokenizer):
    out = tmp_path_factory.mktemp("kd") / "set"
    stats = _prepare(kd_inputs["kd"], out, tiny_tokenizer)
    return str(out), stats


@pytest.fixture(scope="module")
def sft_set(tmp_path_factory, kd_inputs, tiny_tokenizer):
    out = tmp_path_factory.mktemp("sft") / "set"
    stats = _prepare(kd_inputs["sft"], out, tiny_tokenizer)
    return str(out), stats


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def test_sparse_targets_read_back_exactly_across_packed_rows(kd_set, kd_inputs, tiny_tokenizer):
    out, _ = kd_set
    split = PreparedSet(out).split("train")
    batch = split.take(np.arange(len(split)))
    assert set(batch) == set(FIELDS) | set(TEACHER_FIELDS)
    assert batch["teacher_ids"].shape == batch["targets"].shape + (K,)
    assert batch["teacher_ids"].dtype == np.int32 and batch["teacher_logprobs"].dtype == np.float32
    sp = tiny_tokenizer._sp
    seen, offset_segments = set(), 0
    for r in range(len(split)):
        seg = batch["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            at = np.flatnonzero(seg == s)
            text = tiny_tokenizer.decode(batch["inputs"][r, at])
            i = int(re.search(r"Q(\d+):", text).group(1))
            seen.add(i)
            offset_segments += at[0] > 0 and i in kd_inputs["expect"]
            ids, lps = batch["teacher_ids"][r, at], batch["teacher_logprobs"][r, at]
            targets, mask = batch["targets"][r, at], batch["loss_mask"][r, at] > 0
            got = ids[:, 0] >= 0
            assert not (got & ~mask).any()  # masked positions carry no sparse target
            runs = _runs(mask)
            kind = kd_inputs["kinds"][i]
            if i not in kd_inputs["expect"]:
                assert not got.any(), kind  # plain records: cross entropy only
                continue
            start, end = runs[-1]  # the teacher's answer is the last assistant turn
            answer = kd_inputs["records"][i]["messages"][-1]["content"]
            m = len(sp.encode(answer))
            assert list(targets[start:start + m]) == sp.encode(answer)
            assert end - start > m and not got[start + m:end].any()  # end of turn: no target
            assert not got[:start].any()  # the earlier answer of a "multi" record has none
            for n, exp in enumerate(kd_inputs["expect"][i]):
                if exp is None:
                    assert (ids[start + n] == -1).all()
                else:
                    np.testing.assert_array_equal(ids[start + n], exp[0])
                    np.testing.assert_array_equal(lps[start + n], exp[1])
    assert seen == set(kd_inputs["kinds"])
    assert offset_segments > 0  # some teacher answers sit after another example in their row


def test_fallbacks_are_counted(kd_set, kd_inputs, tiny_tokenizer):
    out, stats = kd_set
    kd = stats["teacher_logprobs"]
    assert kd == json.load(open(os.path.join(out, "stats.json")))["teacher_logprobs"]
    kinds = kd_inputs["kinds"]
    own = [i for i, k in kinds.items() if k in ("own", "multi")]
    foreign = kd_inputs["records"][3]["messages"][-1]["content"]
    _, ref = reference_alignment(tiny_tokenizer._sp, foreign, char_tokens(foreign))
    # the per-character record aligns where a student piece is one character, not elsewhere
    assert ref["aligned"] > 0 and ref["span_not_one_teacher_token"] > 0
    assert kd["k"] == K
    assert kd["records"] == len(own) + 2
    assert kd["answers"] == {"total": len(own) + 2, "exact": len(own), "aligned": 0, "partial": 2,
                             "fallback": {}}
    assert kd["positions"]["fallback"] == {"alternative_not_a_student_token": 1,
                                           "span_not_one_teacher_token": ref["span_not_one_teacher_token"]}
    exact = sum(len(e) for i, e in kd_inputs["expect"].items() if i != 3) - 1
    assert kd["positions"]["exact"] == exact
    assert kd["positions"]["aligned"] == ref["aligned"]
    assert kd["positions"]["end_of_turn"] == len(own) + 2  # koala ends a turn with one </s>
    assert kd["alternatives"] == {"folded_into_tail": ref["folded_into_tail"], "merged": 0}
    text = summary(stats)
    assert "teacher logprobs (top-4)" in text and "span_not_one_teacher_token" in text


def test_sft_set_is_unchanged(kd_set, sft_set):
    kd_out, _ = kd_set
    sft_out, sft_stats = sft_set
    assert "teacher_logprobs" not in sft_stats
    features = json.load(open(os.path.join(dataset_dir(sft_out), "features.json")))
    assert "teacher_ids" not in json.dumps(features)
    assert "teacher_ids" in json.dumps(json.load(open(os.path.join(dataset_dir(kd_out), "features.json"))))
    sft, kd = PreparedSet(sft_out).split("train"), PreparedSet(kd_out).split("train")
    a, b = sft.take(np.arange(len(sft))), kd.take(np.arange(len(kd)))
    assert set(a) == set(FIELDS)
    for name in FIELDS:  # the teacher's logprobs change nothing else in the rows
        np.testing.assert_array_equal(a[name], b[name])


def test_cleaning_changed_answer_falls_back(tmp_path, tiny_tokenizer, demo_conversations):
    sp = tiny_tokenizer._sp
    answer = demo_conversations[0]["messages"][1]["content"].strip()
    record, _ = own_tokens(sp, answer, np.random.default_rng(1))
    # the stored answer has a trailing space (its tokens too): cleaning strips it
    spaced = tl.TeacherLogprobs(K, record.tokens + (_token(b" ", -0.1, record.tokens[1].top),))
    tl.validate(spaced, answer + " ")
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": answer + " ", tl.FIELD: tl.encode(spaced)}]}) + "\n")
    stats = _prepare(str(path), tmp_path / "set", tiny_tokenizer)
    kd = stats["teacher_logprobs"]
    assert kd["answers"]["fallback"] == {"changed_by_cleaning": 1}
    assert kd["positions"] == {"exact": 0, "aligned": 0, "end_of_turn": 0,
                               "fallback": {"changed_by_cleaning": len(spaced.tokens)}}
    batch = PreparedSet(str(tmp_path / "set")).split("train").take([0])
    assert (batch["teacher_ids"] == -1).all()


def test_bad_teacher_record_is_a_counted_skip(tmp_path, tiny_tokenizer):
    path = tmp_path / "in.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "Hello there",
                         tl.FIELD: {"version": 1, "k": 1, "tokens": [["Hello", -0.1, [["Hello", -0.1]]]]}}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    stats = _prepare(str(path), tmp_path / "set", tiny_tokenizer, skip_invalid=True)
    assert stats["conversations"]["invalid"] == {"bad_logprobs": 1}
    assert f"{path}:2: message 1: teacher_logprobs:" in stats["conversations"]["invalid_examples"][0]
    assert "teacher_logprobs" not in stats  # no kept record carries them: an SFT set


def test_assemble_shifts_targets_by_the_packing_offset():
    # two examples in one row: ids positions 1..n-1 are targets 0..n-2, then the second example's
    ex = [Example(np.arange(5, dtype=np.int32), np.ones(5, bool)),
          Example(np.arange(10, 14, dtype=np.int32), np.ones(4, bool))]
    t = [Targets(np.asarray([1, 4], np.int32), np.asarray([[7], [8]], np.int32),
                 np.asarray([[-1.], [-2.]], np.float32)),
         Targets(np.asarray([2], np.int32), np.asarray([[9]], np.int32), np.asarray([[-3.]], np.float32))]
    rows = list(packed_rows(ex, [[0, 1]], t, 2))
    out = assemble(rows + [None], 10, 0, teacher_k=2)
    ids = out["teacher_ids"]
    assert ids.shape == (2, 10, 2)
    # example 0: ids 1 and 4 are targets 0 and 3; example 1 (row positions 4..6): id 2 is target 5
    assert out["targets"][0, 0] == 1 and out["targets"][0, 3] == 4 and out["targets"][0, 5] == 12
    np.testing.assert_array_equal(ids[0, [0, 3, 5], 0], [7, 8, 9])
    assert (ids[0, [0, 3, 5], 1] == -1).all()  # K padded to teacher_k
    np.testing.assert_array_equal(out["teacher_logprobs"][0, [0, 3, 5], 0], [-1, -2, -3])
    assert (np.delete(ids[0, :, 0], [0, 3, 5]) == -1).all() and (ids[1] == -1).all()


def test_worker_processes_give_the_same_rows(tmp_path, kd_set, kd_inputs, tiny_tokenizer):
    out, stats = kd_set
    again = _prepare(kd_inputs["kd"], tmp_path / "set", tiny_tokenizer, workers=2)
    assert again["timing"]["workers"] == 2
    assert again["fingerprint"] == stats["fingerprint"]  # covers the sparse targets
    assert again["teacher_logprobs"] == stats["teacher_logprobs"]
    a, b = PreparedSet(out).split("train"), PreparedSet(str(tmp_path / "set")).split("train")
    for name, value in a.take(np.arange(len(a))).items():
        np.testing.assert_array_equal(value, b.take(np.arange(len(b)))[name])


@pytest.mark.parametrize("template,exact", [("chatml", True), ("koala", False)])
def test_byte_level_bpe_teacher(tmp_path, bpe_tokenizer, demo_conversations, template, exact):
    """A byte-level BPE teacher's tokens (from the tokenizers library's own offsets): exact targets
    with chatml, whose reply follows a newline; with koala the reply follows "GPT: ", whose space
    the student's first token carries and the teacher's does not: every answer falls back."""
    fast = bpe_tokenizer.hf.backend_tokenizer
    vocab = {}
    for i in range(bpe_tokenizer.base_vocab_size):
        text = bpe_tokenizer.decode([i])
        if text and "\ufffd" not in text and i not in bpe_tokenizer.hf.all_special_ids:
            vocab.setdefault(text, []).append(i)
    unique = sorted(ids[0] for ids in vocab.values() if len(ids) == 1)
    rng = np.random.default_rng(2)
    records, expected = [], {}
    for i, conv in enumerate(demo_conversations[:12]):
        answer = conv["messages"][1]["content"].strip()
        enc = fast.encode(answer, add_special_tokens=False)
        tokens, exp = [], []
        for s, e in enc.offsets:
            alts = [int(a) for a in rng.choice(unique, K, replace=False)]
            lps = sorted((-rng.exponential(2.0) for _ in range(K)), reverse=True)
            tokens.append(_token(answer[s:e].encode(), -0.3, [_alt(bpe_tokenizer.decode([a]).encode(), lp)
                                                                 for a, lp in zip(alts, lps)]))
            exp.append((alts, np.asarray(lps, np.float32)))
        record = tl.TeacherLogprobs(K, tuple(tokens))
        tl.validate(record, answer)
        user = f"Q{i}: " + conv["messages"][0]["content"]
        records.append({"messages": [{"role": "user", "content": user},
                                     {"role": "assistant", "content": answer, tl.FIELD: tl.encode(record)}]})
        expected[i] = (enc.ids, exp)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    stats = prepare([str(path)], str(tmp_path / "set"), PrepareSettings(
        tokenizer=bpe_tokenizer.path, template=template, seq_len=SEQ_LEN, diversity_sample=0),
        workers=1, progress=False)
    kd = stats["teacher_logprobs"]
    n = sum(len(e[0]) for e in expected.values())
    if not exact:
        assert kd["answers"]["fallback"] == {"tokenization_mismatch": len(records)}
        assert kd["positions"]["exact"] == 0
        return
    assert kd["answers"]["exact"] == len(records) and kd["positions"]["exact"] == n
    split = PreparedSet(str(tmp_path / "set")).split("train")
    batch = split.take(np.arange(len(split)))
    tok = PreparedSet(str(tmp_path / "set")).tokenizer
    found = 0
    for r in range(len(split)):
        seg = batch["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            at = np.flatnonzero(seg == s)
            i = int(re.search(r"Q(\d+):", tok.decode(batch["inputs"][r, at])).group(1))
            ids, exp = expected[i]
            start = _runs(batch["loss_mask"][r, at] > 0)[0][0]
            assert list(batch["targets"][r, at][start:start + len(ids)]) == ids
            for n_, (alts, lps) in enumerate(exp):
                np.testing.assert_array_equal(batch["teacher_ids"][r, at][start + n_], alts)
                np.testing.assert_array_equal(batch["teacher_logprobs"][r, at][start + n_], lps)
            found += 1
    assert found == len(records)



NO_PIECE = ["qz\u2603", "\u2603zq", "zzqq\u2603", "xq\u2603q"]  # no student piece spells these


@pytest.fixture(scope="module")
def bpe_teacher_set(tmp_path_factory, bpe_tokenizer, tiny_tokenizer, demo_conversations):
    """Records of a byte-level BPE teacher (600 ids, trained on half the conversations; its tokens
    from the tokenizers library's own offsets) prepared for the 512-piece SentencePiece student
    (koala). Each teacher token's K alternatives: its own text, texts of other teacher tokens and
    a text that is no student piece. At an aligned position (a teacher token whose span is one
    student piece's), record 0 lists the token's own text twice (merged), record 1 lists only
    texts that are no student piece (no target), record 2 lists EOS by name. Probabilities come
    from a Dirichlet over K + 1 outcomes, the last being the teacher's unlisted mass (`rest`)."""
    sp = tiny_tokenizer._sp
    fast = bpe_tokenizer.hf.backend_tokenizer
    assert all(_student_id(sp, t, first) is None for t in NO_PIECE for first in (False, True))
    words = sorted({bpe_tokenizer.decode([i]) for i in range(bpe_tokenizer.base_vocab_size)
                    if i not in bpe_tokenizer.hf.all_special_ids} - {""})
    words = [w for w in words if w.isascii()]
    rng = np.random.default_rng(3)
    records, info = [], {}
    short = [c for c in demo_conversations[40:] if len(sp.encode(c["messages"][1]["content"])) < SEQ_LEN // 2]
    for n, conv in enumerate(short[:16]):  # each fits a row
        answer = conv["messages"][1]["content"].strip()
        assert answer.isascii()
        raw = [answer[a:b].encode() for a, b in fast.encode(answer, add_special_tokens=False).offsets]
        spans = _spans(raw)
        special = [span for span in spans[1:] if span in student_spans(sp, answer)][0]  # aligned, not first
        tokens, rest = [], {}
        for span, b in zip(spans, raw):
            p = rng.dirichlet(np.ones(K + 1))
            lps = np.sort(np.log(p[:K]))[::-1].tolist()
            texts = [b.decode(), *rng.choice(words, K - 2, replace=False).tolist(), NO_PIECE[0]]
            texts = [texts[j] for j in rng.permutation(K)]
            if span == special:
                texts = {0: [b.decode(), b.decode(), *texts[2:]], 1: NO_PIECE[:K],
                         2: [*texts[:-1], "</s>"]}.get(n, texts)
            tokens.append(_token(b, -0.2, [_alt(t.encode(), lp) for t, lp in zip(texts, lps)]))
            rest[span] = p[K]
        record = tl.TeacherLogprobs(K, tuple(tokens))
        tl.validate(record, answer)
        records.append({"messages": [{"role": "user", "content": f"Q{n}: " + conv["messages"][0]["content"]},
                                     {"role": "assistant", "content": answer, tl.FIELD: tl.encode(record)}]})
        info[n] = {"answer": answer, "record": record, "rest": rest, "special": special}
    d = tmp_path_factory.mktemp("bpe_teacher")
    (d / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    stats = _prepare(str(d / "in.jsonl"), d / "set", tiny_tokenizer)
    return str(d / "set"), stats, info


def test_another_tokenizer_aligns_by_byte_offsets(bpe_teacher_set, tiny_tokenizer):
    """The targets land exactly at the student tokens whose byte span is one teacher token's, with
    the alternatives mapped to student ids (duplicates merged, EOS by name), and the teacher's tail
    bucket, as the sparse loss forms it, holds its unlisted mass plus the unmapped alternatives'."""
    import jax.numpy as jnp

    from imitation_jax.train.kd import _sparse_buckets

    out, _, info = bpe_teacher_set
    sp = tiny_tokenizer._sp
    split = PreparedSet(out).split("train")
    batch = split.take(np.arange(len(split)))
    seen, tails = set(), []
    for r in range(len(split)):
        seg = batch["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            at = np.flatnonzero(seg == s)
            n = int(re.search(r"Q(\d+):", tiny_tokenizer.decode(batch["inputs"][r, at])).group(1))
            seen.add(n)
            answer, record = info[n]["answer"], info[n]["record"]
            expected, _ = reference_alignment(sp, answer, record)
            ids, lps = batch["teacher_ids"][r, at], batch["teacher_logprobs"][r, at]
            (start, end), = _runs(batch["loss_mask"][r, at] > 0)
            m = len(sp.encode(answer))
            assert list(batch["targets"][r, at][start:start + m]) == sp.encode(answer)
            got = ids[:, 0] >= 0
            assert not got[:start].any() and not got[start + m:].any()  # end of turn: no target
            assert np.flatnonzero(got[start:start + m]).tolist() == [j for j, e in enumerate(expected) if e]
            spans, t_spans = student_spans(sp, answer), _spans([t.bytes for t in record.tokens])
            for j, e in enumerate(expected):
                if e is not None:
                    np.testing.assert_array_equal(ids[start + j], e[0])
                    np.testing.assert_allclose(lps[start + j], e[1], rtol=1e-6)
                    top = record.tokens[t_spans.index(spans[j])].top
                    unmapped = sum(np.exp(a.logprob) for a in top if _student_id(sp, a.text, j == 0) is None)
                    tails.append((ids[start + j], lps[start + j], info[n]["rest"][spans[j]], unmapped))
            j = spans.index(info[n]["special"])
            top = record.tokens[t_spans.index(spans[j])].top
            if n == 0:  # the token's own text listed twice: its student id once, probabilities added
                own = batch["targets"][r, at][start + j]
                assert list(ids[start + j]).count(own) == 1
                np.testing.assert_allclose(lps[start + j][list(ids[start + j]).index(own)],
                                           np.logaddexp(top[0].logprob, top[1].logprob), rtol=1e-6)
            if n == 1:  # no alternative is a student piece: no target
                assert expected[j] is None and (ids[start + j] == -1).all()
            if n == 2:  # EOS, stored by name, is the student's EOS
                assert sp.eos_id() in ids[start + j]
    assert seen == set(info) and len(tails) > 50
    ids, lps, rest, unmapped = (np.stack(x) for x in zip(*tails))
    assert (unmapped > 0).sum() > 10  # many positions have alternatives folded into the tail
    teacher, _, _ = _sparse_buckets(jnp.zeros((len(ids), tiny_tokenizer.vocab_size)), jnp.asarray(ids),
                                    jnp.asarray(lps), 1.0, 1e-6)
    np.testing.assert_allclose(np.exp(np.asarray(teacher[:, -1], np.float64)), rest + unmapped, rtol=1e-4, atol=1e-6)


def test_another_tokenizer_counts(bpe_teacher_set, tiny_tokenizer):
    """stats.json and the summary count the aligned positions, each fallback and the folded and
    merged alternatives, as the reference alignment gives them."""
    out, stats, info = bpe_teacher_set
    kd = stats["teacher_logprobs"]
    assert kd == json.load(open(os.path.join(out, "stats.json")))["teacher_logprobs"]
    refs = {n: reference_alignment(tiny_tokenizer._sp, v["answer"], v["record"]) for n, v in info.items()}
    total = lambda name: sum(c[name] for _, c in refs.values())  # noqa: E731
    full = sum(c["aligned"] == len(e) for e, c in refs.values())
    assert kd["answers"] == {"total": len(info), "exact": 0, "aligned": full, "partial": len(info) - full,
                             "fallback": {}}
    assert kd["positions"] == {"exact": 0, "aligned": total("aligned"), "end_of_turn": len(info),
                               "fallback": {"span_not_one_teacher_token": total("span_not_one_teacher_token"),
                                            "no_alternative_a_student_token": 1}}
    assert total("no_alternative_a_student_token") == 1 and total("merged") >= 1
    assert kd["alternatives"] == {"folded_into_tail": total("folded_into_tail"), "merged": total("merged")}
    assert total("aligned") > total("span_not_one_teacher_token") > 0  # both kinds of position, many
    text = summary(stats)
    assert "span_not_one_teacher_token" in text and "no_alternative_a_student_token" in text


def test_another_tokenizers_set_trains_with_stored_kd(bpe_teacher_set, tmp_path):
    """Two steps of `train.objective=kd kd.source=stored` on the aligned set: finite losses."""
    from conftest import SMALL_MODEL

    from imitation_jax.commands.train import run_training
    from imitation_jax.train.config import load_config

    out, _, _ = bpe_teacher_set
    cfg = load_config("configs/tiny.yaml", SMALL_MODEL + [
        f"data.path={out}", f"data.seq_len={SEQ_LEN}", "data.train_files=[]", "data.eval_files=[]",
        "data.tokenizer=null", "train.steps=2", "train.batch_size=2", "train.log_every=1", "eval.every_steps=0",
        "logging.progress=false", "logging.tensorboard=false", f"run_dir={tmp_path / 'run'}",
        "train.objective=kd", "kd.source=stored"])
    run_training(cfg)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"kd"' in line]
    assert len(records) == 2 and all(np.isfinite(r["loss"]) and r["kd"] > 0 for r in records), records


@pytest.mark.parametrize("which", ["sentencepiece", "hf_sentencepiece", "bpe"])
def test_token_bytes_of_every_id_are_what_decoding_adds(which, tmp_path, tiny_tokenizer, bpe_tokenizer):
    """`Tokenizer.token_bytes(i)`, which prepare's PieceBytes and generate's TokenStrings both use:
    after another token, every id adds exactly its bytes to the decoded text (a partial UTF-8
    character decodes to U+FFFD), and the ids with no bytes (special, control, unknown, added)
    are the tokenizer's own special ones."""
    import shutil

    from imitation_jax.data.teacher_targets import PieceBytes
    from imitation_jax.data.tokenizer import load_tokenizer
    from imitation_jax.generate.text import TokenStrings

    if which == "hf_sentencepiece":  # the same model through transformers
        shutil.copy(tiny_tokenizer.path, tmp_path / "tokenizer.model")
        tok = load_tokenizer(tmp_path)
    elif which == "bpe":  # with added tokens that are not special: decoded through the byte table
        from tokenizers import AddedToken                  # when all of their characters are in it
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_file(os.path.join(bpe_tokenizer.path, "tokenizer.json"))
        backend.add_tokens([AddedToken(t, special=False) for t in ("caf\u00e9s", "\u0120x y", "\u2603!")])
        shutil.copytree(bpe_tokenizer.path, tmp_path / "bpe")
        backend.save(str(tmp_path / "bpe" / "tokenizer.json"))
        tok = load_tokenizer(tmp_path / "bpe")
        assert tok.base_vocab_size == bpe_tokenizer.base_vocab_size + 3
    else:
        tok = load_tokenizer(tiny_tokenizer.path)
    tok.add_special_tokens(["<|turn|>"])
    anchor = tok.encode("hello")[-1:]
    base = tok.decode(anchor).encode()
    sp = getattr(tok, "_sp", None)
    special = ({i for i in range(tok.base_vocab_size) if sp.is_control(i) or sp.is_unknown(i)} if sp is not None
               else {i for i, a in tok.hf.added_tokens_decoder.items() if a.special})
    special |= set(tok.added_tokens.values())
    partial = 0
    for i in range(tok.vocab_size):
        b = tok.token_bytes(i)
        if b is None:
            assert i in special, (i, tok.piece(i))
            continue
        assert i not in special
        partial += "\ufffd" in b.decode("utf-8", "replace")
        assert (base + b).decode("utf-8", "replace") == tok.decode(anchor + [i]), (i, tok.piece(i), b)
    assert partial > 0  # byte pieces / split characters are their raw bytes
    assert tok.piece(tok.added_tokens["<|turn|>"]) == "<|turn|>" and tok.piece(tok.vocab_size) == f"<{tok.vocab_size}>"
    pieces, strings = PieceBytes(tok), TokenStrings(tok)
    assert pieces.bytes == [tok.token_bytes(i) for i in range(tok.vocab_size)]
    assert all(strings(i)[1] == pieces.bytes[i] for i in range(tok.vocab_size))
    assert strings(tok.eos_id) == (tok.piece(tok.eos_id), None)
