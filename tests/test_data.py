"""Data units: formats and readers, cleaning, tokenizers, chat templates and masks, splitting long
conversations, synthetic demo data. (Packing, prepare, loading: test_data_pipeline.py.)"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import build_bpe_tokenizer

from imitation_jax.data.cleaning import CleaningConfig, clean, html_to_markdown, looks_like_html
from imitation_jax.data.examples import conversation_examples
from imitation_jax.data.formats import Conversation, Message, text_document
from imitation_jax.errors import DataError
from imitation_jax.data.readers import (
    Source, iter_conversations, read_conversations, read_messages_jsonl)
from imitation_jax.demo.synthetic import CLOSING, OPENING, generate_conversations
from imitation_jax.data.templates import (
    TEMPLATES, TURN_TOKENS, chat_template_jinja, encode_conversation, encode_prompt, get_template,
    render_text, stop_ids)
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


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each contiguous run of True."""
    m = np.concatenate([[0], mask.astype(int), [0]])
    return list(zip(np.flatnonzero(np.diff(m) == 1), np.flatnonzero(np.diff(m) == -1)))


def with_specials(tok, template):
    tok.added_tokens = {}
    tok.add_special_tokens(template.special_tokens)
    return tok


# ---------------------------------------------------------------- formats and readers


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


EXPECTED = [("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello!"),
            ("user", "Bye"), ("assistant", "Goodbye.")]


def test_every_format_is_detected_and_parsed(tmp_path):
    turns = EXPECTED
    sharegpt = {"id": "s1", "conversations": [
        {"from": {"system": "system", "user": "human", "assistant": "gpt"}[r], "value": c}
        for r, c in turns]}
    variants = {
        "sharegpt.json": json.dumps([sharegpt, {**sharegpt, "id": "s2", "conversations": [
            {"from": "user", "value": "Hi there"}, {"from": "chatgpt", "value": "Hello!"},
            {"from": "human", "value": "Bye"}, {"from": "bard", "value": "Goodbye."}]}], indent=2),
        "sharegpt.jsonl": json.dumps(sharegpt) + "\n",
        "openai.jsonl": json.dumps({"messages": [
            {"role": "developer" if r == "system" else r,
             "content": c if r != "user" else [{"type": "text", "text": c}]}
            for r, c in turns]}) + "\n",
        "alpaca.json": json.dumps([{"instruction": "Summarise:", "input": "A long text.",
                                    "output": "Short."}, {"instruction": "Hi", "output": "Hello"}]),
        "doc.txt": "Plain text.\nEvery token trained.\n",
        "texts.jsonl": json.dumps({"text": "One document."}) + "\n",
    }
    for name, content in variants.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    with gzip.open(tmp_path / "gz.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(variants["sharegpt.jsonl"])

    def read(name, **kw):
        detected = {}
        items = list(iter_conversations(Source(str(tmp_path / name), **kw), detected=detected))
        assert not [i for i in items if isinstance(i, DataError)], items
        return items, detected.get(str(tmp_path / name), kw.get("format"))

    convs, fmt = read("sharegpt.json")
    assert fmt == "sharegpt" and [c.id for c in convs] == ["s1", "s2"]
    assert [(m.role, m.content) for m in convs[0].messages] == turns
    assert [(m.role, m.content) for m in convs[1].messages] == turns[1:]
    for name, want in [("sharegpt.jsonl", "sharegpt"), ("gz.jsonl.gz", "sharegpt"), ("openai.jsonl", "openai")]:
        (conv,), fmt = read(name)
        assert fmt == want and [(m.role, m.content) for m in conv.messages] == turns, name
    (a, b), fmt = read("alpaca.json")
    assert fmt == "alpaca"
    assert [(m.role, m.content) for m in a.messages] == [("user", "Summarise:\n\nA long text."),
                                                         ("assistant", "Short.")]
    assert [(m.role, m.content) for m in b.messages] == [("user", "Hi"), ("assistant", "Hello")]
    (doc,), _ = read("doc.txt")
    assert doc.kind == "text" and doc.text == variants["doc.txt"]
    (doc,), fmt = read("texts.jsonl")
    assert fmt == "text" and doc.kind == "text" and doc.text == "One document."
    # A format given explicitly is required of every record.
    items = list(iter_conversations(Source(str(tmp_path / "openai.jsonl"), format="sharegpt")))
    assert isinstance(items[0], DataError) and 'missing "conversations"' in str(items[0])


BAD_RECORDS = [
    ('{"messages": [', "invalid JSON", "invalid_json"),
    ('[1, 2]', "expected a JSON object", "not_an_object"),
    ('{"msgs": []}', 'missing "messages"', "missing_field"),
    ('{"messages": {}}', '"messages" must be a list', "bad_field"),
    ('{"messages": ["hi"]}', "message 0 is not an object", "bad_message"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "message 0: role 'robot' is not one of system, developer, user, assistant", "bad_role"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}',
     "content must be a string", "bad_content"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}',
     "content must be a string", "bad_content"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
     "content part 0 is not text", "bad_content"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}, '
     '{"role": "assistant", "content": "y"}]}', "system message may only come first",
     "system_not_first"),
]


