"""Growing the vocabulary of loaded parameters (special tokens added by `prepare` on top of a
base model's tokenizer).

New rows are drawn like the model's own init, normal(0, initializer_range), from a generator
seeded by (seed, which table), so every process and every shard layout gets the same rows. Small
random rows keep the new tokens' logits near zero at the start instead of copying any old token.
"""

from __future__ import annotations

import zlib

import numpy as np


def new_rows(old: int, new: int, width: int, std: float, seed: int, table: str) -> np.ndarray:
    """(new - old, width) float32 rows for ids old..new-1 of `table` ('embed' or 'lm_head')."""
    rng = np.random.default_rng([seed, zlib.crc32(table.encode()), old, new])
    return (rng.standard_normal((new - old, width), dtype=np.float32) * std).astype(np.float32)


def grow_params(params: dict, cfg, old_vocab: int, seed: int) -> dict:
    """`params` (pure dict of jax.Arrays with `old_vocab` rows) grown to `cfg.vocab_size`, each
    grown table keeping its sharding."""
    import jax
    import jax.numpy as jnp

    from imitation_jax.sharding import tree_shardings
    from imitation_jax.train.state import model_graph

    if cfg.vocab_size == old_vocab:
        return params
    _, shapes, names = model_graph(cfg)
    shardings = tree_shardings(shapes, names, jax.tree.leaves(params)[0].sharding.mesh)
    out = dict(params)
    for table, axis in (("embed", 0), ("lm_head", 1)):
        if table not in params:
            continue
        rows = new_rows(old_vocab, cfg.vocab_size, cfg.hidden_size, cfg.initializer_range, seed, table)
        rows = rows if axis == 0 else rows.T
        out[table] = jax.jit(lambda t, r: jnp.concatenate([t, r.astype(t.dtype)], axis=axis),
                             out_shardings=shardings[table])(params[table], rows)
    return out
