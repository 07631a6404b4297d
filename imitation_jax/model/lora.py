"""LoRA adapters (Hu et al. 2021): each targeted projection W gets a low-rank update,
y = x W + (alpha / rank) * (dropout(x) A) B, with A (in..., rank) drawn like PEFT's default
(Kaiming-uniform, bound 1/sqrt(fan_in)) and B (rank, out...) zero, so step 0 equals the base.

The adapters are separate parameters of the same model tree, next to the weight they adapt
(`layers/attn/q` -> `layers/attn/q_lora_a`, `q_lora_b`), stacked over layers like it. A is
sharded like W's input axes and B like W's output axes, the rank axis replicated. Adapters are
float32 whatever the base's dtype. The frozen base gets no gradient and no optimizer state: the
train step differentiates the adapter subtree only (`split` / `combine`).

Dropout needs a key per step inside the model: a `LoraKey` variable per attention and MLP block
(stacked over layers) that the train step fills from (seed, step, micro-batch). All-zero keys
(evaluation, generation) mean no dropout.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# PEFT's module names for our targets (LLaMA in transformers).
PEFT_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj",
                "up": "up_proj", "down": "down_proj"}
SUFFIX_A, SUFFIX_B, KEY = "_lora_a", "_lora_b", "lora_key"
ADAPTER_DTYPE = jnp.float32


@dataclasses.dataclass
class LoraConfig:
    rank: int = 0  # 0: no adapters (full fine-tuning)
    alpha: float = 16.0  # the update is scaled by alpha / rank (PEFT's lora_alpha)
    dropout: float = 0.0  # on the adapter's input, training only (PEFT's lora_dropout)
    targets: list[str] = dataclasses.field(default_factory=lambda: list(TARGETS))
    # QLoRA: the frozen base's seven projections stored int8 or nf4 (model/quant.py); None: as loaded
    base_quant: Optional[str] = None

    def __post_init__(self) -> None:
        if self.base_quant not in (None, "int8", "nf4"):
            raise ValueError(f"model.lora.base_quant={self.base_quant!r} is not one of int8, nf4 (or null)")
        if self.base_quant and not self.rank:
            raise ValueError(f"model.lora.base_quant={self.base_quant} quantizes a LoRA base: set model.lora.rank > 0")
        if self.rank < 0:
            raise ValueError(f"model.lora.rank={self.rank} must be >= 0 (0: no adapters)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout={self.dropout} must be in [0, 1)")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or (self.rank and not self.targets):
            raise ValueError(f"model.lora.targets={list(self.targets)} must be a non-empty subset of "
                             f"{', '.join(TARGETS)}")
        if self.alpha <= 0:
            raise ValueError(f"model.lora.alpha={self.alpha} must be > 0")

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def targets_(self, name: str) -> bool:
        return self.enabled and name in self.targets


class LoraKey(nnx.Variable):
    """Raw key data (uint32[2]) for adapter dropout; not a parameter, never trained or saved."""


def adapter_params(rngs: nnx.Rngs, in_shape, in_names, out_shape, out_names, rank: int) -> tuple[nnx.Param, nnx.Param]:
    """(A, B) for a weight of shape in_shape + out_shape: A (in..., rank) uniform(+-1/sqrt(fan_in)),
    B (rank, out...) zeros; logical names follow the weight's, the rank axis replicated."""
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    a = jax.random.uniform(rngs.params(), (*in_shape, rank), ADAPTER_DTYPE, -bound, bound)
    b = jnp.zeros((rank, *out_shape), ADAPTER_DTYPE)
    return (nnx.Param(a, out_sharding=(*in_names, None), eager_sharding=False),
            nnx.Param(b, out_sharding=(None, *out_names), eager_sharding=False))


def dropout_key(rank: int, rate: float) -> LoraKey | None:
    return LoraKey(jnp.zeros((2,), jnp.uint32)) if rank and rate > 0 else None


