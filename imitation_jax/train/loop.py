"""`train(cfg)`: the training run from a resolved Config to metrics and a final checkpoint."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from imitation_jax import checkpoint
from imitation_jax.config import Config, ConfigError, save_resolved
from imitation_jax.data.loader import BatchLoader
from imitation_jax.data.training import load_training_data
from imitation_jax.model import ModelConfig
from imitation_jax.sharding import batch_sharding, make_mesh
from imitation_jax.train.flops import peak_flops_per_device
from imitation_jax.train.metrics import MetricsLogger
from imitation_jax.train.optimizer import make_optimizer
from imitation_jax.train.state import (abstract_params, init_opt_state, init_params, model_graph,
                                       shardings_of, step_scalar)
from imitation_jax.train.step import accum_batch_sharding, make_eval_step, make_train_step


def resolve_model_config(model: ModelConfig, vocab_size: int) -> ModelConfig:
    """vocab_size 0 takes the tokenizer's; a tokenizer larger than the model's vocab is an error."""
    if model.vocab_size == 0:
        return dataclasses.replace(model, vocab_size=vocab_size)
    if vocab_size > model.vocab_size:
        raise ConfigError(f"config: the tokenizer has {vocab_size} tokens but model.vocab_size={model.vocab_size}")
    return model


def _global_batch(local: dict[str, np.ndarray], grad_accum: int, sharding) -> dict[str, jax.Array]:
    """This process's rows -> (grad_accum, micro, T) global arrays (each process holds its slice)."""
    out = {}
    for name, array in local.items():
        array = array.reshape(grad_accum, array.shape[0] // grad_accum, *array.shape[1:])
        global_shape = (grad_accum, array.shape[1] * jax.process_count(), *array.shape[2:])
        out[name] = jax.make_array_from_process_local_data(sharding, array, global_shape)
    return out


def evaluate(eval_step, params, loader: BatchLoader, sharding, max_batches: int | None) -> dict[str, float]:
    totals = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    for i, local in enumerate(loader.eval_batches()):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * jax.process_count(), *v.shape[1:]))
                 for k, v in local.items()}
        for k, v in jax.device_get(eval_step(params, batch)).items():
            totals[k] += float(v)
    tokens = max(totals["tokens"], 1.0)
    return {"loss": totals["loss_sum"] / tokens, "accuracy": totals["correct"] / tokens, "tokens": totals["tokens"]}


