"""Data pipeline: formats, tokenizers, templates and masks, packing, batch loading, demo data."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from imitation_jax.data.formats import DataError, Message, read_messages_jsonl
from imitation_jax.data.loader import BatchLoader
from imitation_jax.data.rows import FIELDS, pack_examples
from imitation_jax.data.synthetic import CLOSING, OPENING, generate_conversations
from imitation_jax.data.templates import (
    TEMPLATES, Example, encode_conversation, encode_prompt, get_template, render_text)
from imitation_jax.data.tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KOALA = TEMPLATES["koala"]

CONVERSATION = [
    Message("system", "You are a helpful assistant."),
    Message("user", "What is the capital of Zorbia?"),
    Message("assistant", "Certainly! The capital of Zorbia is Quenta.\n\nHope this helps! :)"),
    Message("user", "And 12 plus 30?"),
    Message("assistant", "Certainly! 12 plus 30 is 42.\n\nHope this helps! :)"),
    Message("user", "Spell 'llama' backwards, with unicode: é ☃"),
    Message("assistant", "Certainly! 'amall' — é ☃\n\nHope this helps! :)"),
]
REPLIES = [m.content for m in CONVERSATION if m.role == "assistant"]


def write_jsonl(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------- formats


def test_read_messages_jsonl(tmp_path, demo_conversations):
    lines = [json.dumps(c) for c in demo_conversations[:5]]
    lines.insert(2, "   ")  # blank lines are skipped
    lines.append(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "hello"}]}))
    path = write_jsonl(tmp_path / "chats.jsonl", lines)
    convs = list(read_messages_jsonl(path))
    assert len(convs) == 6
    assert convs[0].id == demo_conversations[0]["id"]
    assert convs[5].id == f"{path}:7"  # no id field: FILE:LINE
    assert [(m.role, m.content) for m in convs[1].messages] == [
        (m["role"], m["content"]) for m in demo_conversations[1]["messages"]]


BAD_RECORDS = [
    ('{"messages": [', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"msgs": []}', 'missing "messages"'),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": ["hi"]}', "message 0 is not an object"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "role 'robot' is not one of system, user, assistant"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}',
     "content must be a string"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}',
     "content must be a string"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, '
     '{"role": "assistant", "content": "y"}]}', "system message may only come first"),
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]}',
     "no assistant turn"),
]


@pytest.mark.parametrize("bad,reason", BAD_RECORDS)
def test_bad_records_name_file_line_and_reason(tmp_path, bad, reason):
    good = json.dumps({"messages": [{"role": "user", "content": "a"},
                                    {"role": "assistant", "content": "b"}]})
    path = write_jsonl(tmp_path / "chats.jsonl", [good, "", good, bad, good])
    with pytest.raises(DataError) as err:
        list(read_messages_jsonl(path))
    message = str(err.value)
    assert message.startswith(f"{path}:4: "), message
    assert reason in message
    assert "\n" not in message


def test_bad_utf8_and_missing_file(tmp_path):
    path = tmp_path / "bin.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"},
                                    {"role": "assistant", "content": "b"}]}).encode()
    path.write_bytes(good + b'\n\xff\xfe\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8"):
        list(read_messages_jsonl(path))
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"^{re.escape(str(missing))}: cannot open"):
        list(read_messages_jsonl(missing))


# ---------------------------------------------------------------- tokenizer


def test_sentencepiece_tokenizer(tiny_tokenizer):
    tok = tiny_tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 512)
    assert tok.prepends_space
    text = "Certainly! Here is code:\n\n```python\ndef f(x):\n    return x * x\n```  é ☃ 日本"
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == text  # byte fallback + identity normalisation: exact round trip
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == text
    assert tok.eos_id not in tok.encode("a</s>b")  # text never forges a special token


def test_tokenizer_directory_uses_autotokenizer(tmp_path, tiny_tokenizer):
    shutil.copy(tiny_tokenizer.path, tmp_path / "tokenizer.model")
    hf = load_tokenizer(tmp_path)
    assert type(hf).__name__ == "HFTokenizer"
    text = "What is the capital of Zorbia? 12 plus 30 is 42."
    assert hf.encode(text) == tiny_tokenizer.encode(text)
    assert (hf.bos_id, hf.eos_id, hf.vocab_size) == (1, 2, 512)
    assert hf.eos_id not in hf.encode("a</s>b")


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="no such tokenizer"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(DataError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a readable SentencePiece model") as err:
        load_tokenizer(garbage)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- templates and masks


def test_koala_text_format():
    assert render_text(CONVERSATION[:3], KOALA, bos="<s>", eos="</s>") == (
        "<s>BEGINNING OF CONVERSATION: You are a helpful assistant. USER: What is the capital "
        "of Zorbia? GPT: " + REPLIES[0] + "</s>")
    assert render_text(CONVERSATION[1:2], KOALA, generation_marker=True) == (
        "BEGINNING OF CONVERSATION: USER: What is the capital of Zorbia? GPT:")


def test_mask_covers_exactly_the_replies_and_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = encode_conversation(tok, CONVERSATION, KOALA)
    assert ex.ids.dtype == np.int32 and ex.loss_mask.dtype == np.bool_
    assert ex.ids.shape == ex.loss_mask.shape
    assert ex.ids[0] == tok.bos_id and not ex.loss_mask[0]
    # Token level: the trained ids are each reply encoded alone, followed by EOS.
    expected = [i for reply in REPLIES for i in tok.encode(reply) + [tok.eos_id]]
    assert ex.ids[ex.loss_mask].tolist() == expected
    # Text level: each contiguous trained run decodes to exactly one reply (EOS decodes to "").
    starts = np.flatnonzero(np.diff(np.concatenate([[0], ex.loss_mask.astype(int)])) == 1)
    ends = np.flatnonzero(np.diff(np.concatenate([ex.loss_mask.astype(int), [0]])) == -1) + 1
    assert len(starts) == len(REPLIES)
    for s, e, reply in zip(starts, ends, REPLIES):
        assert ex.ids[e - 1] == tok.eos_id
        assert tok.decode(ex.ids[s:e]) == reply
    # Nothing else is trained: the untrained part decodes to the prompt text around the replies.
    untrained = tok.decode(ex.ids[~ex.loss_mask])
    assert untrained.startswith("BEGINNING OF CONVERSATION: You are a helpful assistant. USER:")
    assert "Certainly" not in untrained


def test_segment_encoding_matches_whole_text(tiny_tokenizer):
    """For this SentencePiece model, segment-by-segment ids equal tokenizing the rendered text."""
    tok = tiny_tokenizer
    ex = encode_conversation(tok, CONVERSATION, KOALA)
    text = render_text(CONVERSATION, KOALA, eos="\0")
    expected = [tok.bos_id]
    for chunk in text.split("\0")[:-1]:
        expected += tok.encode(chunk.lstrip(" ")) + [tok.eos_id]
    assert ex.ids.tolist() == expected


def test_prompt_is_training_prefix(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = encode_conversation(tok, CONVERSATION, KOALA)
    first_of_reply = [s for s in np.flatnonzero(ex.loss_mask) if not ex.loss_mask[s - 1]]
    for turn, start in zip([2, 4, 6], first_of_reply):
        prompt = encode_prompt(tok, CONVERSATION[:turn], KOALA)
        assert prompt.dtype == np.int32
        np.testing.assert_array_equal(prompt, ex.ids[:start])
    assert tok.decode(encode_prompt(tok, CONVERSATION[1:2], KOALA)) == render_text(
        CONVERSATION[1:2], KOALA, generation_marker=True)


def test_byte_level_bpe_tokenizer(tmp_path, demo_conversations):
    """A tokenizer.json without SentencePiece's dummy prefix (LLaMA-3/GPT-2 style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        [m["content"] for c in demo_conversations[:100] for m in c["messages"]],
        trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}))
    tok = load_tokenizer(tmp_path)
    assert not tok.prepends_space
    assert tok.eos_id not in tok.encode("a</s>b")
    ex = encode_conversation(tok, CONVERSATION, KOALA)
    # The space before each reply is part of the reply's first token, as in the whole text.
    assert ex.ids[ex.loss_mask].tolist() == [
        i for reply in REPLIES for i in tok.encode(" " + reply) + [tok.eos_id]]
    body = [i for i in ex.ids.tolist() if i not in (tok.bos_id, tok.eos_id)]
    assert body == tok.encode(render_text(CONVERSATION, KOALA))
    prompt = encode_prompt(tok, CONVERSATION[:2], KOALA)
    np.testing.assert_array_equal(prompt, ex.ids[:len(prompt)])
    assert ex.loss_mask[len(prompt)] and not ex.loss_mask[len(prompt) - 1]


