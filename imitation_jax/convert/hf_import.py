"""HF dir (LLaMA or another family of convert/hf_config.py) -> our parameters, streamed: every device shard of every parameter is filled by
reading just the HF tensors (or tensor slices) it covers, one at a time, so a process never holds
more than its own shards plus one tensor. Used by `import-hf`, `init.hf` and `load_model`.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from imitation_jax.errors import CheckpointError
from imitation_jax.convert import hf_config, hf_layout
from imitation_jax.convert.hf_config import model_config_from_dir
from imitation_jax.convert.safetensors_io import WeightFiles
from imitation_jax.model.params import new_rows
from imitation_jax.model.config import ModelConfig


def read_hf_config(directory: str, dtype: str = "float32") -> ModelConfig:
    return model_config_from_dir(directory, dtype)


def hf_tokenizer(directory: str):
    from imitation_jax.data.tokenizer import load_tokenizer

    if not any(os.path.isfile(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer.model")):
        raise CheckpointError(f"{directory}: no tokenizer.json or tokenizer.model")
    return load_tokenizer(directory)


def hf_template(tokenizer) -> Any:
    """The built-in template whose HF rendering is the tokenizer's chat_template (what export-hf
    writes), else the chat_template itself ('hf'), else koala."""
    from imitation_jax.data.templates import TEMPLATES, get_template

    name_turns = template_of(tokenizer)
    if name_turns is not None:
        return get_template(name_turns[0], tokenizer, turn_tokens=name_turns[1])
    if has_chat_template(tokenizer):
        # With or without {% generation %} markers: only a training mask needs them.
        return get_template("hf", tokenizer)
    return TEMPLATES["koala"]


def has_chat_template(tokenizer) -> bool:
    source = getattr(getattr(tokenizer, "hf", None), "chat_template", None)
    return isinstance(source, str) and bool(source.strip())


def template_of(tokenizer) -> Optional[tuple[str, bool]]:
    """(built-in template name, turn_tokens) whose jinja equals the tokenizer's chat_template."""
    from imitation_jax.data.templates import TEMPLATES, chat_template_jinja

    source = getattr(getattr(tokenizer, "hf", None), "chat_template", None)
    if not isinstance(source, str):
        return None
    for name, template in TEMPLATES.items():
        for turns in (False, True):
            for spaces in (False, True):  # as exported for the tokenizer's kind
                if chat_template_jinja(template.with_turn_tokens() if turns else template, spaces) == source:
                    return name, turns
    return None