def train(cfg: Config) -> dict[str, Any]:
    """Run training; returns a summary (run dir, first/last loss, checkpoint path, steps)."""
    run_dir = os.path.abspath(cfg.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    # A prepared set (data.path), or raw files prepared into a cache first. The loader is random
    # access by step, so the data iterator state to checkpoint is the step (loader.state(step)).
    data = load_training_data(cfg.data, jax.process_index(), jax.process_count(),
                              progress=cfg.logging.progress)
    cfg.data = data.config  # template, seq_len and packing as prepared
    cfg.model = resolve_model_config(cfg.model, data.vocab_size)  # includes special tokens prepare added
    train_rows, eval_rows = data.train, data.eval


    try:
        mesh = make_mesh(cfg.mesh)
    except ValueError as exc:
        raise ConfigError(f"config: {exc}") from None
    t = cfg.train
    micro = t.batch_size // t.grad_accum
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if micro % batch_ways or micro % jax.process_count():
        raise ConfigError(f"config: the micro-batch of {micro} rows (train.batch_size / train.grad_accum) is not "
                          f"divisible by data x fsdp = {batch_ways} and the {jax.process_count()} processes")
    eval_batch = cfg.eval.batch_size or micro
    if eval_rows is not None and (eval_batch % batch_ways or eval_batch % jax.process_count()):
        raise ConfigError(f"config: eval.batch_size={eval_batch} is not divisible by data x fsdp = {batch_ways} "
                          f"and the {jax.process_count()} processes")
    try:
        loader = BatchLoader(train_rows, t.batch_size, seed=cfg.data.seed,
                             process_index=jax.process_index(), process_count=jax.process_count())
    except ValueError as exc:  # too few rows for one batch, a bad seed
        raise ConfigError(f"data.train_files: {exc}") from None
    total_steps = t.steps if t.steps is not None else max(1, math.ceil(t.epochs * loader.batches_per_epoch))
    optimizer, schedule = make_optimizer(cfg.optim, total_steps)
    if jax.process_index() == 0:
        save_resolved(cfg, os.path.join(run_dir, "config.yaml"))
        st = train_rows.stats
        print(f"data: {st.examples} conversations -> {st.rows} rows of {st.seq_len} tokens "
              f"({st.non_pad_fraction:.0%} filled, {st.trained_tokens} trained tokens, {st.truncated} truncated); "
              f"{loader.batches_per_epoch} steps per epoch, {total_steps} steps", flush=True)
    logger = MetricsLogger(run_dir, cfg.logging.tensorboard, cfg.logging.wandb_project,
                           config=dataclasses.asdict(cfg))
    flops_per_step = cfg.model.flops_per_token(cfg.data.seq_len) * t.batch_size * cfg.data.seq_len
    peak = peak_flops_per_device(t.peak_flops) * jax.device_count()

    graphdef = model_graph(cfg.model)[0]
    with jax.set_mesh(mesh):
        if cfg.init.checkpoint:
            params = checkpoint.restore_params(cfg.init.checkpoint, abstract_params(cfg.model, mesh))
        else:
            params = init_params(cfg.model, mesh, t.seed)
        state = {"params": params, "opt_state": init_opt_state(optimizer, params, mesh), "step": step_scalar(0, mesh)}
        state_sh = shardings_of(state)
        train_step = make_train_step(graphdef, optimizer, mesh, state_sh, t.loss_chunk)
        batch_sh, eval_sh = accum_batch_sharding(mesh), batch_sharding(mesh)
        eval_step = eval_loader = None
        if eval_rows is not None:
            eval_step = make_eval_step(graphdef, mesh, state_sh["params"], t.loss_chunk)
            eval_loader = BatchLoader(eval_rows, eval_batch, seed=0, shuffle=False,
                                      drop_remainder=False, process_index=jax.process_index(),
                                      process_count=jax.process_count())

        first_loss = last_loss = None
        bar = tqdm(total=total_steps, desc="train", disable=not (cfg.logging.progress and logger.enabled))
        window_start, window_steps = time.perf_counter(), 0  # the first window includes compilation
        for step in range(total_steps):
            state, metrics = train_step(state, _global_batch(loader.batch_at(step), t.grad_accum, batch_sh))
            window_steps += 1
            done = step + 1
            if done % t.log_every == 0 or done == total_steps or step == 0:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                steps_per_s = window_steps / (time.perf_counter() - window_start)
                m.update(lr=float(schedule(step)), epoch=done / loader.batches_per_epoch,
                         tokens_per_s=steps_per_s * t.batch_size * cfg.data.seq_len,
                         mfu=steps_per_s * flops_per_step / peak)
                logger.log(done, m)
                first_loss = m["loss"] if first_loss is None else first_loss
                last_loss = m["loss"]
                bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m['accuracy']:.3f}")
                window_start, window_steps = time.perf_counter(), 0
            if eval_step is not None and cfg.eval.every_steps and done % cfg.eval.every_steps == 0 \
                    and done != total_steps:
                logger.log(done, evaluate(eval_step, state["params"], eval_loader, eval_sh,
                                          cfg.eval.max_batches), prefix="eval_")
                window_start, window_steps = time.perf_counter(), 0  # keep eval time out of tokens/s
            bar.update(1)
        bar.close()
        eval_metrics = None
        if eval_step is not None:
            eval_metrics = evaluate(eval_step, state["params"], eval_loader, eval_sh, cfg.eval.max_batches)
            logger.log(total_steps, eval_metrics, prefix="eval_")
        ckpt = checkpoint.save_params(run_dir, total_steps, state["params"])
    logger.close()
    return {"run_dir": run_dir, "steps": total_steps, "first_loss": first_loss, "last_loss": last_loss,
            "eval": eval_metrics, "checkpoint": ckpt, "params": state["params"],
            "train_rows": train_rows.stats.as_dict()}