@pytest.mark.parametrize("bad,reason,kind", BAD_RECORDS)
def test_bad_records_name_file_line_and_reason(tmp_path, bad, reason, kind):
    good = json.dumps({"messages": [{"role": "user", "content": "a"},
                                    {"role": "assistant", "content": "b"}]})
    path = write_jsonl(tmp_path / "chats.jsonl", [good, "", good, bad, good])
    with pytest.raises(DataError) as err:
        list(read_messages_jsonl(path))
    message = str(err.value)
    assert message.startswith(f"{path}:4: "), message
    assert reason in message and err.value.kind == kind
    assert "\n" not in message


def test_sharegpt_errors_in_a_json_array_name_line_and_record(tmp_path):
    records = [{"id": f"c{i}", "conversations": [{"from": "human", "value": "q"},
                                                 {"from": "gpt", "value": "a"}]} for i in range(4)]
    records[2]["conversations"][1]["from"] = "robot"
    path = tmp_path / "share.json"
    path.write_text(json.dumps(records, indent=1))
    lines = path.read_text().splitlines()
    start = [i for i, line in enumerate(lines, 1) if '"id": "c2"' in line][0] - 1  # the record's "{"
    with pytest.raises(DataError) as err:
        list(read_conversations(str(path)))
    assert str(err.value) == (f"{path}:{start}: record 2: turn 1: role 'robot' is not one of "
                              "human, user, gpt, chatgpt, bard, assistant, system")


def test_truncated_json_array_is_reported_with_complete_records(tmp_path):
    records = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"question {i}"},
                                                 {"from": "gpt", "value": "answer " * 50}]}
               for i in range(30)]
    text = json.dumps(records, indent=2)
    cut = text.index('"c17"') + 40  # in the middle of record 17
    path = tmp_path / "partial.json"
    path.write_text(text[:cut])
    items = list(iter_conversations(Source(str(path))))
    assert all(isinstance(c, Conversation) for c in items[:17]) and len(items) == 18
    err = items[-1]
    assert isinstance(err, DataError) and err.kind == "truncated_file"
    assert str(err).startswith(f"{path}: the JSON array ends early (a partial download?): "
                               "17 complete records read")
    # Cut right after a record's comma: still reported as truncated, 17 complete records.
    path.write_text(text[:text.index('"c17"')].rstrip().rstrip("{").rstrip())
    items = list(iter_conversations(Source(str(path))))
    assert len(items) == 18 and "17 complete records" in str(items[-1])
    # A JSONL file whose last line is cut off.
    jsonl = tmp_path / "partial.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records[:3])[:-15])
    items = list(iter_conversations(Source(str(jsonl))))
    assert len(items) == 3 and items[-1].kind == "truncated_file"
    assert str(items[-1]).startswith(f"{jsonl}:3: the last line is cut off")


def test_bad_utf8_and_missing_file(tmp_path):
    path = tmp_path / "bin.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"},
                                    {"role": "assistant", "content": "b"}]}).encode()
    path.write_bytes(good + b'\n\xff\xfe\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8"):
        list(read_messages_jsonl(path))
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"^{re.escape(str(missing))}: no such file"):
        list(read_messages_jsonl(missing))