def check_tensors(files: WeightFiles, cfg: ModelConfig, vocab_rows: int) -> None:
    """Missing, unexpected or mis-shaped tensors -> one line naming the first."""
    where = files.directory
    expected = {}
    for entry in hf_layout.iter_layout(cfg):
        for name in hf_layout.hf_names(entry, cfg):
            expected[name] = hf_layout.hf_shape(entry, cfg, vocab_rows)
    present = files.names()
    for name, shape in expected.items():
        if name not in present:
            raise CheckpointError(f"{where}: tensor '{name}' is missing (config.json: {cfg.num_layers} layers, "
                                  f"tie_word_embeddings={str(cfg.tie_word_embeddings).lower()})")
        if files.shape(name) != shape:
            raise CheckpointError(f"{where}: tensor '{name}' has shape {list(files.shape(name))} but config.json "
                                  f"implies {list(shape)}")
    for name in sorted(present - set(expected)):
        if name.endswith(hf_layout.IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # some tied checkpoints store the shared matrix twice
        raise CheckpointError(f"{where}: unexpected tensor '{name}' (not part of a {hf_config.ARCH[cfg.family]} "
                              f"with this config.json)")


def load_hf_params(directory: str, cfg: ModelConfig, mesh, *, allow_pickle: bool = False,
                   hf_vocab: Optional[int] = None, seed: int = 0) -> dict:
    """Our sharded parameter tree (pure dict of jax.Arrays on `mesh`) for the HF weights in
    `directory`. `cfg.vocab_size` may exceed the checkpoint's rows (`hf_vocab`, default
    config.json's): the extra embedding/lm_head rows are initialised by `vocab.new_rows`."""
    out: dict = {}
    for path, array in iter_hf_params(directory, cfg, mesh, allow_pickle=allow_pickle, hf_vocab=hf_vocab,
                                      seed=seed):
        _set(out, path, array)
    return out


def iter_hf_params(directory: str, cfg: ModelConfig, mesh, *, allow_pickle: bool = False,
                   hf_vocab: Optional[int] = None, seed: int = 0):
    """(our path, sharded jax.Array) one parameter at a time (checked against config.json first)."""
    import jax

    from imitation_jax.sharding import tree_shardings
    from imitation_jax.model.params import model_graph

    _, shapes, names = model_graph(cfg)
    shardings = tree_shardings(shapes, names, mesh)
    for path, shape, reader in hf_readers(directory, cfg, allow_pickle=allow_pickle, hf_vocab=hf_vocab,
                                          seed=seed):
        yield path, jax.make_array_from_callback(shape, _get(shardings, path), reader)


def hf_readers(directory: str, cfg: ModelConfig, *, allow_pickle: bool = False, hf_vocab: Optional[int] = None,
               seed: int = 0):
    """(our path, our shape, read(index) -> numpy in our layout and dtype) per parameter, after
    checking the tensors against config.json."""
    from imitation_jax.model.params import model_graph

    files = WeightFiles(directory, allow_pickle=allow_pickle)
    if hf_vocab is None:
        hf_vocab = read_hf_config(directory).vocab_size
    check_tensors(files, cfg, hf_vocab)
    _, shapes, _ = model_graph(cfg)
    dtype = np.dtype(cfg.weight_dtype)
    for entry in hf_layout.iter_layout(cfg):
        shape = _get(shapes, entry.path).shape
        yield entry.path, shape, _reader(files, entry, cfg, shape, dtype, hf_vocab, seed)


def _reader(files: WeightFiles, entry, cfg: ModelConfig, shape, dtype, hf_vocab: int, seed: int):
    layered = "{i}" in entry.hf_name
    vocab_axis = {"same": 0, "transpose": 1}.get(entry.kind) if entry.path[0] in ("embed", "lm_head") else None

    def piece(name: str, index: tuple[slice, ...], our_shape) -> np.ndarray:
        hf_idx = hf_layout.hf_index(entry.kind, index, our_shape, cfg)
        return hf_layout.to_ours(entry.kind, files.get(name, hf_idx), cfg).astype(dtype, copy=False)

    def read(index: tuple[slice, ...]) -> np.ndarray:
        if layered:
            layers = range(*index[0].indices(shape[0]))
            out = None
            for k, i in enumerate(layers):  # filled in place: one stacked copy, not two
                layer = piece(entry.hf_name.format(i=i), index[1:], shape[1:])
                if out is None:
                    out = np.empty((len(layers), *layer.shape), dtype)
                out[k] = layer
            return out
        if vocab_axis is None or shape[vocab_axis] == hf_vocab:
            return piece(entry.hf_name, index, shape)
        # Vocab grown past the checkpoint: rows < hf_vocab come from it, the rest are new.
        lo, hi = index[vocab_axis].indices(shape[vocab_axis])[:2]
        parts = []
        if lo < hf_vocab:
            old = list(index)
            old[vocab_axis] = slice(lo, min(hi, hf_vocab))
            parts.append(piece(entry.hf_name, tuple(old), _with(shape, vocab_axis, hf_vocab)))
        if hi > hf_vocab:
            fresh = new_rows(hf_vocab, shape[vocab_axis], shape[1 - vocab_axis], cfg.initializer_range,
                             seed, entry.path[0])
            other = index[1 - vocab_axis]
            fresh = fresh[max(lo, hf_vocab) - hf_vocab:hi - hf_vocab][:, other]
            parts.append((fresh if vocab_axis == 0 else fresh.T).astype(dtype))
        return np.concatenate(parts, axis=vocab_axis)

    return read


def _with(shape, axis, value):
    shape = list(shape)
    shape[axis] = value
    return tuple(shape)


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def import_hf(directory: str, out: str, *, dtype: str = "float32", allow_pickle: bool = False) -> dict:
    """`imitation-jax import-hf`: HF dir -> params checkpoint dir (layout in params_dir)."""
    from imitation_jax.convert import params_dir

    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such directory")
    cfg = read_hf_config(directory, dtype)
    tokenizer = None
    if any(os.path.isfile(os.path.join(directory, f)) for f in ("tokenizer.json", "tokenizer.model")):
        tokenizer = hf_tokenizer(directory)
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    save_streamed(os.path.join(out, params_dir.PARAMS_DIR), cfg,
                  hf_readers(directory, cfg, allow_pickle=allow_pickle))
    template = None
    if tokenizer is not None:
        tokenizer.save(os.path.join(out, params_dir.TOKENIZER_DIR))
        found = template_of(tokenizer)
        template = {"name": found[0], "turn_tokens": found[1]} if found else (
            {"name": "hf", "turn_tokens": False} if has_chat_template(tokenizer) else None)
    params_dir.write_meta(out, cfg, template, directory)
    return {"out": out, "config": cfg, "tokenizer": tokenizer is not None}


def save_streamed(item_dir: str, cfg: ModelConfig, readers) -> None:
    """An Orbax params item written one chunk (one layer of a stacked parameter, a block of the
    embedding) at a time (layered_io), so only that much is in memory; readable by
    checkpoint.restore_params like any other."""
    import shutil

    from imitation_jax.convert.layered_io import Lazy, save_layered

    tree: dict = {}
    for path, shape, read in readers:
        _set(tree, path, Lazy(shape, cfg.weight_dtype, read, stacked=path[0] == "layers"))
    shutil.rmtree(item_dir, ignore_errors=True)
    save_layered(item_dir, tree)
