"""Data pipeline: packing, attention isolation of packed segments, `prepare` (all formats, cleaning
counts, eval split, weights, ArrayRecord round trip, determinism across workers, bad input), the
loader (restart from saved state, processes covering an epoch once), training's data loading
(cache, data.path checks, max_train_tokens) and the `prepare` CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import build_bpe_tokenizer

from imitation_jax.data.cleaning import CleaningConfig, html_to_markdown
from imitation_jax.errors import DataError
from imitation_jax.data.loader import BatchLoader, Subset, cap_trained_tokens
from imitation_jax.data.packing import FIELDS, assemble, pack, pack_examples, packed_rows
from imitation_jax.data.prepare import PrepareSettings, prepare, summary
from imitation_jax.data.stats import query_diversity
from imitation_jax.data.storage import PreparedSet
from imitation_jax.data.templates import Example, encode_conversation, get_template

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ex(ids: list[int], mask: list[int]) -> Example:
    return Example(np.array(ids, np.int32), np.array(mask, bool))


def segments(batch: dict, r: int) -> list[Example]:
    """The examples packed in row r, rebuilt from the model inputs (independently of packing)."""
    seg = batch["segment_ids"][r]
    out = []
    for s in range(1, int(seg.max()) + 1):
        where = np.flatnonzero(seg == s)
        assert (np.diff(where) == 1).all()  # contiguous
        np.testing.assert_array_equal(batch["positions"][r, where], np.arange(len(where)))
        ids = np.concatenate([batch["inputs"][r, where], batch["targets"][r, where[-1:]]])
        # inputs[1:] are the previous targets: a segment is one shifted example.
        np.testing.assert_array_equal(batch["targets"][r, where[:-1]], batch["inputs"][r, where[1:]])
        out.append(Example(ids.astype(np.int32),
                           np.concatenate([[False], batch["loss_mask"][r, where] > 0])))
    return out


def key(e: Example) -> tuple:
    return tuple(e.ids.tolist()), tuple(e.loss_mask.tolist())


# ---------------------------------------------------------------- packing


def test_pack_hand_checked():
    a = ex([1, 10, 11, 12, 2], [0, 0, 1, 1, 1])  # 4 positions after the shift
    b = ex([1, 20, 21], [0, 0, 1])  # 2 positions
    c = ex([1, 30, 31, 32], [0, 1, 1, 1])  # 3 positions
    # Best fit, longest first: a (4) opens row 0; c (3) fits row 0 (room 4); b (2) opens row 1.
    rows = pack_examples([a, b, c], seq_len=8, pad_id=0)
    assert len(rows) == 2 and rows.seq_len == 8
    np.testing.assert_array_equal(rows.inputs, [[1, 10, 11, 12, 1, 30, 31, 0], [1, 20, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows.targets, [[10, 11, 12, 2, 30, 31, 32, 0], [20, 21, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows.loss_mask, [[0, 1, 1, 1, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows.segment_ids, [[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rows.positions, [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 0, 0, 0, 0, 0, 0]])
    assert rows.loss_mask.dtype == np.float32
    assert all(getattr(rows, f).dtype == np.int32 for f in FIELDS if f != "loss_mask")
    s = rows.stats
    assert (s.examples, s.rows, s.truncated, s.dropped, s.trained_tokens, s.tokens) == (3, 2, 0, 0, 7, 9)
    assert s.non_pad_fraction == pytest.approx(9 / 16)
    assert pack([4, 2, 3, 1], 5, "first_fit") == [[0, 3], [2, 1]]
    assert pack([4, 2, 3, 1], 5, "best_fit") == [[0, 3], [2, 1]]
    assert pack([3, 3, 2], 5, "best_fit") == [[0, 2], [1]]
    assert pack([4, 2, 3], 8, "none") == [[0], [1], [2]]
    unpacked = pack_examples([a, b, c], seq_len=8, pad_id=0, pack=False)
    assert len(unpacked) == 3
    np.testing.assert_array_equal(unpacked.segment_ids[1], [1, 1, 0, 0, 0, 0, 0, 0])
    # Truncation and dropping are counted.
    long = ex([1] + [5] * 20, [0] + [1] * 20)
    untrained = ex([1, 2, 3], [0, 0, 0])
    r = pack_examples([long, untrained, a], seq_len=8, pad_id=0)
    assert (r.stats.truncated, r.stats.dropped, r.stats.rows) == (1, 1, 2)


@pytest.mark.parametrize("method", ["best_fit", "first_fit"])
def test_packing_long_tailed_lengths_fills_rows(method):
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(mean=5.0, sigma=1.0, size=20000).astype(int), 2, 2048)
    assert np.percentile(lengths, 99) > 8 * np.median(lengths)  # long-tailed
    rows = pack(lengths, 2048, method)
    members = sorted(i for r in rows for i in r)
    assert members == list(range(len(lengths)))  # every example exactly once
    fill = np.array([lengths[r].sum() for r in rows])
    assert fill.max() <= 2048
    efficiency = fill.sum() / (len(rows) * 2048)
    padded = lengths.sum() / (len(lengths) * 2048)
    assert efficiency >= 0.95 and padded < 0.15, (efficiency, padded)


def test_packed_rows_rebuild_their_examples(tiny_tokenizer, demo_conversations):
    tmpl = get_template("koala")
    examples = [encode_conversation(tiny_tokenizer, json_conv(c), tmpl) for c in demo_conversations[:100]]
    examples = [e for e in examples if len(e) <= 257]
    assignment = pack([len(e) - 1 for e in examples], 256, "best_fit")
    batch = assemble(list(packed_rows(examples, assignment)) + [None], 256, tiny_tokenizer.pad_id)
    rebuilt = [e for r in range(len(assignment)) for e in segments(batch, r)]
    assert sorted(map(key, rebuilt)) == sorted(map(key, examples))
    pad = batch["segment_ids"] == 0
    assert (batch["loss_mask"][pad] == 0).all() and (batch["inputs"][pad] == tiny_tokenizer.pad_id).all()
    assert pad[-1].all()  # the None row is all padding


def json_conv(record):
    from imitation_jax.data.formats import parse_messages

    return parse_messages(record, "test")


def test_packed_segments_do_not_see_each_other():
    """Changing the tokens of one packed segment leaves the logits of the others unchanged."""
    import jax.numpy as jnp
    from flax import nnx

    from imitation_jax.model import Llama, ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    examples = [ex(rng.integers(1, 64, n).tolist(), [0] + [1] * (n - 1)) for n in (9, 7, 12)]
    batch = assemble(list(packed_rows(examples, [[0, 1, 2]])), 32, 0)
    changed = dict(batch, inputs=batch["inputs"].copy())
    seg2 = batch["segment_ids"][0] == 2
    changed["inputs"][0, seg2] = (changed["inputs"][0, seg2] + 7) % 64

    forward = nnx.jit(lambda m, i, p, s: m.logits(m(i, p, s)))

    def logits(b):
        return np.asarray(forward(model, jnp.asarray(b["inputs"]), jnp.asarray(b["positions"]),
                                  jnp.asarray(b["segment_ids"])))

    before, after = logits(batch), logits(changed)
    others = batch["segment_ids"][0] != 2
    np.testing.assert_allclose(after[0, others], before[0, others], rtol=0, atol=1e-6)
    assert np.abs(after[0, seg2] - before[0, seg2]).max() > 1e-3
    # ... and each segment's logits equal those of the example alone in a row.
    alone = assemble(list(packed_rows(examples, [[2]])), 32, 0)
    seg3 = batch["segment_ids"][0] == 3
    np.testing.assert_allclose(before[0, seg3], logits(alone)[0, :12 - 1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- prepare


def write(path, content) -> str:
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return str(path)


def as_html(text: str) -> str:
    return "".join(f"<p>{p}</p>" for p in text.split("\n\n"))


def sharegpt(record, i, html=False):
    turns = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
              "value": (as_html(m["content"]) if html and m["role"] == "assistant" else m["content"])}
             for m in record["messages"]]
    return {"id": f"sg{i}", "conversations": turns}


def unique_conversations(n: int) -> list[dict]:
    from imitation_jax.demo.synthetic import generate_conversations

    seen, out = set(), []
    for c in generate_conversations(3 * n, seed=1):
        k = json.dumps(c["messages"])
        if k not in seen:
            seen.add(k)
            out.append(c)
    return out[:n]


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory):
    """Four inputs in four formats with planted problems: 5 duplicates, 3 empty conversations,
    2 with no reply, 4 mentioning the teacher, HTML replies, empty turns, a leading assistant turn."""
    d = tmp_path_factory.mktemp("mixed")
    convs = unique_conversations(180)

    def html(i, c):  # replies that survive the round trip through HTML unchanged
        return i % 3 == 0 and all(html_to_markdown(as_html(m["content"])) == m["content"]
                                  for m in c["messages"] if m["role"] == "assistant")
    share = [sharegpt(c, i, html=html(i, c)) for i, c in enumerate(convs[:80])]
    assert sum(html(i, c) for i, c in enumerate(convs[:80])) > 10
    share += [dict(share[i], id=f"dup{i}") for i in range(5)]  # exact duplicates (other ids)
    share += [{"id": "e1", "conversations": []}, {"id": "e2", "conversations": [{"from": "human", "value": " "}]},
              {"id": "e3", "conversations": [{"from": "gpt", "value": ""}, {"from": "human", "value": ""}]}]
    share += [{"id": f"n{i}", "conversations": [{"from": "human", "value": f"hello {i}?"}]} for i in range(2)]
    share += [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"who made you {i}?"},
                                                 {"from": "gpt", "value": "I was trained by TeacherCorp."}]}
              for i in range(4)]
    share += [{"id": "lead", "conversations": [{"from": "gpt", "value": "Hi! How can I help?"},
                                               {"from": "human", "value": "Name a colour."},
                                               {"from": "human", "value": ""},
                                               {"from": "gpt", "value": "Blue."}]}]
    files = {
        "sharegpt": write(d / "share.json", json.dumps(share, indent=1)),
        "openai": write(d / "chats.jsonl", "\n".join(json.dumps(c) for c in convs[80:160]) + "\n"),
        "alpaca": write(d / "alpaca.json", [{"instruction": f"Say the number {i}.", "input": "",
                                             "output": f"The number is {i}."} for i in range(20)]),
        "text": write(d / "doc.txt", "Plain text that is trained on every token. " * 40),
        "eval": write(d / "eval.jsonl", "\n".join(json.dumps(c) for c in convs[160:180]) + "\n"),
    }
    return files


def settings(tokenizer, **kw) -> PrepareSettings:
    cleaning = kw.pop("cleaning", CleaningConfig(filter_phrases=["teachercorp"]))
    return PrepareSettings(tokenizer=tokenizer.path, template=kw.pop("template", "koala"),
                           seq_len=kw.pop("seq_len", 512), cleaning=cleaning, diversity_sample=64, **kw)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mixed_inputs, tiny_tokenizer):
    out = tmp_path_factory.mktemp("prepared") / "set"
    f = mixed_inputs
    stats = prepare([f["sharegpt"], f"{f['openai']}:weight=1.5", f"{f['alpaca']}:count=30", f["text"]],
                    str(out), settings(tiny_tokenizer, eval_fraction=0.1), eval_inputs=[f["eval"]],
                    workers=1, progress=False)
    return str(out), stats


def all_rows(split) -> dict:
    return split.take(np.arange(len(split)))


def test_prepare_accounts_for_every_record(prepared, mixed_inputs):
    out, stats = prepared
    c = stats["conversations"]
    assert c["read"] == 95 + 80 + 20 + 1 + 20
    assert c["read"] == c["kept"] + sum(c["dropped"].values())
    assert c["dropped"] == {"duplicate": 5, "empty": 3, "no_assistant_turn": 2, "filtered_phrase": 4}
    assert c["kept"] == 80 + 1 + 80 + 20 + 1 + 20
    by_path = {(s["split"], os.path.basename(s["path"])): s for s in stats["inputs"]}
    share = by_path[("train", "share.json")]
    assert share["format"] == "sharegpt" and share["read"] == 95
    assert by_path[("train", "chats.jsonl")]["format"] == "openai"
    assert by_path[("train", "alpaca.json")]["format"] == "alpaca"
    assert by_path[("train", "doc.txt")]["format"] == "text"
    assert by_path[("eval", "eval.jsonl")]["kept"] == 20
    # Weights: 1.5 x the kept (not moved to eval) chats, exactly 30 alpaca records (20 + 10 repeats).
    chats = by_path[("train", "chats.jsonl")]
    assert chats["used"] == round(1.5 * (chats["kept"] - chats["moved_to_eval"]))
    alpaca = by_path[("train", "alpaca.json")]
    assert alpaca["used"] == 30 and alpaca["kept"] == 20
    t = stats["turns"]
    assert t["turns_html_converted"] > 10 and t["turns_leading_assistant"] == 1 and t["turns_empty"] >= 4
    assert sum(s["moved_to_eval"] for s in stats["inputs"] if s["split"] == "train") == round(
        0.1 * sum(s["kept"] for s in stats["inputs"] if s["split"] == "train"))
    saved = json.load(open(os.path.join(out, "stats.json")))
    assert saved["conversations"] == c and saved["fingerprint"] == stats["fingerprint"]


def test_prepared_rows_are_right(prepared, tiny_tokenizer, mixed_inputs):
    """Read back from the ArrayRecord files: rows rebuild into examples whose trained runs are
    exactly replies of the inputs (HTML converted) plus EOS; train and eval share no conversation."""
    out, stats = prepared
    ps = PreparedSet(out)
    tok = ps.tokenizer
    assert tok.vocab_size == tiny_tokenizer.vocab_size and ps.settings["seq_len"] == 512
    replies = set()
    for name in ("share.json", "chats.jsonl", "eval.jsonl"):
        path = [p for p in mixed_inputs.values() if p.endswith(name)][0]
        records = json.load(open(path)) if name.endswith(".json") else [json.loads(x) for x in open(path)]
        for r in records:
            for m in r.get("conversations", r.get("messages", [])):
                text = m.get("value", m.get("content"))
                if m.get("from", m.get("role")) in ("gpt", "assistant") and text.strip():
                    replies.add(html_to_markdown(text) if text.startswith("<p>") else text.strip())
    replies |= {f"The number is {i}." for i in range(20)} | {"Blue."}
    seen_text, doc = {}, []
    for split in ("train", "eval"):
        rows = ps.split(split)
        assert len(rows) == stats["splits"][split]["rows"] > 0
        batch = all_rows(rows)
        assert int(batch["loss_mask"].sum()) == stats["splits"][split]["trained_tokens"]
        assert int((batch["segment_ids"] > 0).sum()) == stats["splits"][split]["tokens"]
        examples = [e for r in range(len(rows)) for e in segments(batch, r)]
        assert len(examples) == stats["splits"][split]["examples"]
        texts = []
        for e in examples:
            if e.loss_mask[1:].all():  # a chunk of the plain-text document: all trained
                doc.append(e)
                continue
            for s, end in _runs(e.loss_mask):
                assert e.ids[end - 1] == tok.eos_id
                assert tok.decode(e.ids[s:end - 1]) in replies
            texts.append(tok.decode(e.ids))
        seen_text[split] = set(texts)
    assert not seen_text["train"] & seen_text["eval"]
    text = "Plain text that is trained on every token. " * 40
    first = [e for e in doc if e.ids[0] == tok.bos_id]
    assert len(first) == 1 and len(doc) == stats["turns"].get("documents_split", 0) + 1
    assert tok.decode(first[0].ids).strip() in text.strip()
    assert any(e.ids[-1] == tok.eos_id for e in doc)


def test_records_are_rows_in_order_and_every_read_is_checked(prepared, tmp_path):
    """Records are written in row order (tfds with shuffling disabled), so record i holds row i
    and the index's per-row counts describe the row read at i; a read that finds another row, an
    index that disagrees with the files, or a set of another format version is a one-line error."""
    import shutil

    from imitation_jax.data import storage

    out, _ = prepared
    for name in ("train", "eval"):
        split = PreparedSet(out).split(name)
        stored = [int(r["index"]) for r in split.source.__getitems__(list(range(len(split))))]
        assert stored == list(range(len(split)))
        batch = all_rows(split)
        np.testing.assert_array_equal((batch["segment_ids"] > 0).sum(1), split.tokens_per_row)
        np.testing.assert_array_equal(batch["loss_mask"].sum(1), split.trained_per_row)
        np.testing.assert_array_equal(batch["segment_ids"].max(1), split.examples_per_row)

    class OneOff:  # a source whose records are one place off
        def __init__(self, source):
            self.source = source

        def __len__(self):
            return len(self.source)

        def __getitems__(self, keys):
            return self.source.__getitems__([(k + 1) % len(self.source) for k in keys])

    shifted = PreparedSet(out).split("train")
    shifted._source = OneOff(PreparedSet(out).split("train").source)
    with pytest.raises(DataError, match="train record 0 holds row 1: the ArrayRecord files are not in row order"):
        shifted.take([0, 1])

    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    with np.load(os.path.join(copy, storage.INDEX)) as index:
        arrays = {k: index[k] for k in index.files}
    arrays = {k: np.append(v, v[:1]) if k.startswith("train_") else v for k, v in arrays.items()}
    np.savez(os.path.join(copy, storage.INDEX), **arrays)
    longer = PreparedSet(copy).split("train")
    with pytest.raises(DataError, match=rf"the train split has {len(longer) - 1} records but index.npz lists {len(longer)} rows"):
        longer.take([0])
    stats = json.load(open(os.path.join(copy, "stats.json")))
    json.dump({**stats, "version": 1}, open(os.path.join(copy, "stats.json"), "w"))
    with pytest.raises(DataError) as err:
        PreparedSet(copy)
    assert str(err.value) == (f"{copy}: prepared by format version 1, this code reads version "
                              f"{storage.FORMAT_VERSION}: prepare it again")


def _runs(mask):
    m = np.concatenate([[0], mask.astype(int), [0]])
    return list(zip(np.flatnonzero(np.diff(m) == 1), np.flatnonzero(np.diff(m) == -1)))


def test_prepare_is_deterministic_across_workers(tmp_path, mixed_inputs, tiny_tokenizer):
    f = mixed_inputs
    inputs = [f["sharegpt"], f["openai"], f["alpaca"]]
    a = prepare(inputs, str(tmp_path / "one"), settings(tiny_tokenizer), workers=1, progress=False)
    b = prepare(inputs, str(tmp_path / "two"), settings(tiny_tokenizer), workers=2, progress=False)
    assert a["fingerprint"] == b["fingerprint"] and a["timing"]["workers"] == 1 and b["timing"]["workers"] == 2
    assert a["conversations"] == b["conversations"] and a["splits"] == b["splits"]
    ra, rb = all_rows(PreparedSet(str(tmp_path / "one")).split("train")), all_rows(PreparedSet(str(tmp_path / "two")).split("train"))
    for name in FIELDS:
        np.testing.assert_array_equal(ra[name], rb[name])
    # Same rows in another order of the inputs? Different rows, same conversations kept.
    c = prepare(inputs[::-1], str(tmp_path / "one"), settings(tiny_tokenizer), workers=1, progress=False)
    assert c["conversations"]["kept"] == a["conversations"]["kept"]  # "one" replaced in place


@pytest.mark.parametrize("template", ["llama3", "chatml"])
def test_prepare_adds_missing_special_tokens(tmp_path, mixed_inputs, tiny_tokenizer, template):
    stats = prepare([mixed_inputs["openai"]], str(tmp_path / "set"),
                    settings(tiny_tokenizer, template=template, turn_tokens=True), workers=1, progress=False)
    specials = get_template(template, turn_tokens=True).special_tokens
    assert list(stats["tokenizer"]["added_tokens"]) == list(specials)
    assert stats["tokenizer"]["vocab_size"] == 512 + len(specials)
    ps = PreparedSet(str(tmp_path / "set"))
    assert ps.tokenizer.added_tokens == stats["tokenizer"]["added_tokens"]
    batch = all_rows(ps.split("train"))
    assert batch["inputs"].max() >= 512  # the added ids are used
    assert ps.template.name == f"{template}+turn_tokens"


def test_bad_input_stops_or_is_counted(tmp_path, tiny_tokenizer, demo_conversations):
    good = [json.dumps(c) for c in demo_conversations[:20]]
    lines = good[:5] + ['{"messages": [{"role": "robot", "content": "x"}]}'] + good[5:10] + \
        ["not json"] + good[10:]
    bad = write(tmp_path / "bad.jsonl", "\n".join(lines) + "\n")
    records = [sharegpt(c, 20 + i) for i, c in enumerate(demo_conversations[20:40])]
    text = json.dumps(records, indent=1)
    partial = write(tmp_path / "partial.json", text[:text.index('"sg32"') + 30])
    with pytest.raises(DataError) as err:
        prepare([bad, partial], str(tmp_path / "out"), settings(tiny_tokenizer), workers=1, progress=False)
    assert str(err.value) == (f"{bad}:6: message 0: role 'robot' is not one of system, developer, "
                              "user, assistant")
    assert not os.path.exists(tmp_path / "out")  # nothing half-written
    stats = prepare([bad, partial], str(tmp_path / "out"), settings(tiny_tokenizer, skip_invalid=True),
                    workers=1, progress=False)
    c = stats["conversations"]
    assert c["invalid"] == {"bad_role": 1, "invalid_json": 1, "truncated_file": 1}
    assert c["dropped"]["invalid"] == 3 and c["read"] == 20 + 2 + 12 + 1
    assert c["read"] == c["kept"] + sum(c["dropped"].values())
    assert c["invalid_examples"][0].startswith(f"{bad}:6: ")
    assert "12 complete records read" in c["invalid_examples"][2]
    partial_src = [s for s in stats["inputs"] if s["path"] == partial][0]
    assert partial_src["read"] == 13 and partial_src["invalid"] == 1


def test_prepare_output_directory_rules(tmp_path, mixed_inputs, tiny_tokenizer):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="exists and is not a prepared data set"):
        prepare([mixed_inputs["openai"]], str(other), settings(tiny_tokenizer), workers=1, progress=False)
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(DataError, match="no such file"):
        prepare([str(tmp_path / "missing.jsonl")], str(tmp_path / "x"), settings(tiny_tokenizer), progress=False)


def test_diversity_figure():
    assert query_diversity(["the same question here"] * 3) == pytest.approx(100.0)
    assert query_diversity(["alpha beta gamma", "delta epsilon zeta"]) == 0.0
    mixed = query_diversity(["how do I sort a list in python", "how do I sort a dict in python",
                             "what is the capital of france"])
    assert 0 < mixed < 100


def test_summary_lists_the_figures(prepared):
    text = summary(prepared[1])
    for needle in ["conversations: 216 read", "dropped (duplicate", "empty 3", "no_assistant_turn 2",
                   "filtered_phrase 4", "turns:", "packing efficiency", "one example per padded row",
                   "train example lengths (tokens):", "diversity: mean BLEU", "conversations/s", "tokens/s"]:
        assert needle in text, needle


# ---------------------------------------------------------------- loader


def numbered_rows(n: int, seq_len: int = 4):
    """Rows whose inputs[:, 0] is the row number, so batches can be traced back."""
    examples = [ex([i + 100] + [7] * seq_len, [0] + [1] * seq_len) for i in range(n)]
    rows = pack_examples(examples, seq_len=seq_len, pad_id=0, pack=False)
    assert len(rows) == n
    return rows


def row_ids(batch) -> list[int]:
    return [int(x) - 100 if m else -1 for x, m in zip(batch["inputs"][:, 0], batch["loss_mask"].any(1))]


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
    assert set(batch) == set(FIELDS) and all(v.shape == (4, 4) for v in batch.values())
    unshuffled = BatchLoader(rows, 4, seed=7, shuffle=False)
    assert row_ids(unshuffled.batch_at(1)) == [4, 5, 6, 7]
    assert row_ids(unshuffled.batch_at(5)) == [0, 1, 2, 3]


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
    small = BatchLoader(numbered_rows(3), 8, seed=0, drop_remainder=False)
    assert [row_ids(b) for b in small.eval_batches()] == [[0, 1, 2] + [-1] * 5]


def test_loader_errors():
    rows = numbered_rows(5)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        BatchLoader(rows, 4, seed=0, process_count=3)
    with pytest.raises(ValueError, match="only 5 packed rows, but one global batch needs 8"):
        BatchLoader(rows, 8, seed=0)


def row_keys(batch) -> list[bytes]:
    return [batch["inputs"][i].tobytes() + batch["loss_mask"][i].tobytes() for i in range(len(batch["inputs"]))]


def test_loader_restarts_from_saved_state(prepared):
    rows = PreparedSet(prepared[0]).split("train")
    loader = BatchLoader(rows, 4, seed=3)
    uninterrupted = [row_keys(b) for b, _ in zip(loader.iterator(0), range(2 * loader.batches_per_epoch + 3))]
    it = loader.iterator(0)
    first = [row_keys(next(it)) for _ in range(5)]
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    it.close()
    assert state["step"] == 5 and state["fingerprint"] == rows.fingerprint
    fresh = BatchLoader(PreparedSet(prepared[0]).split("train"), 4, seed=3)  # a new process
    resumed = fresh.iterator()
    resumed.set_state(state)
    rest = [row_keys(b) for b, _ in zip(resumed, range(len(uninterrupted) - 5))]
    assert first + rest == uninterrupted
    assert [row_keys(fresh.batch_at(s)) for s in range(len(uninterrupted))] == uninterrupted
    with pytest.raises(ValueError, match="seed=3 but this run has 4"):
        BatchLoader(rows, 4, seed=4).restore(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        BatchLoader(rows, 8, seed=3).restore(state)


def test_two_processes_together_read_each_row_of_an_epoch_once(prepared):
    full = PreparedSet(prepared[0]).split("train")
    rows = Subset(full, np.arange(len(full) - len(full) % 8))
    procs = [BatchLoader(rows, 8, seed=1, process_index=i, process_count=2) for i in range(2)]
    single = BatchLoader(rows, 8, seed=1)
    seen = []
    for step in range(procs[0].batches_per_epoch):
        parts = [p.batch_at(step) for p in procs]
        assert parts[0]["inputs"].shape == (4, 512)
        whole = single.batch_at(step)
        for f in FIELDS:
            np.testing.assert_array_equal(np.concatenate([p[f] for p in parts]), whole[f])
        seen += [int(i) for p in procs for i in p.indices_at(step)]
    assert sorted(seen) == list(range(len(rows)))


def test_max_train_tokens_caps_with_nested_subsets(prepared):
    train = PreparedSet(prepared[0]).split("train")
    total = int(train.trained_per_row.sum())
    small, large = cap_trained_tokens(train, total // 4), cap_trained_tokens(train, total // 2)
    assert total // 4 - train.trained_per_row.max() < small.stats.trained_tokens <= total // 4
    assert large.stats.trained_tokens <= total // 2
    assert set(small.rows) < set(large.rows)  # nested
    np.testing.assert_array_equal(cap_trained_tokens(train, total // 4).rows, small.rows)
    batch = small.take(np.arange(len(small)))
    assert int(batch["loss_mask"].sum()) == small.stats.trained_tokens
    with pytest.raises(ValueError, match="less than the trained tokens of one row"):
        cap_trained_tokens(train, 1)


# ---------------------------------------------------------------- training's data loading


def data_config(**kw):
    from imitation_jax.data.config import DataConfig

    return DataConfig(**kw)


def test_load_training_data_prepares_raw_files_once(tmp_path, demo_dir):
    from imitation_jax.data.training import load_training_data

    logs = []
    cfg = data_config(train_files=[f"{demo_dir}/train.jsonl"], eval_files=[f"{demo_dir}/eval.jsonl"],
                      tokenizer=f"{demo_dir}/tokenizer.model", seq_len=128, cache_dir=str(tmp_path))
    data = load_training_data(cfg, log=logs.append)
    assert len(logs) == 1 and logs[0].startswith(f"prepared {data.path}")
    assert data.path.startswith(str(tmp_path)) and data.seq_len == 128 and data.vocab_size == 512
    assert data.config.template == "koala" and data.config.packing == "best_fit"
    assert len(data.train) > 0 and data.eval is not None and len(data.eval) > 0
    stamp = os.stat(os.path.join(data.path, "stats.json")).st_mtime_ns
    again = load_training_data(cfg, log=logs.append)
    assert again.path == data.path and len(logs) == 1  # reused, not prepared again
    assert os.stat(os.path.join(data.path, "stats.json")).st_mtime_ns == stamp
    other = load_training_data(dataclasses.replace(cfg, seq_len=256), log=logs.append)
    assert other.path != data.path and len(logs) == 2
    capped = load_training_data(dataclasses.replace(cfg, max_train_tokens=20000), log=None)
    assert capped.train.stats.trained_tokens <= 20000 < data.train.stats.trained_tokens
    # The same set through data.path, with the config's keys checked against it.
    by_path = load_training_data(data_config(path=data.path, train_files=cfg.train_files,
                                             eval_files=cfg.eval_files, tokenizer=cfg.tokenizer,
                                             template="koala", seq_len=128))
    assert by_path.train.fingerprint == data.train.fingerprint
    for bad, msg in [(dict(template="chatml"), "data.template='chatml' but"),
                     (dict(seq_len=512), "data.seq_len=512 but"),
                     (dict(train_files=[f"{demo_dir}/eval.jsonl"]), "are not the inputs"),
                     (dict(cleaning=CleaningConfig(dedup=False)), "data.cleaning.dedup=False but"),
                     (dict(split_seed=5), "data.split_seed=5 but .* was prepared with 0"),
                     (dict(tokenizer=str(tmp_path / "missing.model")), "no such tokenizer")]:
        with pytest.raises(DataError, match=msg):
            load_training_data(data_config(path=data.path, **bad))


def test_data_config_errors():
    from imitation_jax.train.config import load_config
    from imitation_jax.errors import ConfigError

    base = ["run_dir=x", "train.steps=1"]
    for overrides, msg in [([], "no training data"),
                           (["data.train_files=[a.jsonl]"], "data.tokenizer is required"),
                           (["data.path=d", "data.packing=tight"], "data.packing='tight' is not one of"),
                           (["data.path=d", "data.max_train_tokens=0"], "must be positive"),
                           (["data.path=d", "data.pack=true"], "unknown config key 'data.pack'")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(None, base + overrides)
    cfg = load_config(None, base + ["data.path=d", "data.cleaning.filter_phrases=[OpenAI]"])
    assert cfg.data.cleaning.filter_phrases == ["OpenAI"]
    # The prepare settings are data.* keys of train too, checked by the same validation.
    cfg = load_config(None, base + ["data.path=d", "data.split_seed=3", "data.diversity_sample=0"])
    assert (cfg.data.split_seed, cfg.data.diversity_sample, cfg.data.seed) == (3, 0, 0)
    with pytest.raises(ConfigError, match=r"config: data.format='csv' is not one of auto, sharegpt"):
        load_config(None, base + ["data.path=d", "data.format=csv"])


# ---------------------------------------------------------------- the prepare CLI


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "imitation_jax.cli", "prepare", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO})


def test_cli_prepare_prints_summary(tmp_path, demo_dir):
    out = tmp_path / "set"
    r = cli(f"{demo_dir}/train.jsonl", "--eval", f"{demo_dir}/eval.jsonl", "--tokenizer",
            f"{demo_dir}/tokenizer.model", "--template", "vicuna", "--seq-len", "1024", "--out", str(out),
            "--workers", "2", "--filter-phrase", "Zorbia")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert text.startswith(f"prepared {out}\n  template vicuna, seq_len 1024, packing best_fit")
    for needle in ["conversations: 600 read", "filtered_phrase", "packing efficiency",
                   "train example lengths", "diversity:", "(2 tokenizing workers)"]:
        assert needle in text, (needle, text)
    stats = json.load(open(out / "stats.json"))
    train = stats["splits"]["train"]
    assert train["non_pad_fraction"] > 0.95 and train["padded_non_pad_fraction"] < 0.5
    files = os.listdir(out / "imitation_rows" / "1.0.0")
    assert "imitation_rows-train.array_record-00000-of-00001" in files and "features.json" in files


def test_cli_prepare_bad_input_exit_2_one_line(tmp_path, demo_dir, demo_conversations):
    good = [json.dumps(sharegpt(c, i)) for i, c in enumerate(demo_conversations)] * 9
    good = good[:1733] + [json.dumps({"id": "x", "conversations": [{"from": "robot", "value": "beep"}]})]
    chats = write(tmp_path / "chats.jsonl", "\n".join(good) + "\n")
    text = json.dumps([sharegpt(c, i) for i, c in enumerate(demo_conversations[:10])])
    partial = write(tmp_path / "partial.json", text[:text.index('"sg9"') + 10])
    plain_tok = build_bpe_tokenizer(tmp_path / "plain_tok", ["hello world"] * 5,
                                    chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    base = ["--tokenizer", f"{demo_dir}/tokenizer.model", "--template", "koala", "--seq-len", "128",
            "--out", str(tmp_path / "out")]
    cases = [
        ([chats, *base], f"{chats}:1734: turn 0: role 'robot' is not one of human, user, gpt, chatgpt, "
                         "bard, assistant, system"),
        ([partial, *base], f"{partial}: the JSON array ends early (a partial download?): 9 complete records read"),
        ([str(tmp_path / "nope.json"), *base], f"{tmp_path / 'nope.json'}: no such file"),
        ([f"{demo_dir}/eval.jsonl", *base[:2], "--template", "hf", *base[4:]], "needs a Hugging Face tokenizer"),
        ([f"{demo_dir}/eval.jsonl", "--tokenizer", plain_tok, "--template", "hf", *base[4:]],
         "chat_template has no {% generation %} markers"),
    ]
    for args, message in cases:
        r = cli(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert lines[0].startswith("imitation-jax prepare: error: ") and message in lines[0], lines[0]
    r = cli(chats, *base, "--skip-invalid", "--quiet")
    assert r.returncode == 0 and "invalid records skipped: bad_role 1" in r.stdout


def test_more_bad_inputs(tmp_path, tiny_tokenizer):
    unknown = write(tmp_path / "odd.jsonl", json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    with pytest.raises(DataError, match=rf"^{unknown}:1: cannot tell the format of this record "
                                        r"\(keys: completion, prompt\)"):
        prepare([unknown], str(tmp_path / "a"), settings(tiny_tokenizer), workers=1, progress=False)
    empty = write(tmp_path / "empty.jsonl", json.dumps({"messages": []}) + "\n")
    with pytest.raises(DataError, match=r"no training rows: all 1 conversations read were dropped"):
        prepare([empty], str(tmp_path / "b"), settings(tiny_tokenizer), workers=1, progress=False)
    text = write(tmp_path / "bad.txt", "x")
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff")
    with pytest.raises(DataError, match=rf"^{text}:2: not valid UTF-8"):
        prepare([text], str(tmp_path / "c"), settings(tiny_tokenizer), workers=1, progress=False)
    with pytest.raises(DataError, match="seq_len must be at least 2"):
        prepare([empty], str(tmp_path / "d"), settings(tiny_tokenizer, seq_len=1), progress=False)


def prepare_args(*argv):
    """The data settings `imitation-jax prepare ARGV` would prepare with (nothing is read)."""
    from imitation_jax.cli import build_parser
    from imitation_jax.commands.prepare import data_settings

    args = build_parser().parse_args(["prepare", *argv])
    return data_settings(args.config, args.layers)


def train_config(path, data: dict) -> str:
    """A train config file whose data: section is `data` (the other sections: prepare ignores)."""
    import yaml

    path.write_text(yaml.safe_dump({"run_dir": "runs/x", "model": {"preset": "tiny"},
                                    "train": {"steps": 3}, "data": data}))
    return str(path)


def test_cli_prepare_settings_precedence(tmp_path):
    """defaults < --config's data: section < flags and data.key=value overrides in order given."""
    from imitation_jax.data.config import DataConfig

    cfg = train_config(tmp_path / "c.yaml", {"train_files": ["t.jsonl"], "seq_len": 256,
                                              "cleaning": {"filter_phrases": ["A"]}, "seed": 9})
    assert prepare_args("a.jsonl", "--out", "o") == DataConfig(train_files=["a.jsonl"])
    got = prepare_args("--config", cfg, "--out", "o")
    assert (got.train_files, got.seq_len, got.cleaning.filter_phrases, got.template) == (["t.jsonl"], 256, ["A"], None)
    assert prepare_args("--config", cfg, "--seq-len", "128", "--out", "o", "data.seq_len=64").seq_len == 64
    assert prepare_args("data.seq_len=64", "--seq-len", "128", "--config", cfg, "--out", "o").seq_len == 128
    got = prepare_args("a.jsonl", "b.jsonl:weight=2", "--eval", "e1", "--eval", "e2", "--config", cfg,
                       "--filter-phrase", "X", "--filter-phrase", "Y", "--no-dedup", "--seed", "4", "--out", "o")
    assert (got.train_files, got.eval_files) == (["a.jsonl", "b.jsonl:weight=2"], ["e1", "e2"])
    assert (got.cleaning.filter_phrases, got.cleaning.dedup, got.split_seed, got.seed) == (["X", "Y"], False, 4, 9)