def test_source_specs():
    assert Source.parse("a/b.json") == Source("a/b.json")
    assert Source.parse("a/b.json:format=sharegpt,weight=0.5") == Source("a/b.json", "sharegpt", 0.5)
    assert Source.parse("x.jsonl:count=100", "openai") == Source("x.jsonl", "openai", None, 100)
    assert Source.parse("C:/data/x.jsonl") == Source("C:/data/x.jsonl")  # not options: a path
    assert str(Source("b.json", "alpaca", 2.0)) == "b.json:format=alpaca,weight=2"
    for bad, msg in [("a.json:colour=red", "unknown input option 'colour'"),
                     ("a.json:weight=x", "weight must be a number"),
                     ("a.json:format=csv", "format 'csv' is not one of"),
                     ("a.json:weight=1,count=2", "weight or count, not both")]:
        with pytest.raises(DataError, match=msg):
            Source.parse(bad)


# ---------------------------------------------------------------- cleaning

CHATGPT_HTML = (
    '<div class="markdown prose w-full break-words"><p>Sure! Here is a <strong>Python</strong> '
    'function:</p><pre><div class="bg-black mb-4 rounded-md"><div class="flex items-center">'
    '<span class="">python</span><button class="flex ml-auto gap-2"><svg></svg>Copy code</button>'
    '</div><div class="p-4"><code class="!whitespace-pre hljs language-python"><span class="hljs-'
    'keyword">def</span> <span class="hljs-title">add_one</span>(x):\n    <span class="hljs-keyword">'
    'return</span> x + <span class="hljs-number">1</span>\n</code></div></div></pre><ol><li><p>'
    'First, call it.</p></li><li><p>Then use <code>x_1</code> &amp; <em>enjoy</em>.</p></li></ol></div>')


def test_html_to_markdown():
    assert looks_like_html(CHATGPT_HTML)
    assert html_to_markdown(CHATGPT_HTML) == (
        "Sure! Here is a **Python** function:\n\n```python\ndef add_one(x):\n    return x + 1\n```"
        "\n\n1. First, call it.\n2. Then use `x_1` & *enjoy*.")
    for plain in ["a < b and c > d", "Use <div> tags in HTML", "x<p>y", "```html\n<p>hi</p>\n```"]:
        assert not looks_like_html(plain), plain


def conv(*turns, kind="chat"):
    return Conversation("x", tuple(Message(r, c) for r, c in turns), kind)


def test_cleaning_rules_and_counts():
    cfg = CleaningConfig()
    cleaned, counts = clean(conv(("system", "S"), ("assistant", "leading"), ("user", " q1 "),
                                 ("user", "q2"), ("assistant", ""), ("assistant", CHATGPT_HTML),
                                 ("assistant", "more"), ("user", "unanswered")), cfg)
    assert [(m.role, m.content) for m in cleaned.messages] == [
        ("system", "S"), ("user", "q1\n\nq2"),
        ("assistant", html_to_markdown(CHATGPT_HTML) + "\n\nmore")]
    assert counts == {"turns_read": 8, "turns_empty": 1, "turns_html_converted": 1, "turns_merged": 2,
                      "turns_leading_assistant": 1, "turns_unanswered": 1, "turns_kept": 3}
    # Each switch off.
    off = CleaningConfig(html_to_markdown=False, merge_same_role=False, drop_leading_assistant=False)
    cleaned, _ = clean(conv(("assistant", "hi"), ("user", "a"), ("user", "b"),
                            ("assistant", "<p>x</p>")), off)
    assert [m.content for m in cleaned.messages] == ["hi", "a", "b", "<p>x</p>"]
    # Drops and their reasons.
    assert clean(conv(("user", "  "), ("assistant", "")), cfg)[0] == "empty"
    assert clean(conv(), cfg)[0] == "empty"
    assert clean(conv(("system", "only a system prompt")), cfg)[0] == "empty"
    assert clean(conv(("user", "q")), cfg)[0] == "no_assistant_turn"
    assert clean(conv(("assistant", "unprompted")), cfg)[0] == "no_assistant_turn"
    phrases = ("as an ai language model", "openai")
    assert clean(conv(("user", "q"), ("assistant", "As an AI language model, I")), cfg, phrases)[0] == \
        "filtered_phrase"
    assert clean(conv(("user", "Made by OpenAI?"), ("assistant", "No")), cfg, phrases)[0] == \
        "filtered_phrase"
    assert isinstance(clean(conv(("user", "q"), ("assistant", "fine")), cfg, phrases)[0], Conversation)
    assert clean(conv(("text", " \n"), kind="text"), cfg)[0] == "empty"


