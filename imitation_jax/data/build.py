"""In-memory rows from conversation files, without cleaning or a prepared set (tests, quick looks).

Training goes through `prepare` / `load_training_data`; this reads the files strictly (the first
bad record raises), renders them with a template and packs them in memory.
"""

from __future__ import annotations

from typing import Sequence

from imitation_jax.data.packing import Rows, pack_examples
from imitation_jax.data.readers import read_conversations
from imitation_jax.data.templates import encode_conversation, get_template
from imitation_jax.data.tokenizer import Tokenizer


def build_rows(files: Sequence[str], tokenizer: Tokenizer, template: str, seq_len: int,
               pack: bool | str = True) -> Rows:
    tmpl = get_template(template, tokenizer)
    examples = (encode_conversation(tokenizer, conv, tmpl) for conv in read_conversations(files))
    return pack_examples(examples, seq_len, tokenizer.pad_id, pack=pack)