def test_cli_prepare_data_keys_equal_flags(tmp_path, demo_dir, capsys):
    """prepare through a train config's data: section and data.key=value overrides gives the same
    rows and stats as through the flags (aliases of those keys); a wrong key is one line, exit 2."""
    from imitation_jax.cli import main

    by_flags, by_keys = tmp_path / "flags", tmp_path / "keys"
    assert main(["prepare", f"{demo_dir}/train.jsonl", "--eval", f"{demo_dir}/eval.jsonl",
                 "--tokenizer", f"{demo_dir}/tokenizer.model", "--template", "vicuna", "--seq-len", "256",
                 "--packing", "first_fit", "--eval-fraction", "0.1", "--filter-phrase", "Zorbia",
                 "--no-dedup", "--seed", "3", "--workers", "1", "--quiet", "--out", str(by_flags)]) == 0
    cfg = train_config(tmp_path / "train.yaml", {
        "train_files": [f"{demo_dir}/train.jsonl"], "eval_files": [f"{demo_dir}/eval.jsonl"],
        "tokenizer": f"{demo_dir}/tokenizer.model", "template": "koala", "seq_len": 256,
        "packing": "first_fit", "cleaning": {"filter_phrases": ["Zorbia"], "dedup": False}, "seed": 7})
    assert main(["prepare", "--config", cfg, "--quiet", "--out", str(by_keys), "data.template=vicuna",
                 "data.eval_fraction=0.1", "data.split_seed=3", "data.workers=1"]) == 0
    a, b = (json.load(open(d / "stats.json")) for d in (by_flags, by_keys))
    assert a["settings"]["template"] == "vicuna" and a["settings"]["seed"] == 3
    assert {k: v for k, v in a.items() if k not in ("path", "timing")} == \
        {k: v for k, v in b.items() if k not in ("path", "timing")}
    for split in ("train", "eval"):
        ra, rb = (all_rows(PreparedSet(str(d)).split(split)) for d in (by_flags, by_keys))
        for name in FIELDS:
            np.testing.assert_array_equal(ra[name], rb[name])
    capsys.readouterr()
    bad_yaml = train_config(tmp_path / "bad.yaml", {"packing_mode": "x"})
    for args, message in [(["--config", cfg, "data.pack=1"], "override 'data.pack=1': unknown config key 'data.pack'"),
                          (["--config", bad_yaml], f"{bad_yaml}: unknown config key 'data.packing_mode'"),
                          (["--config", cfg, "seq_len=64"], "override 'seq_len=64': prepare takes data.* keys"),
                          (["--config", cfg, "data.seq_len=1"], "data.seq_len must be at least 2, got 1")]:
        assert main(["prepare", *args, "--out", str(tmp_path / "x")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"imitation-jax prepare: error: {message}"), lines
