"""AdamW with warmup + decay, global-norm clipping and no weight decay on norms or embeddings."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass
class OptimConfig:
    lr: float = 3e-4
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_steps: int = 100
    end_lr_ratio: float = 0.1  # final lr = lr * end_lr_ratio
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norms and embeddings
    clip_norm: float = 1.0  # global-norm clipping; 0 disables


def learning_rate_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.end_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.end_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def decay_mask(params) -> object:
    """True for weight matrices only: norms and the token embedding are not decayed."""
    def keep(path, leaf):
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        return "embed" not in names and not any(n.endswith("norm") for n in names)

    return jax.tree_util.tree_map_with_path(keep, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm's result (to rounding) as a multiply by one scalar: XLA does not
    duplicate an elementwise divide into the moment and parameter updates that read the gradient,
    so optax's `t / norm` wrote a clipped copy of every gradient (a 1.2B model: 4.6 GiB more)."""
    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))  # a zero norm: inf -> 1
        return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(cfg, total_steps)
    chain = [clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    chain.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*chain), schedule
