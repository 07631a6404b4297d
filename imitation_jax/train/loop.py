"""`train(cfg)`: the training run from a resolved Config to metrics and checkpoints, resumable."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from imitation_jax.train.config import Config, save_resolved
from imitation_jax.errors import ConfigError
from imitation_jax.data.loader import BatchLoader
from imitation_jax.data.training import load_training_data
from imitation_jax.model import ModelConfig
from imitation_jax.checkpoint import Checkpointer
from imitation_jax.sharding import batch_sharding, make_mesh, replicated
from imitation_jax.train.flops import peak_flops_per_device
from imitation_jax.train.metrics import MetricsLogger
from imitation_jax.train.optimizer import make_optimizer
from imitation_jax.train.preemption import EXIT_PREEMPTED, StopFlag, agree
from imitation_jax.train.run_dir import set_aside_previous_run, truncate_metrics
from imitation_jax.train.state import init_opt_state, opt_state_shardings, shardings_of, step_scalar
from imitation_jax.model.params import abstract_params, init_params, model_graph
from imitation_jax.train.step import accum_batch_sharding, make_eval_step, make_train_step


def resolve_model_config(model: ModelConfig, vocab_size: int, hf_dir: str | None = None) -> ModelConfig:
    """`hf_dir` (init.hf) sets the architecture; vocab_size 0 takes the tokenizer's, and a tokenizer
    larger than the model's vocab (special tokens added by prepare) grows it: the extra
    embedding/lm_head rows of loaded params are initialised by model.params.new_rows."""
    if hf_dir:
        from imitation_jax.convert.init_params import with_hf_architecture

        model = with_hf_architecture(model, hf_dir)
    if model.vocab_size == 0 or vocab_size > model.vocab_size:
        model = dataclasses.replace(model, vocab_size=vocab_size)
    try:  # a user's model.* mistake (heads not divisible, odd head dim): one line, not a traceback
        model.validate()
    except ValueError as exc:
        raise ConfigError(f"config: {exc}") from None
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


def train(cfg: Config, restart: bool = False) -> dict[str, Any]:
    """Run training, resuming from the newest complete checkpoint in `cfg.run_dir` if there is one
    (`restart=True` sets earlier checkpoints aside instead). Returns a summary: run dir, steps,
    first/last loss, eval metrics, checkpoint path, and `preempted` when a signal stopped it."""
    run_dir = os.path.abspath(cfg.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    # A prepared set (data.path), or raw files prepared into a cache first. The loader is random
    # access by step, so the data iterator state to checkpoint is the step (loader.state(step)).
    data = load_training_data(cfg.data, jax.process_index(), jax.process_count(),
                              progress=cfg.logging.progress)
    cfg.data = data.config  # template, seq_len and packing as prepared
    cfg.model = resolve_model_config(cfg.model, data.vocab_size, cfg.init.hf)  # incl. tokens prepare added
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
    config_dict = dataclasses.asdict(cfg)
    if jax.process_index() == 0:
        save_resolved(cfg, os.path.join(run_dir, "config.yaml"))
        # A run dir is self-contained for generate/eval/export: the tokenizer as trained (special
        # tokens added by prepare included); the template is data.template + data.turn_tokens.
        data.tokenizer.save(os.path.join(run_dir, "tokenizer"))
        st = train_rows.stats
        print(f"data: {st.examples} conversations -> {st.rows} rows of {st.seq_len} tokens "
              f"({st.non_pad_fraction:.0%} filled, {st.trained_tokens} trained tokens, {st.truncated} truncated); "
              f"{loader.batches_per_epoch} steps per epoch, {total_steps} steps", flush=True)

    ckpt = Checkpointer(run_dir, cfg.checkpoint)
    if restart and ckpt.steps():
        ckpt.close()
        moved = set_aside_previous_run(run_dir)
        print(f"restart: previous checkpoints and metrics set aside ({moved})", flush=True)
        ckpt = Checkpointer(run_dir, cfg.checkpoint)
    flops_per_step = cfg.model.flops_per_token(cfg.data.seq_len) * t.batch_size * cfg.data.seq_len
    peak = peak_flops_per_device(t.peak_flops) * jax.device_count()
    data_state = {"seed": cfg.data.seed, "batches_per_epoch": loader.batches_per_epoch,
                  "global_batch_size": t.batch_size}

    graphdef = model_graph(cfg.model)[0]
    with jax.set_mesh(mesh):
        abstract = abstract_state(cfg.model, optimizer, mesh)
        try:
            restored = ckpt.restore_latest(abstract) if ckpt.steps() or ckpt.incomplete() else None
        except BaseException:
            ckpt.close()
            raise
        if restored is not None:
            start_step, state, saved_data = restored
            _check_same_data(saved_data, data_state)
            truncate_metrics(run_dir, start_step)
            _say(f"resuming from step {start_step} ({ckpt.directory}/{start_step})")
        else:
            start_step = 0
            if cfg.init.checkpoint or cfg.init.hf:
                from imitation_jax.convert.init_params import initial_params

                params = initial_params(cfg.init, cfg.model, mesh, abstract["params"], t.seed)
                _say(f"init: params from {cfg.init.checkpoint or cfg.init.hf}")
            else:
                params = init_params(cfg.model, mesh, t.seed)
            state = {"params": params, "opt_state": init_opt_state(optimizer, params, mesh),
                     "rng": replicated_array(jax.random.key_data(jax.random.key(t.seed)), mesh)}
        rng = state.pop("rng")
        state["step"] = step_scalar(start_step, mesh)
        state_sh = shardings_of(state)
        train_step = make_train_step(graphdef, optimizer, mesh, state_sh, t.loss_chunk, t.fuse_last_layer)
        batch_sh, eval_sh = accum_batch_sharding(mesh), batch_sharding(mesh)
        eval_step = eval_loader = None
        if eval_rows is not None:
            eval_step = make_eval_step(graphdef, mesh, state_sh["params"], t.loss_chunk, t.fuse_last_layer)
            eval_loader = BatchLoader(eval_rows, eval_batch, seed=0, shuffle=False,
                                      drop_remainder=False, process_index=jax.process_index(),
                                      process_count=jax.process_count())

        def save(step: int) -> None:
            ckpt.save(step, {**state, "rng": rng}, dict(data_state, epoch=step / loader.batches_per_epoch),
                      config_dict)

        logger = MetricsLogger(run_dir, cfg.logging.tensorboard, cfg.logging.wandb_project, config=config_dict)
        task_eval = None
        if cfg.eval.tasks:  # lm-eval tasks on the live params, logged as task/<task>/<metric>
            from imitation_jax.evaluation.in_training import TaskEval

            task_eval = TaskEval(cfg, graphdef, data.tokenizer)
        stop = StopFlag().install()
        first_loss = last_loss = None
        preempted = False
        bar = tqdm(total=total_steps, initial=start_step, desc="train",
                   disable=not (cfg.logging.progress and logger.enabled))
        window_start, window_steps = time.perf_counter(), 0  # the first window includes compilation
        try:
            for step in range(start_step, total_steps):
                state, metrics = train_step(state, _global_batch(loader.batch_at(step), t.grad_accum, batch_sh))
                window_steps += 1
                done = step + 1
                if done % t.log_every == 0 or done == total_steps or step == start_step:
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
                if task_eval is not None and task_eval.due(done, total_steps):
                    logger.log(done, task_eval.run(state["params"]), prefix="task/")
                    window_start, window_steps = time.perf_counter(), 0
                bar.update(1)
                preempted, due = agree(stop.signal is not None, ckpt.due(done))
                if due or preempted or done == total_steps:
                    save(done)
                if preempted:
                    _say(f"stopped at step {done}: checkpoint {ckpt.directory}/{done}; "
                         f"run the same command to resume (exit code {EXIT_PREEMPTED})")
                    break
        finally:
            stop.uninstall()
            bar.close()
            ckpt.close()  # waits for an asynchronous write in flight
        eval_metrics = None
        if eval_step is not None and not preempted:
            eval_metrics = evaluate(eval_step, state["params"], eval_loader, eval_sh, cfg.eval.max_batches)
            logger.log(total_steps, eval_metrics, prefix="eval_")
    logger.close()
    final = start_step if not ckpt.steps() else ckpt.steps()[-1]
    return {"run_dir": run_dir, "steps": total_steps, "start_step": start_step, "first_loss": first_loss,
            "last_loss": last_loss, "eval": eval_metrics, "checkpoint": f"{ckpt.directory}/{final}",
            "params": state["params"], "preempted": preempted}


def abstract_state(model_cfg: ModelConfig, optimizer, mesh) -> dict:
    """ShapeDtypeStructs with this mesh's shardings for everything a checkpoint restores."""
    params = abstract_params(model_cfg, mesh)
    shapes = jax.eval_shape(optimizer.init, params)
    opt = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       shapes, opt_state_shardings(optimizer, params, mesh))
    rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=replicated(mesh))
    return {"params": params, "opt_state": opt, "rng": rng}


def replicated_array(value, mesh) -> jax.Array:
    return jax.device_put(np.asarray(value), replicated(mesh))


def _check_same_data(saved: dict, current: dict) -> None:
    """Resuming on different data or batch size would silently repeat or skip rows."""
    for key in ("seed", "batches_per_epoch", "global_batch_size"):
        if key in saved and saved[key] != current[key]:
            raise ConfigError(f"resume: the checkpoint was written with {key}={saved[key]} but this run has "
                              f"{key}={current[key]}; the data order would not continue (use --restart to start over)")


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)
