"""`train(cfg)`: the training run from a resolved Config to metrics and checkpoints, resumable.

The run is built by `builder.build_program` (shared with compile-check); where the first
parameters come from when `init.*` is set and which extra hooks run (lm-eval tasks) are passed in
by the `train` command, so this layer needs neither the HF converter nor the evaluation stack."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from tqdm import tqdm

from imitation_jax.checkpoint import Checkpointer, base_identity
from imitation_jax.data.loader import BatchLoader
from imitation_jax.data.training import TrainingData, load_training_data
from imitation_jax.errors import ConfigError
from imitation_jax.model import lora, quant
from imitation_jax.model.params import frozen_keys, init_adapters, init_params
from imitation_jax.sharding import make_mesh, replicated
from imitation_jax.train.builder import Program, build_program, check_teacher, micro_batch, resolve_model
from imitation_jax.train.config import Config, save_resolved
from imitation_jax.train.flops import peak_flops_per_device
from imitation_jax.train.hooks import Checkpointing, HeldOutEval, Hook, LogMetrics, StepInfo, Throughput
from imitation_jax.train.metrics import MetricsLogger
from imitation_jax.train.prefetch import DevicePrefetch
from imitation_jax.train.preemption import EXIT_PREEMPTED, StopFlag, agree
from imitation_jax.train.run_dir import set_aside_previous_run, truncate_metrics
from imitation_jax.train.state import init_opt_state, step_scalar
from imitation_jax.train.step import compile_with_frozen

# (program, seed) -> the first parameters, for init.checkpoint / init.hf (the command's choice)
InitParams = Callable[[Program, int], Any]
# (program, tokenizer) -> a hook, or None (e.g. lm-eval tasks from the evaluation layer)
HookFactory = Callable[[Program, Any], "Hook | None"]
# mesh -> the frozen teacher of kd.source=teacher (.config, .graphdef, .params placed on the mesh)
TeacherSource = Callable[[Any], Any]
# (step, live params, device batch) -> (the batch the step trains on, extra metrics of the step),
# run before each step (e.g. on-policy rows sampled with the live params); made by a factory
# (program, tokenizer) -> transform, or None
BatchTransform = Callable[[int, Any, dict], tuple[dict, dict]]
BatchTransformFactory = Callable[[Program, Any], "BatchTransform | None"]


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


def train(cfg: Config, restart: bool = False, *, init: InitParams | None = None,
          hooks: Sequence[HookFactory] = (), teacher: TeacherSource | None = None,
          batch_transform: BatchTransformFactory | None = None,
          adapters: Callable[[Program], Any] | None = None) -> dict[str, Any]:
    """Run training, resuming from the newest complete checkpoint in `cfg.run_dir` if there is one
    (`restart=True` sets earlier checkpoints aside instead). `init` makes the first parameters when
    cfg.init.* is set (commands.train.init_source); `hooks` add periodic work; `teacher` loads the
    frozen teacher of kd.source=teacher onto the mesh (commands.train.teacher_source); `batch_transform`
    rewrites each step's batch from the live parameters before the step (commands.on_policy); `adapters`
    makes a LoRA run's first adapters (init.adapter: commands.train.adapter_source). Returns a summary:
    run dir, steps, first/last loss, eval metrics, checkpoint path, and `preempted` when a signal
    stopped it."""
    if (cfg.init.checkpoint or cfg.init.hf) and init is None:
        raise ValueError("cfg.init is set: pass `init` (imitation_jax.commands.train.init_source(cfg))")
    in_mesh_teacher = cfg.train.objective == "kd" and cfg.kd.source == "teacher"
    if in_mesh_teacher and teacher is None:
        raise ValueError("kd.source=teacher: pass `teacher` (imitation_jax.commands.train.teacher_source(cfg))")
    if cfg.train.objective == "kd" and cfg.kd.on_policy.fraction and batch_transform is None:
        raise ValueError("kd.on_policy: pass `batch_transform` (imitation_jax.commands.on_policy.on_policy_source(cfg))")
    if cfg.init.adapter and adapters is None:
        raise ValueError("init.adapter is set: pass `adapters` (imitation_jax.commands.train.adapter_source(cfg))")
    if cfg.model.lora.enabled and not (cfg.init.checkpoint or cfg.init.hf):
        raise ConfigError("config: model.lora trains adapters on a frozen base: set init.hf (an HF dir) or "
                          "init.checkpoint (a run or import-hf dir)")
    run_dir = os.path.abspath(cfg.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    data = load_training_data(cfg.data, jax.process_index(), jax.process_count(), progress=cfg.logging.progress)
    cfg.data = data.config  # template, seq_len and packing as prepared
    try:
        mesh = make_mesh(cfg.mesh)
    except ValueError as exc:
        raise ConfigError(f"config: {exc}") from None
    cfg.model = resolve_model(cfg.model, mesh, data.vocab_size)  # incl. tokens prepare added
    t = cfg.train
    micro = micro_batch(cfg, mesh, jax.process_count())
    loader, eval_loader = _loaders(cfg, data, mesh, micro)
    if cfg.train.objective == "kd" and cfg.kd.source == "stored" and not data.prepared.teacher_k:
        raise ConfigError(f"kd.source=stored: {data.path} holds no teacher log-probabilities (collect with "
                          "--top-logprobs K, then prepare), or use kd.source=teacher")
    total_steps = t.steps if t.steps is not None else max(1, math.ceil(t.epochs * loader.batches_per_epoch))
    config_dict = dataclasses.asdict(cfg)
    if jax.process_index() == 0:
        save_resolved(cfg, os.path.join(run_dir, "config.yaml"))
        # A run dir is self-contained for generate/eval/export: the tokenizer as trained (special
        # tokens added by prepare included); the template is data.template + data.turn_tokens.
        data.tokenizer.save(os.path.join(run_dir, "tokenizer"))
        st = data.train.stats
        print(f"data: {st.examples} conversations -> {st.rows} rows of {st.seq_len} tokens "
              f"({st.non_pad_fraction:.0%} filled, {st.trained_tokens} trained tokens, {st.truncated} truncated); "
              f"{loader.batches_per_epoch} steps per epoch, {total_steps} steps", flush=True)

    ckpt = Checkpointer(run_dir, cfg.checkpoint)
    if restart and ckpt.steps():
        ckpt.close()
        moved = set_aside_previous_run(run_dir)
        print(f"restart: previous checkpoints and metrics set aside ({moved})", flush=True)
        ckpt = Checkpointer(run_dir, cfg.checkpoint)

    with jax.set_mesh(mesh):
        frozen = teacher(mesh) if in_mesh_teacher else None
        if frozen is not None:
            check_teacher(frozen, cfg.model)
            _say(f"kd: teacher {frozen.source} ({frozen.config.num_params() / 1e6:.1f}M params, "
                 f"{frozen.config.param_dtype}), frozen in the same mesh")
        program = build_program(cfg, mesh, cfg.model, total_steps, frozen)
        base = identity = None
        if program.lora:  # the frozen base, loaded whether the run starts or resumes
            base, identity = _lora_base(cfg, program, init)
        try:
            restored = (ckpt.restore_latest(program.abstract, base=identity)
                        if ckpt.steps() or ckpt.incomplete() else None)
            if restored is not None:
                start_step, state, saved_data = restored
                _check_same_data(loader, saved_data, start_step)
        except BaseException:
            ckpt.close()
            raise
        if restored is not None:
            truncate_metrics(run_dir, start_step)
            _say(f"resuming from step {start_step} ({ckpt.directory}/{start_step})")
        else:
            start_step = 0
            if program.lora and adapters is not None:
                params = adapters(program)
                _say(f"init: adapters from {cfg.init.adapter}")
            elif program.lora:
                params = init_adapters(cfg.model, mesh, t.seed)
            elif init is not None and (cfg.init.checkpoint or cfg.init.hf):
                params = init(program, t.seed)
                _say(f"init: params from {cfg.init.checkpoint or cfg.init.hf}")
            else:
                params = init_params(cfg.model, mesh, t.seed)
            state = {"params": params, "opt_state": init_opt_state(program.optimizer, params, mesh),
                     "rng": jax.device_put(np.asarray(jax.random.key_data(jax.random.key(t.seed))), replicated(mesh))}
        rng = state.pop("rng")
        state["step"] = step_scalar(start_step, mesh)
        summary = _run_loop(cfg, program, data, loader, eval_loader, ckpt, state, rng, start_step,
                            config_dict, hooks, () if frozen is None else (frozen.params,), batch_transform,
                            None if base is None else (base, identity))
    final = start_step if not ckpt.steps() else ckpt.steps()[-1]
    return {"run_dir": run_dir, "steps": total_steps, "start_step": start_step, **summary,
            "checkpoint": f"{ckpt.directory}/{final}"}


def _lora_base(cfg: Config, program: Program, init: InitParams) -> tuple[dict, dict]:
    """(the frozen rest of a LoRA model: base weights from init.* + zero dropout keys, the base's
    identity: path + content hash, checked against the checkpoint's on resume)."""
    identity = base_identity(cfg.init.hf, "hf") if cfg.init.hf else base_identity(cfg.init.checkpoint, "checkpoint")
    as_base = dataclasses.replace(program, model=program.base_model,
                                  abstract={**program.abstract, "params": program.abstract_base()})
    weights = init(as_base, cfg.train.seed)
    mode = cfg.model.lora.base_quant
    if mode:  # QLoRA: the base's projections stored quantized from here on
        target = jax.tree.map(lambda x: x.sharding, lora.base_only(program.frozen))
        weights = jax.jit(lambda w: quant.quantize_tree(w, mode), out_shardings=target)(weights)
    stored = f"{mode} projections" if mode else program.base_model.param_dtype
    _say(f"lora: rank {cfg.model.lora.rank} adapters on {', '.join(cfg.model.lora.targets)} "
         f"({lora.count(program.abstract['params']) / 1e6:.2f}M trained params) over the frozen base "
         f"{identity['path']} ({stored}, sha256 {identity['hash'][:12]})")
    return lora.combine(weights, frozen_keys(program.frozen)), identity


def _loaders(cfg: Config, data: TrainingData, mesh, micro: int) -> tuple[BatchLoader, BatchLoader | None]:
    ways, procs = mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count()
    eval_batch = cfg.eval.batch_size or micro
    if data.eval is not None and (eval_batch % ways or eval_batch % procs):
        raise ConfigError(f"config: eval.batch_size={eval_batch} is not divisible by data x fsdp = {ways} "
                          f"and the {procs} processes")
    try:
        loader = BatchLoader(data.train, cfg.train.batch_size, seed=cfg.data.seed,
                             process_index=jax.process_index(), process_count=procs)
    except ValueError as exc:  # too few rows for one batch, a bad seed
        raise ConfigError(f"data.train_files: {exc}") from None
    eval_loader = None
    if data.eval is not None:
        eval_loader = BatchLoader(data.eval, eval_batch, seed=0, shuffle=False, drop_remainder=False,
                                  process_index=jax.process_index(), process_count=procs)
    return loader, eval_loader


def _run_loop(cfg: Config, program: Program, data: TrainingData, loader: BatchLoader,
              eval_loader: BatchLoader | None, ckpt: Checkpointer, state: dict, rng, start_step: int,
              config_dict: dict, hook_factories: Sequence[HookFactory], teacher_params: tuple = (),
              transform_factory: BatchTransformFactory | None = None,
              lora_base: tuple[dict, dict] | None = None) -> dict[str, Any]:
    """`lora_base`: (frozen rest of the model, base identity) of a LoRA run; the state then holds
    the adapters, and hooks, evaluation and batch transforms see the whole model (`full`)."""
    t, total_steps, run_dir = cfg.train, program.total_steps, os.path.abspath(cfg.run_dir)
    frozen, identity = lora_base if lora_base is not None else (None, None)
    step_args = (frozen,) if frozen is not None else ()
    train_step = program.train_step

    def full(params):  # the params the model runs on
        return params if frozen is None else lora.combine(params, frozen)
    logger = MetricsLogger(run_dir, cfg.logging.tensorboard, cfg.logging.wandb_project, config=config_dict)
    bar = tqdm(total=total_steps, initial=start_step, desc="train",
               disable=not (cfg.logging.progress and logger.enabled))
    clock = Throughput()
    batches = DevicePrefetch(loader.iterator(start_step, prefetch=0),
                             lambda local: _global_batch(local, t.grad_accum, program.batch_sharding), t.prefetch)
    eval_fn = None
    if eval_loader is not None:
        eval_fn = lambda params: evaluate(program.eval_step, params, eval_loader,  # noqa: E731
                                          program.eval_batch_sharding, cfg.eval.max_batches)
    peak = peak_flops_per_device(t.peak_flops) * jax.device_count()
    tokens_per_step = t.batch_size * cfg.data.seq_len
    log_hook = LogMetrics(t.log_every, program.schedule, loader.batches_per_epoch, tokens_per_step,
                          cfg.model.flops_per_token(cfg.data.seq_len) * tokens_per_step, peak, clock,
                          batches.mean_wait, bar)
    hooks: list[Hook] = [log_hook]
    if eval_fn is not None:
        hooks.append(HeldOutEval(eval_fn, cfg.eval.every_steps))
    hooks += [h for h in (make(program, data.tokenizer) for make in hook_factories) if h is not None]
    transform = transform_factory(program, data.tokenizer) if transform_factory is not None else None

    def save(step: int, state: dict) -> None:
        params = state["params"] if frozen is None else lora.split(state["params"])[0]  # adapters only
        ckpt.save(step, {**state, "params": params, "rng": rng},
                  dict(loader.state(step), epoch=step / loader.batches_per_epoch), config_dict, identity)

    stop = StopFlag().install()
    checkpointing = Checkpointing(ckpt.due, save, lambda: stop.signal is not None, agree)
    hooks.append(checkpointing)  # last: it saves what the other hooks saw
    try:
        for step in range(start_step, total_steps):
            batch, extra = next(batches), None
            if transform is not None:
                batch, extra = transform(step, full(state["params"]), batch)
            if frozen is not None and train_step is program.train_step:  # LoRA: compile, lay out the base
                train_step, frozen = compile_with_frozen(program.train_step, state, batch, frozen, *teacher_params)
                step_args = (frozen,)
            state, metrics = train_step(state, batch, *step_args, *teacher_params)
            if extra:
                metrics = {**metrics, **extra}
            clock.steps += 1
            done = step + 1
            info = StepInfo(done, total_steps, start_step, {**state, "params": full(state["params"])}, metrics,
                            lambda m, prefix="", _d=done: logger.log(_d, m, prefix=prefix))
            for hook in hooks:
                if hook.due(done, total_steps, start_step):
                    hook.run(info)
                    if hook.pauses_clock:
                        clock.reset()  # keep eval time out of tokens/s
            bar.update(1)
            if checkpointing.stop:
                _say(f"stopped at step {done}: checkpoint {ckpt.directory}/{done}; "
                     f"run the same command to resume (exit code {EXIT_PREEMPTED})")
                break
    finally:
        stop.uninstall()
        batches.close()
        bar.close()
        ckpt.close()  # waits for an asynchronous write in flight
    preempted = checkpointing.stop
    eval_metrics = None
    if eval_fn is not None and not preempted:
        eval_metrics = eval_fn(full(state["params"]))
        logger.log(total_steps, eval_metrics, prefix="eval_")
    logger.close()
    return {"first_loss": log_hook.first_loss, "last_loss": log_hook.last_loss, "eval": eval_metrics,
            "params": full(state["params"]), "preempted": preempted}


def _check_same_data(loader: BatchLoader, saved: dict, step: int) -> None:
    """Resuming on other data or another batch size would silently repeat or skip rows: the
    loader's own state (seed, batch size, row count, data fingerprint) must match."""
    try:
        loader.restore({**saved, "step": step})
    except ValueError as exc:
        raise ConfigError(f"resume: {exc} since the checkpoint was written (use --restart to start "
                          "over)") from None


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)
