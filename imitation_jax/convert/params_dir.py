"""The params checkpoint dir that `import-hf` writes (and `load_model` / `init.checkpoint` read):

    CKPT_DIR/model.json   {"format", "model": our ModelConfig fields, "template": {"name",
                          "turn_tokens"}, "source": the HF dir it came from}
    CKPT_DIR/params/      Orbax params (StandardCheckpointer), our layout
    CKPT_DIR/tokenizer/   the tokenizer (Tokenizer.save), when the HF dir had one

`init.checkpoint=CKPT_DIR` finds params/ by itself (checkpoint.resolve_params_path).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from imitation_jax.errors import CheckpointError
from imitation_jax.model.config import ModelConfig, RopeScaling

MODEL_FILE = "model.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
FORMAT = "imitation_jax.params/1"


def is_params_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_FILE)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


def model_config_from_dict(fields: dict) -> ModelConfig:
    fields = dict(fields)
    if fields.get("rope_scaling"):
        fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    return ModelConfig(**fields)


def write_meta(path: str, cfg: ModelConfig, template: Optional[dict], source: str) -> None:
    meta = {"format": FORMAT, "model": dataclasses.asdict(cfg), "template": template, "source": source}
    with open(os.path.join(path, MODEL_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def read_meta(path: str) -> tuple[ModelConfig, dict]:
    """(model config, the whole record) of a params dir's model.json."""
    meta_path = os.path.join(path, MODEL_FILE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        return model_config_from_dict(meta["model"]), meta
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{meta_path}: not a readable model record ({str(exc).splitlines()[0][:200]})") from None


def read(path: str) -> tuple[ModelConfig, Any, Any]:
    """(model config, tokenizer, template) of a params dir."""
    from imitation_jax.data.templates import get_template
    from imitation_jax.data.tokenizer import load_tokenizer
    from imitation_jax.data.prepare import DEFAULT_TEMPLATE

    cfg, meta = read_meta(path)
    tok_dir = os.path.join(path, TOKENIZER_DIR)
    if not os.path.isdir(tok_dir):
        raise CheckpointError(f"{path}: no tokenizer/ directory (the HF dir it came from had no tokenizer)")
    tokenizer = load_tokenizer(tok_dir)
    t = meta.get("template") or {}
    template = get_template(t.get("name") or DEFAULT_TEMPLATE, tokenizer, turn_tokens=bool(t.get("turn_tokens")))
    return cfg, tokenizer, template