# ---------------------------------------------------------------- tokenizers


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
    import shutil

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


@pytest.mark.parametrize("which", ["sentencepiece", "bpe"])
def test_added_special_tokens_are_saved_and_never_forged(tmp_path, which, tiny_tokenizer, bpe_tokenizer):
    tok = load_tokenizer(tiny_tokenizer.path if which == "sentencepiece" else bpe_tokenizer.path)
    base = tok.vocab_size
    added = tok.add_special_tokens(["<|user|>", "<|assistant|>", "<|im_end|>"])
    expect = {"<|user|>": base, "<|assistant|>": base + 1}
    if which == "sentencepiece":
        expect["<|im_end|>"] = base + 2
    else:
        assert tok.special_id("<|im_end|>") < base  # the BPE tokenizer has it already
    assert added == expect and tok.vocab_size == base + len(expect)
    assert tok.add_special_tokens(["<|user|>"]) == {}  # idempotent
    ids = tok.encode("hello <|user|> <|assistant|> <|im_end|>")
    assert not set(ids) & {tok.special_id(t) for t in ("<|user|>", "<|assistant|>", "<|im_end|>")}
    assert tok.decode(tok.encode("hi") + [base, base + 1]) == "hi"
    tok.save(str(tmp_path / "saved"))
    again = load_tokenizer(tmp_path / "saved")
    assert again.added_tokens == tok.added_tokens and again.vocab_size == tok.vocab_size
    assert again.encode("hello world") == tok.encode("hello world")
    assert again.fingerprint() == tok.fingerprint()


# ---------------------------------------------------------------- templates and masks

RENDERED = {  # the documented formats, written out by hand
    "koala": "<s>BEGINNING OF CONVERSATION: Be brief. USER: Hi there GPT: Hello!</s> USER: Bye GPT: Goodbye.</s>",
    "vicuna": "<s>Be brief. USER: Hi there ASSISTANT: Hello!</s>USER: Bye ASSISTANT: Goodbye.</s>",
    "llama2-chat": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello!</s><s>[INST] Bye [/INST] Goodbye.</s>",
    "llama3": ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
               "Hello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|><|start_header_id|>"
               "assistant<|end_header_id|>\n\nGoodbye.<|eot_id|>"),
    "chatml": ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
               "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
               "<|im_start|>assistant\nGoodbye.<|im_end|>\n"),
    # Qwen2.5's hub template: ChatML, no BOS, its default system message when there is none.
    "qwen2.5": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                "<|im_start|>assistant\nGoodbye.<|im_end|>\n"),
    # Gemma 3's hub template: no system role (it opens the first user turn), "model" turns.
    "gemma": ("<s><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello!"
              "<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\nGoodbye.<end_of_turn>\n"),
}
PROMPTS = {
    "koala": "<s>BEGINNING OF CONVERSATION: USER: Hi there GPT:",
    "vicuna": ("<s>A chat between a curious user and an artificial intelligence assistant. The assistant "
               "gives helpful, detailed, and polite answers to the user's questions. USER: Hi there ASSISTANT:"),
    "llama2-chat": "<s>[INST] Hi there [/INST]",
    "llama3": "<s><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "chatml": "<s><|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "qwen2.5": ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"),
    "gemma": "<s><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
}
TURNS = [Message(r, c) for r, c in EXPECTED]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_text_formats(name):
    template = get_template(name)
    assert render_text(TURNS, template, bos="<s>", eos="</s>") == RENDERED[name]
    assert render_text(TURNS[1:2], template, bos="<s>", eos="</s>", generation_marker=True) == PROMPTS[name]