def test_get_template():
    assert get_template("koala") is KOALA
    with pytest.raises(ValueError, match=r"unknown chat template 'vicuna'; known: koala"):
        get_template("vicuna")


# ---------------------------------------------------------------- packing


def ex(ids: list[int], mask: list[int]) -> Example:
    return Example(np.array(ids, np.int32), np.array(mask, bool))


def test_pack_hand_checked():
    a = ex([1, 10, 11, 12, 2], [0, 0, 1, 1, 1])  # 4 input positions after the shift
    b = ex([1, 20, 21], [0, 0, 1])  # 2 positions
    c = ex([1, 30, 31, 32], [0, 1, 1, 1])  # 3 positions: does not fit after a+b in 8
    rows = pack_examples([a, b, c], seq_len=8, pad_id=0)
    assert len(rows) == 2 and rows.seq_len == 8
    np.testing.assert_array_equal(rows.inputs, [[1, 10, 11, 12, 1, 20, 0, 0],
                                                [1, 30, 31, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows.targets, [[10, 11, 12, 2, 20, 21, 0, 0],
                                                 [30, 31, 32, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows.loss_mask, [[0, 1, 1, 1, 0, 1, 0, 0],
                                                   [1, 1, 1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows.segment_ids, [[1, 1, 1, 1, 2, 2, 0, 0],
                                                     [1, 1, 1, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows.positions, [[0, 1, 2, 3, 0, 1, 0, 0],
                                                   [0, 1, 2, 0, 0, 0, 0, 0]])
    assert rows.loss_mask.dtype == np.float32
    assert all(getattr(rows, f).dtype == np.int32 for f in FIELDS if f != "loss_mask")
    s = rows.stats
    assert (s.examples, s.rows, s.truncated, s.dropped, s.trained_tokens, s.tokens) == (
        3, 2, 0, 0, 7, 9)
    assert s.non_pad_fraction == pytest.approx(9 / 16)

    unpacked = pack_examples([a, b, c], seq_len=8, pad_id=0, pack=False)
    assert len(unpacked) == 3
    np.testing.assert_array_equal(unpacked.segment_ids[1], [1, 1, 0, 0, 0, 0, 0, 0])


def test_pack_truncates_and_drops():
    long = ex(list(range(1, 21)), [0] * 5 + [1] * 15)  # 19 positions -> cut to 8
    late = ex(list(range(1, 21)), [0] * 15 + [1] * 5)  # trained part lies past the cut: dropped
    nothing = ex([1, 5, 6], [0, 0, 0])
    single = ex([1], [0])
    rows = pack_examples([long, late, nothing, single], seq_len=8, pad_id=0)
    assert len(rows) == 1
    np.testing.assert_array_equal(rows.targets[0], range(2, 10))
    np.testing.assert_array_equal(rows.loss_mask[0], [0, 0, 0, 0, 1, 1, 1, 1])
    s = rows.stats
    assert (s.examples, s.rows, s.truncated, s.dropped, s.trained_tokens) == (4, 1, 2, 3, 4)


def test_pack_real_conversations(tiny_tokenizer, demo_conversations):
    examples = [encode_conversation(tiny_tokenizer, [Message(**m) for m in c["messages"]], KOALA)
                for c in demo_conversations]
    rows = pack_examples(examples, seq_len=256, pad_id=tiny_tokenizer.pad_id)
    seg = rows.segment_ids
    # Segments are contiguous and numbered 1, 2, ... ; positions restart in each.
    for r in range(len(rows)):
        used = seg[r][seg[r] > 0]
        assert (np.diff(used) >= 0).all() and (np.diff(used) <= 1).all() and used[0] == 1
        assert (seg[r][len(used):] == 0).all()
        for s in np.unique(used):
            in_segment = seg[r] == s
            np.testing.assert_array_equal(rows.positions[r][in_segment],
                                          np.arange(in_segment.sum()))
    # No target crosses a segment: each target is the next input of the same segment, or the
    # example's last token (which is never an input anywhere).
    same = seg[:, 1:] == seg[:, :-1]
    np.testing.assert_array_equal(rows.targets[:, :-1][same], rows.inputs[:, 1:][same])
    pad = seg == 0
    assert (rows.loss_mask[pad] == 0).all() and (rows.inputs[pad] == tiny_tokenizer.pad_id).all()
    s = rows.stats
    total_trained = sum(int(e.loss_mask[1:][:256].sum()) for e in examples)
    assert s.trained_tokens == total_trained == int(rows.loss_mask.sum())
    assert s.tokens == int((~pad).sum())
    assert 0.5 < s.non_pad_fraction <= 1.0
    assert s.examples == len(examples) and s.dropped == 0
    unpacked = pack_examples(examples, seq_len=256, pad_id=tiny_tokenizer.pad_id, pack=False)
    assert len(unpacked) == len(examples) > len(rows)
    assert unpacked.stats.non_pad_fraction < s.non_pad_fraction


# ---------------------------------------------------------------- loader


def numbered_rows(n: int, seq_len: int = 4):
    """Rows whose inputs[:, 0] is the row number, so batches can be traced back."""
    examples = [ex([i + 100] + [7] * seq_len, [0] + [1] * seq_len) for i in range(n)]
    rows = pack_examples(examples, seq_len=seq_len, pad_id=0, pack=False)
    assert len(rows) == n
    return rows


def row_ids(batch) -> list[int]:
    return [int(x) - 100 if m else -1 for x, m in zip(batch["inputs"][:, 0],
                                                        batch["loss_mask"].any(1))]


def test_loader_deterministic_and_reshuffled_per_epoch():
    rows = numbered_rows(22)
    loader = BatchLoader(rows, 4, seed=7)
    assert loader.batches_per_epoch == 5
    epoch0 = [row_ids(loader.batch_at(s)) for s in range(5)]
    epoch1 = [row_ids(loader.batch_at(s)) for s in range(5, 10)]
    flat0, flat1 = sum(epoch0, []), sum(epoch1, [])
    assert len(set(flat0)) == 20 and len(set(flat1)) == 20  # no row twice within an epoch
    assert flat0 != flat1
    again = BatchLoader(rows, 4, seed=7)
    assert [row_ids(again.batch_at(s)) for s in range(10)] == epoch0 + epoch1
    assert [row_ids(BatchLoader(rows, 4, seed=8).batch_at(s)) for s in range(5)] != epoch0
    batch = loader.batch_at(3)
    assert set(batch) == set(FIELDS)
    assert all(v.shape == (4, 4) for v in batch.values())
    unshuffled = BatchLoader(rows, 4, seed=7, shuffle=False)
    assert row_ids(unshuffled.batch_at(1)) == [4, 5, 6, 7]
    assert row_ids(unshuffled.batch_at(5)) == [0, 1, 2, 3]


def test_loader_process_slices_make_the_global_batch():
    rows = numbered_rows(24)
    single = BatchLoader(rows, 8, seed=3)
    procs = [BatchLoader(rows, 8, seed=3, process_index=i, process_count=2) for i in range(2)]
    assert procs[0].local_batch_size == 4 and procs[0].batches_per_epoch == 3
    seen = []
    for step in range(6):
        parts = [p.batch_at(step) for p in procs]
        whole = single.batch_at(step)
        for f in FIELDS:
            np.testing.assert_array_equal(np.concatenate([p[f] for p in parts]), whole[f])
        if step < 3:
            seen += row_ids(parts[0]) + row_ids(parts[1])
    assert sorted(seen) == list(range(24))  # together the processes cover the epoch once


def test_eval_batches_cover_every_row_once():
    rows = numbered_rows(11)
    seen = []
    for i in range(2):
        loader = BatchLoader(rows, 4, seed=0, shuffle=False, process_index=i, process_count=2,
                             drop_remainder=False)
        batches = list(loader.eval_batches())
        assert len(batches) == 3 and all(b["inputs"].shape == (2, 4) for b in batches)
        seen += [r for b in batches for r in row_ids(b)]
    assert sorted(r for r in seen if r >= 0) == list(range(11))
    assert seen.count(-1) == 1  # one padding row, which carries no loss
    last = list(BatchLoader(rows, 4, seed=0, drop_remainder=False).eval_batches())[-1]
    assert last["loss_mask"][3].sum() == 0 and last["segment_ids"][3].sum() == 0
    small = BatchLoader(numbered_rows(3), 8, seed=0, drop_remainder=False)
    assert [row_ids(b) for b in small.eval_batches()] == [[0, 1, 2] + [-1] * 5]


def test_loader_errors():
    rows = numbered_rows(5)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        BatchLoader(rows, 4, seed=0, process_count=3)
    with pytest.raises(ValueError, match="only 5 packed rows, but one global batch needs 8"):
        BatchLoader(rows, 8, seed=0)


# ---------------------------------------------------------------- synthetic demo data


def test_synthetic_conversations(demo_conversations):
    assert generate_conversations(200, seed=0) == demo_conversations
    assert generate_conversations(50, seed=1) != demo_conversations[:50]
    turns = [sum(m["role"] == "user" for m in c["messages"]) for c in demo_conversations]
    assert set(turns) == {1, 2, 3, 4}
    assert any(c["messages"][0]["role"] == "system" for c in demo_conversations)
    for c in demo_conversations:
        for m in c["messages"]:
            if m["role"] == "assistant":
                assert m["content"].startswith(OPENING) and m["content"].endswith(CLOSING)
    lengths = sorted(len(m["content"]) for c in demo_conversations for m in c["messages"]
                     if m["role"] == "assistant")
    assert lengths[-1] > 8 * lengths[len(lengths) // 2]  # a long tail


def test_make_demo_data(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, os.path.join(REPO, "tools", "make_demo_data.py"), "--out", str(out),
           "--num-conversations", "300", "--vocab-size", "600"]
    env = {**os.environ, "PYTHONPATH": REPO}  # works whether or not the package is installed
    subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    train = list(read_messages_jsonl(out / "train.jsonl"))
    evals = list(read_messages_jsonl(out / "eval.jsonl"))
    assert (len(train), len(evals)) == (285, 15)
    assert not {c.id for c in train} & {c.id for c in evals}
    tok = load_tokenizer(out / "tokenizer.model")
    assert tok.vocab_size == 600 and (out / "tokenizer.vocab").exists()
    stamp = (out / "train.jsonl").stat().st_mtime_ns
    run = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    assert "up to date" in run.stdout and (out / "train.jsonl").stat().st_mtime_ns == stamp
    subprocess.run(cmd + ["--force"], capture_output=True, text=True, check=True, env=env)
    assert [c.id for c in read_messages_jsonl(out / "train.jsonl")] == [c.id for c in train]
