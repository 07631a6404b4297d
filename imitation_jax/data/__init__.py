"""Training data: conversation formats, tokenizers, chat templates, packing and batch loading.

file -> formats (Conversation) -> templates (Example: ids + loss mask) -> rows (packed, shifted)
     -> loader (this process's slice of each global batch).
"""

from imitation_jax.data.formats import (
    Conversation, DataError, Message, parse_messages, read_messages_jsonl)
from imitation_jax.data.loader import BatchLoader
from imitation_jax.data.rows import FIELDS, PackStats, Rows, pack_examples
from imitation_jax.data.templates import (
    TEMPLATES, Example, Template, encode_conversation, encode_prompt, get_template,
    render_text)
from imitation_jax.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "FIELDS", "TEMPLATES", "BatchLoader", "Conversation", "DataError", "Example", "Message",
    "PackStats", "Rows", "Template", "Tokenizer", "encode_conversation", "encode_prompt",
    "get_template", "load_tokenizer", "pack_examples", "parse_messages", "read_messages_jsonl",
    "render_text",
]