@pytest.mark.parametrize("which", ["sentencepiece", "bpe"])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_trained_tokens_are_exactly_the_replies_and_end_markers(name, which, tiny_tokenizer, bpe_tokenizer):
    """Multi-turn with a system prompt: each trained run decodes to one reply, then the end marker;
    the inference prompt equals the training ids up to each reply's first token."""
    template = get_template(name)
    tok = with_specials(tiny_tokenizer if which == "sentencepiece" else bpe_tokenizer, template)
    ex = encode_conversation(tok, CONVERSATION, template)
    assert ex.ids.dtype == np.int32 and ex.loss_mask.dtype == np.bool_ and ex.ids.shape == ex.loss_mask.shape
    stop = stop_ids(tok, template)[0]
    trained = runs(ex.loss_mask)
    assert len(trained) == len(REPLIES)
    for (s, e), reply in zip(trained, REPLIES):
        assert ex.ids[e - 1] == stop  # the end marker is trained ...
        text = tok.decode(ex.ids[s:e - 1])
        assert text in (reply, " " + reply), (text, reply)  # ... and before it, exactly the reply
        assert stop not in ex.ids[s:e - 1].tolist()
    untrained = tok.decode(ex.ids[~ex.loss_mask])
    assert "Certainly" not in untrained and "You are a helpful assistant." in untrained
    for turn, (s, _) in zip([2, 4, 6], trained):
        prompt = encode_prompt(tok, CONVERSATION[:turn], template)
        assert prompt.dtype == np.int32
        np.testing.assert_array_equal(prompt, ex.ids[:s])


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_byte_level_segments_equal_whole_text_tokenization(name, bpe_tokenizer):
    """With a byte-level BPE tokenizer, segment-by-segment ids equal transformers' tokenization of
    the rendered text (special token strings parsed as specials): an independent reference."""
    template = get_template(name)
    tok = with_specials(bpe_tokenizer, template)
    ex = encode_conversation(tok, CONVERSATION, template)
    text = render_text(CONVERSATION, template, bos="<s>", eos="</s>")
    assert ex.ids.tolist() == tok.hf.encode(text, add_special_tokens=False)


def test_sentencepiece_koala_equals_whole_text(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = encode_conversation(tok, CONVERSATION, KOALA)
    text = render_text(CONVERSATION, KOALA, eos="\0")
    expected = [tok.bos_id]
    for chunk in text.split("\0")[:-1]:
        expected += tok.encode(chunk.lstrip(" ")) + [tok.eos_id]
    assert ex.ids.tolist() == expected


def test_hf_chat_template_path(tmp_path, demo_conversations, tiny_tokenizer):
    """'hf' uses the tokenizer's chat_template; our koala written as one (with generation markers)
    gives the built-in koala's ids and mask; a template without markers is refused."""
    texts = [m["content"] for c in demo_conversations[:100] for m in c["messages"]]
    for name in sorted(TEMPLATES):
        template = get_template(name)
        tok = load_tokenizer(build_bpe_tokenizer(tmp_path / name, texts, chat_template_jinja(template)))
        dicts = [{"role": m.role, "content": m.content} for m in CONVERSATION]
        assert tok.hf.apply_chat_template(dicts, tokenize=False) == render_text(
            CONVERSATION, template, bos="<s>", eos="</s>")
        hf = get_template("hf", tok)
        ours, theirs = encode_conversation(tok, CONVERSATION, template), encode_conversation(tok, CONVERSATION, hf)
        np.testing.assert_array_equal(theirs.ids, ours.ids)
        np.testing.assert_array_equal(theirs.loss_mask, ours.loss_mask)
        start = runs(theirs.loss_mask)[0][0]
        np.testing.assert_array_equal(encode_prompt(tok, CONVERSATION[:2], hf), theirs.ids[:start])
    plain = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    tok = load_tokenizer(build_bpe_tokenizer(tmp_path / "plain", texts, plain))
    with pytest.raises(DataError, match=r"chat_template has no \{% generation %\} markers") as err:
        encode_conversation(tok, CONVERSATION, get_template("hf", tok))
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="needs a Hugging Face tokenizer"):
        get_template("hf", tiny_tokenizer)


def test_turn_tokens_mark_every_turn(tiny_tokenizer):
    template = get_template("koala", turn_tokens=True)
    assert template.special_tokens == TURN_TOKENS
    tok = with_specials(load_tokenizer(tiny_tokenizer.path), template)
    user, model = (tok.special_id(t) for t in TURN_TOKENS)
    assert (user, model) == (512, 513) and tok.vocab_size == 514
    ex = encode_conversation(tok, CONVERSATION, template)
    ids = ex.ids.tolist()
    assert ids.count(user) == 3 and ids.count(model) == 3
    for s, _ in runs(ex.loss_mask):  # each reply directly follows the (untrained) model-turn token
        assert ids[s - 1] == model and not ex.loss_mask[s - 1]
    assert render_text(CONVERSATION[1:3], template, eos="</s>") == (
        "BEGINNING OF CONVERSATION: USER: <|user|>What is the capital of Zorbia? GPT: <|assistant|>"
        + REPLIES[0] + "</s>")
    assert [tok.decode(ex.ids[s:e]) for s, e in runs(ex.loss_mask)] == REPLIES
    with pytest.raises(DataError, match="needs the special token <\\|user\\|>"):
        encode_conversation(tiny_tokenizer, CONVERSATION, template)