def update(x: jax.Array, a: jax.Array, b: jax.Array, scale: float, dtype, key: LoraKey | None = None,
           rate: float = 0.0, salt: int = 0) -> jax.Array:
    """scale * (dropout(x) A) B for x (..., in...) with len(in) = a.ndim - 1; returns (..., out...)."""
    n_in = a.ndim - 1
    lead = x.shape[:x.ndim - n_in]
    x2 = x.reshape(math.prod(lead), -1)
    if key is not None and rate > 0:
        data = key[...]
        keep = jax.random.bernoulli(jax.random.fold_in(jax.random.wrap_key_data(data), salt), 1.0 - rate, x2.shape)
        x2 = jnp.where(jnp.any(data != 0), jnp.where(keep, x2 / (1.0 - rate), 0).astype(x2.dtype), x2)
    h = x2 @ a[...].astype(dtype).reshape(-1, a.shape[-1])
    out = (h @ (b[...].astype(dtype) * jnp.asarray(scale, dtype)).reshape(b.shape[0], -1))
    return out.reshape(*lead, *b.shape[1:])


# ------------------------------------------------------------------------------------ trees


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def is_adapter(name: str) -> bool:
    return name.endswith((SUFFIX_A, SUFFIX_B))


def _select(tree: dict, keep) -> dict:
    """The nested-dict subtree of leaves whose leaf name passes `keep` (empty branches dropped)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = _select(v, keep)
            if sub:
                out[k] = sub
        elif keep(str(k)):
            out[k] = v
    return out


def split(params: dict) -> tuple[dict, dict]:
    """(adapters, frozen): the trained subtree and the rest (the base and any dropout keys)."""
    return _select(params, is_adapter), _select(params, lambda n: not is_adapter(n))


def base_only(params: dict) -> dict:
    """The base's weights (quantized ones as codes and scales): neither adapters nor dropout keys."""
    return _select(params, lambda n: not is_adapter(n) and n != KEY)


def keys_only(params: dict) -> dict:
    return _select(params, lambda n: n == KEY)


def combine(*trees: dict) -> dict:
    """Disjoint nested dicts merged into one (no copies of the leaves)."""
    out: dict = {}
    for tree in trees:
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = combine(out.get(k, {}), v)
            else:
                out[k] = v
    return out


def fill_keys(frozen: dict, key: jax.Array) -> dict:
    """`frozen` with each LoraKey leaf (stacked: (layers, 2)) replaced by keys drawn from `key`
    (a typed key), a different one per leaf and layer."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(frozen)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        if _leaf_name(path) == KEY:
            keys = jax.random.split(jax.random.fold_in(key, i), leaf.shape[:-1] or None)
            data = jax.random.key_data(keys).astype(jnp.uint32)
            out.append(data.reshape(leaf.shape) | jnp.uint32(1))  # never all-zero: zero means "off"
        else:
            out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def merged(params: dict, cfg: LoraConfig) -> dict:
    """The base weights with each adapter's update folded in (W + scale * A B, in W's dtype);
    adapters and dropout keys dropped: a plain model's params."""
    base = base_only(params)
    adapters = split(params)[0]

    def walk(node_base: dict, node_ad: dict) -> dict:
        out = {}
        for k, v in node_base.items():
            if isinstance(v, dict):
                out[k] = walk(v, node_ad.get(k, {}))
            elif k + SUFFIX_A in node_ad:
                out[k] = fold(v, node_ad[k + SUFFIX_A], node_ad[k + SUFFIX_B], cfg.scale)
            else:
                out[k] = v
        return out

    return walk(base, adapters)


def fold(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """w + scale * a b for stacked (layers, ...) or single weights, in float32 then w's dtype."""
    stacked = (a.ndim - 1) + (b.ndim - 1) == w.ndim + 1  # both carry a layer axis
    lead = w.shape[:1] if stacked else ()
    r = a.shape[-1]
    a2 = a.astype(jnp.float32).reshape(*lead, -1, r)
    b2 = b.astype(jnp.float32).reshape(*lead, r, -1)
    delta = jnp.matmul(a2, b2).reshape(w.shape)
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def count(params: Any) -> int:
    """Number of adapter parameters in a tree."""
    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(split(params)[0]))
