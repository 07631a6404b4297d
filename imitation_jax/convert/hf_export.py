"""Our model -> an HF dir of its family (LLaMA, Qwen2, Qwen3, Mistral, Gemma 3) that `AutoModelForCausalLM` / `AutoTokenizer` (and vLLM) load:
config.json, generation_config.json, model-0000k-of-0000n.safetensors + index, tokenizer files
(added special tokens included) and the training template as `chat_template`.

Tensors are read from the checkpoint one HF tensor (one layer of one parameter) at a time, the
embedding and lm_head by row blocks (layered_io.LayerReader), and written by a ShardedWriter as they
come, so export holds one layer or one block, never a whole shard or vocab-sized matrix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Optional

import numpy as np

from imitation_jax.errors import CheckpointError
from imitation_jax.convert import hf_layout
from imitation_jax.convert.hf_config import hf_config_dict
from imitation_jax.convert.layered_io import LayerReader
from imitation_jax.convert.safetensors_io import ShardedWriter, parse_size

DTYPES = ("bfloat16", "float16", "float32")


def export_hf(loaded: Any, out: str, *, dtype: str = "bfloat16", max_shard_size: str | int = "5GB") -> dict:
    """Write `loaded` (a `loading.SavedModel`, read one parameter at a time, or a `LoadedModel`;
    `loading.open_model` gives the right one for a path) as an HF dir of its family at `out`."""
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype}: not one of {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    out = os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, "config.json")):
        raise CheckpointError(f"{out}: exists and is not an HF model dir; refusing to write into it")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):  # a previous export's shards would confuse the index
        if name.endswith(".safetensors") or name == "model.safetensors.index.json":
            os.remove(os.path.join(out, name))
    tokenizer = loaded.tokenizer
    params = getattr(loaded, "params", None)
    if params is None:
        params = LayerReader(loaded.params_item)
    files = write_weights(loaded.config, params, out, np.dtype(dtype) if dtype != "bfloat16"
                          else _bf16(), max_bytes)
    hf_tok = save_tokenizer(tokenizer, loaded.template, out)
    config = hf_config_dict(loaded.config, dtype, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    write_generation_config(out, tokenizer, loaded.template)
    return {"out": out, "source": loaded.source, "shards": files, "vocab_size": loaded.config.vocab_size,
            "tokenizer_vocab": len(hf_tok)}


def _bf16():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def hf_plan(cfg):
    """(HF name, layout entry, layer or None) in HF's order, parameter-major over layers."""
    globals_ = {e.hf_name: e for e in hf_layout.iter_layout(cfg) if "{i}" not in e.hf_name}
    out = [("model.embed_tokens.weight", globals_["model.embed_tokens.weight"], None)]
    out += [(e.hf_name.format(i=i), e, i) for e in hf_layout.layer_layout(cfg) for i in range(cfg.num_layers)]
    return out + [(name, globals_[name], None) for name in ("model.norm.weight", "lm_head.weight")
                  if name in globals_]


ROW_BLOCK_BYTES = 128 << 20  # the embedding and lm_head (1 GB each in LLaMA-3-8B's bf16) in row blocks


