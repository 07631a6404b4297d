"""Training data: formats, cleaning, chat templates and masks, packing, prepared sets, loading.

    files --readers/formats--> Conversation --cleaning--> Conversation
          --templates/examples--> Example (ids + loss mask, split to fit a row)
          --packing--> packed rows --storage--> ArrayRecord (tfds) prepared set
          --loader--> this process's slice of each global batch

`prepare` (imitation-jax prepare) makes a prepared set; `load_training_data` opens one for
training (preparing raw files into a cache first). Names are imported lazily, so worker processes
and the CLI import only what they use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "formats": ["Conversation", "DataError", "Message", "parse_messages"],
    "readers": ["Source", "iter_conversations", "read_conversations", "read_messages_jsonl"],
    "cleaning": ["CleaningConfig", "clean"],
    "tokenizer": ["Tokenizer", "load_tokenizer"],
    "templates": ["TEMPLATES", "Example", "Template", "chat_template_jinja", "encode_conversation",
                  "encode_prompt", "get_template", "render_text", "stop_ids"],
    "packing": ["FIELDS", "PACKING", "PackStats", "Rows", "assemble", "pack", "pack_examples"],
    "storage": ["PreparedSet", "PreparedSplit"],
    "prepare": ["PrepareSettings", "summary"],  # the function: imitation_jax.data.prepare.prepare
    "loader": ["BatchLoader", "Subset", "cap_trained_tokens"],
    "training": ["TrainingData", "load_training_data"],
    "build": ["build_rows"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"imitation_jax.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'imitation_jax.data' has no attribute {name!r}")
