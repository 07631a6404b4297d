"""From conversation files to packed rows: read, render with the template, tokenize, pack."""

from __future__ import annotations

from typing import Sequence

from imitation_jax.data.formats import read_messages_jsonl
from imitation_jax.data.rows import Rows, pack_examples
from imitation_jax.data.templates import encode_conversation, get_template
from imitation_jax.data.tokenizer import Tokenizer


def build_rows(files: Sequence[str], tokenizer: Tokenizer, template: str, seq_len: int, pack: bool = True) -> Rows:
    tmpl = get_template(template)
    examples = (encode_conversation(tokenizer, conv, tmpl) for path in files for conv in read_messages_jsonl(path))
    return pack_examples(examples, seq_len, tokenizer.pad_id, pack=pack)