def hf_blocks(cfg, params, out_dtype: Optional[np.dtype] = None):
    """(HF name, iterator of HF-layout row blocks) in HF's order: one layer of one parameter at a
    time, and the vocab-sized tensors by row blocks of at most ROW_BLOCK_BYTES (as read and as
    written in `out_dtype`), so export never holds a whole embedding or output layer."""
    def node(path):
        value = params
        for key in path:
            value = value[key]
        return value

    def get(path, layer=None):
        if isinstance(params, LayerReader):
            return params.get(path, layer)
        value = node(path)
        return np.asarray(value[layer] if layer is not None else value)

    def get_block(path, index):
        if isinstance(params, LayerReader):
            return params.get_block(path, index)
        return np.asarray(node(path)[index])

    def dtype_of(path):
        return params.dtype(path) if isinstance(params, LayerReader) else np.dtype(node(path).dtype)

    def rows(e):
        vocab, d = hf_layout.hf_shape(e, cfg, cfg.vocab_size)
        itemsize = max(dtype_of(e.path).itemsize, np.dtype(out_dtype or np.float32).itemsize)
        step = max(1, ROW_BLOCK_BYTES // (d * itemsize))
        for a in range(0, vocab, step):
            rows_ = slice(a, min(vocab, a + step))
            # Ours is (vocab, d) for the embedding ("same"), (d, vocab) for lm_head ("transpose").
            index = (rows_, slice(None)) if e.kind == "same" else (slice(None), rows_)
            yield hf_layout.to_hf(e.kind, get_block(e.path, index), cfg)

    for name, e, layer in hf_plan(cfg):
        if e.path[0] in ("embed", "lm_head"):
            yield name, rows(e)
        else:
            yield name, iter([hf_layout.to_hf(e.kind, get(e.path, layer), cfg)])


def hf_tensors(cfg, params):
    """(HF name, numpy array in HF layout) in HF's order, one tensor at a time."""
    for name, blocks in hf_blocks(cfg, params):
        blocks = list(blocks)
        yield name, blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def write_weights(cfg, params: dict, out: str, dtype: np.dtype, max_bytes: int) -> list[str]:
    plan = [(name, hf_layout.hf_shape(e, cfg, cfg.vocab_size), dtype) for name, e, _ in hf_plan(cfg)]
    writer = ShardedWriter(out, max_bytes, plan)
    for name, blocks in hf_blocks(cfg, params, dtype):
        writer.add_blocks(name, (block.astype(dtype, copy=False) for block in blocks))
    return writer.close()


def chat_template_for(template: Any, tokenizer) -> Optional[str]:
    from imitation_jax.data.templates import HFChatTemplate, chat_template_jinja

    if isinstance(template, HFChatTemplate):
        return template.tokenizer.hf.chat_template
    return chat_template_jinja(template, prepends_space=tokenizer.prepends_space)


def save_tokenizer(tokenizer, template, out: str):
    """The transformers tokenizer with our added special tokens at their ids, bos/eos/pad and the
    chat template, saved into `out`; returns it."""
    from transformers import AutoTokenizer

    if tokenizer.kind == "sentencepiece":
        # transformers converts a LLaMA-style SentencePiece model into its fast tokenizer.
        tmp = tempfile.mkdtemp()
        try:
            shutil.copy(tokenizer.path, os.path.join(tmp, "tokenizer.model"))
            with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
                json.dump({"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                           "legacy": True}, f)
            hf = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        hf = AutoTokenizer.from_pretrained(tokenizer.path, local_files_only=True)
    if len(hf) != tokenizer.base_vocab_size:
        raise CheckpointError(f"{tokenizer.path}: transformers sees {len(hf)} tokens, we see "
                              f"{tokenizer.base_vocab_size}")
    added = sorted(tokenizer.added_tokens.items(), key=lambda kv: kv[1])
    if added:
        hf.add_special_tokens({"additional_special_tokens": [t for t, _ in added]},
                              replace_extra_special_tokens=False)
        for token, i in added:
            if hf.convert_tokens_to_ids(token) != i:
                raise CheckpointError(f"{tokenizer.path}: added token {token!r} got id "
                                      f"{hf.convert_tokens_to_ids(token)} in transformers, not {i}")
    ids = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id}
    for key, i in ids.items():
        if i is not None:
            setattr(hf, key, hf.convert_ids_to_tokens(i))
    hf.chat_template = chat_template_for(template, tokenizer)
    hf.model_max_length = 1 << 30
    hf.save_pretrained(out)
    if tokenizer.kind == "sentencepiece":
        # transformers' LlamaTokenizer class re-adds its own prefix-space rules on top of
        # tokenizer.json (no "▁" after a special token); the plain fast class uses tokenizer.json as
        # converted, which splits text the way SentencePiece (and so training) did.
        path = os.path.join(out, "tokenizer_config.json")
        with open(path) as f:
            config = json.load(f)
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
    return hf


def write_generation_config(out: str, tokenizer, template) -> None:
    from transformers import GenerationConfig

    from imitation_jax.data.templates import stop_ids

    stops = stop_ids(tokenizer, template)
    GenerationConfig(bos_token_id=tokenizer.bos_id, eos_token_id=stops if len(stops) > 1 else stops[0],
                     pad_token_id=tokenizer.pad_id).save_pretrained(out)