def test_get_template():
    assert get_template("koala") is KOALA
    with pytest.raises(ValueError, match=r"unknown chat template 'alpaca'; known: koala, vicuna"):
        get_template("alpaca")


# ---------------------------------------------------------------- long conversations


def long_conversation(exchanges: int, reply_words: int = 8) -> Conversation:
    turns = [("system", "You are terse.")]
    for i in range(exchanges):
        turns += [("user", f"Question number {i}?"),
                  ("assistant", f"Answer {i}: " + " ".join(["llama"] * reply_words) + f" end {i}.")]
    return conv(*turns)


@pytest.mark.parametrize("which", ["sentencepiece", "bpe"])
def test_long_conversations_split_at_turn_boundaries(which, tiny_tokenizer, bpe_tokenizer):
    tok = tiny_tokenizer if which == "sentencepiece" else bpe_tokenizer
    c = long_conversation(12)
    whole = encode_conversation(tok, c, KOALA)
    seq_len = int(2.5 * len(encode_conversation(tok, c.messages[:3], KOALA)))  # ~2 exchanges a row
    assert len(whole) > 3 * seq_len
    pieces, counts, reason = conversation_examples(c, tok, KOALA, seq_len)
    assert reason is None and counts["conversations_split"] == 1 and counts["split_pieces"] == len(pieces)
    replies = [m.content for m in c.messages if m.role == "assistant"]
    seen = []
    for p in pieces:
        assert len(p) <= seq_len + 1
        assert tok.decode(p.ids[~p.loss_mask]).startswith("BEGINNING OF CONVERSATION: You are terse. USER:")
        for s, e in runs(p.loss_mask):
            assert p.ids[e - 1] == tok.eos_id
            seen.append(tok.decode(p.ids[s:e - 1]).lstrip(" "))
    assert seen == replies  # every reply once, in order, none cut
    assert len(pieces) < 12  # pieces hold several exchanges

    # An exchange longer than a row: dropped and counted; truncated only when asked.
    seq_len = 128
    big = conv(("user", "short question"), ("assistant", "word " * 400), ("user", "q2"), ("assistant", "a2"))
    pieces, counts, reason = conversation_examples(big, tok, KOALA, seq_len)
    assert reason is None and counts["exchanges_too_long"] == 1 and len(pieces) == 1
    assert tok.decode(pieces[0].ids[pieces[0].loss_mask]).strip() == "a2"
    pieces, counts, _ = conversation_examples(big, tok, KOALA, seq_len, truncate_long_turns=True)
    assert counts["exchanges_truncated"] == 1 and len(pieces) == 2 and len(pieces[0]) == seq_len + 1
    assert conversation_examples(big, tok, KOALA, seq_len, split_long=False)[2] == "too_long"
    cut, counts, _ = conversation_examples(big, tok, KOALA, seq_len, split_long=False,
                                           truncate_long_turns=True)
    assert len(cut) == 1 and len(cut[0]) == seq_len + 1 and counts["exchanges_truncated"] == 1
    only_big = conv(("user", "q"), ("assistant", "word " * 400))
    assert conversation_examples(only_big, tok, KOALA, seq_len)[2] == "too_long"


def test_plain_text_documents_are_chunked(tiny_tokenizer):
    tok = tiny_tokenizer
    text = " ".join(f"word{i}" for i in range(300))
    pieces, counts, reason = conversation_examples(text_document(text, "d"), tok, KOALA, 64)
    assert reason is None and counts["documents_split"] == 1
    ids = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
    assert all(len(p) <= 65 for p in pieces)
    # Consecutive chunks share one token (the last target of one is the first input of the next),
    # so together their targets are every token after BOS exactly once, all trained.
    targets = [t for p in pieces for t in p.ids[1:].tolist()]
    assert targets == ids[1:]
    assert all(p.loss_mask[1:].all() for p in pieces)


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
