"""The run builder: everything `train` and `compile-check` share, built once from a resolved Config
and a mesh. The model config (vocabulary, platform), the optimizer and its schedule, the abstract
training state with its target shardings (what a checkpoint restores into, what compile-check
lowers against) and the jitted train/eval steps. `train` adds data and real arrays; compile-check
lowers `program.train_step` against `program.abstract_step_state()`, `program.abstract_batch()`
and, for kd.source=teacher, an `abstract_teacher` for a TPU topology."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from imitation_jax.data.packing import TEACHER_FIELDS
from imitation_jax.errors import ConfigError
from imitation_jax.model import lora
from imitation_jax.model.config import ModelConfig, with_platform
from imitation_jax.model.params import abstract_params, base_config, model_graph
from imitation_jax.sharding import batch_sharding, replicated
from imitation_jax.train.config import Config
from imitation_jax.train.objectives import make_loss_fn
from imitation_jax.train.optimizer import make_optimizer
from imitation_jax.train.state import opt_state_shardings
from imitation_jax.train.step import accum_batch_sharding, make_eval_step, make_train_step

BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


def resolve_model(model: ModelConfig, mesh: Mesh, vocab_size: int | None = None) -> ModelConfig:
    """The model config a run compiles: vocab_size 0 takes the data's (`vocab_size`), a tokenizer
    larger than the model's vocab (special tokens added by prepare) grows it (new rows:
    model.params.grow_params), and the platform comes from the mesh's devices."""
    if vocab_size and (model.vocab_size == 0 or vocab_size > model.vocab_size):
        model = dataclasses.replace(model, vocab_size=vocab_size)
    if model.vocab_size <= 0:
        raise ConfigError("config: model.vocab_size is not set and no tokenizer gives it")
    model = with_platform(model, mesh)
    try:  # a user's model.* mistake (heads not divisible, odd head dim): one line, not a traceback
        model.validate()
    except ValueError as exc:
        raise ConfigError(f"config: {exc}") from None
    return model


def micro_batch(cfg: Config, mesh: Mesh, process_count: int = 1, where: str = "") -> int:
    """Rows per micro-batch; a one-line ConfigError when the mesh or processes cannot split it."""
    t = cfg.train
    micro = t.batch_size // t.grad_accum
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if micro % ways or micro % process_count:
        raise ConfigError(f"config: the micro-batch of {micro} rows (train.batch_size / train.grad_accum) is not "
                          f"divisible by data x fsdp = {ways} and the {process_count} processes{where}")
    return micro


@dataclasses.dataclass
class Program:
    """The compiled side of a run: model, optimizer, state layout and step functions."""

    cfg: Config
    mesh: Mesh
    model: ModelConfig
    graphdef: Any
    optimizer: optax.GradientTransformation
    schedule: Callable[[int], Any]
    total_steps: int
    abstract: dict  # params, opt_state, rng: ShapeDtypeStructs with target shardings
    train_step: Any  # (state, batch[, frozen][, teacher]) -> (state, metrics); state = params, opt_state, step
    eval_step: Any  # (params, batch) -> loss sums; with LoRA the params are the whole tree (lora.combine)
    # LoRA (model.lora.rank > 0): abstract["params"] is the adapters only; `frozen` the abstract rest
    # (base weights + dropout keys) the train step takes as its third argument; None otherwise.
    frozen: Any = None

    @property
    def lora(self) -> bool:
        return self.frozen is not None

    @property
    def base_model(self) -> ModelConfig:
        """The model without adapters: what the frozen base is loaded as."""
        return base_config(self.model)

    def abstract_base(self) -> dict:
        """The base's weights as abstract arrays, as `init.*` loads them (before model.lora.base_quant
        quantizes them into the frozen tree)."""
        return abstract_params(self.base_model, self.mesh)

    @property
    def state_shardings(self) -> dict:
        return {"params": _shardings(self.abstract["params"]),
                "opt_state": _shardings(self.abstract["opt_state"]), "step": replicated(self.mesh)}

    @property
    def batch_sharding(self):  # (grad_accum, micro, T): micro-batches stacked
        return accum_batch_sharding(self.mesh)

    @property
    def eval_batch_sharding(self):
        return batch_sharding(self.mesh)

    def abstract_step_state(self) -> dict:
        """What train_step takes, as abstract arrays (compile-check lowers against these)."""
        return {"params": self.abstract["params"], "opt_state": self.abstract["opt_state"],
                "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(self.mesh))}

    def abstract_batch(self, seq_len: int, teacher_k: int = 0) -> dict:
        """A train batch as abstract arrays, (grad_accum, micro, T); `teacher_k` > 0 adds the sparse
        targets kd.source=stored batches carry (data.packing.TEACHER_FIELDS: teacher_ids int32 and
        teacher_logprobs float32, (grad_accum, micro, T, K))."""
        t = self.cfg.train
        rows = (t.grad_accum, t.batch_size // t.grad_accum, seq_len)
        batch = {k: jax.ShapeDtypeStruct(rows, np.float32 if k == "loss_mask" else np.int32,
                                         sharding=self.batch_sharding) for k in BATCH_KEYS}
        if teacher_k:
            ids, logprobs = TEACHER_FIELDS
            batch[ids] = jax.ShapeDtypeStruct((*rows, teacher_k), np.int32, sharding=self.batch_sharding)
            batch[logprobs] = jax.ShapeDtypeStruct((*rows, teacher_k), np.float32, sharding=self.batch_sharding)
        return batch


def build_program(cfg: Config, mesh: Mesh, model: ModelConfig, total_steps: int, teacher: Any = None) -> Program:
    """`model` is resolved (resolve_model); call under `jax.set_mesh(mesh)`. `teacher`: the frozen
    in-mesh teacher of `kd.source=teacher` (config, graphdef, params placed on `mesh`)."""
    t = cfg.train
    optimizer, schedule = make_optimizer(cfg.optim, total_steps)
    graphdef = model_graph(model)[0]
    params, frozen = abstract_params(model, mesh), None
    if model.lora.enabled:  # train the adapters; the base (and the dropout keys) is a frozen argument
        params, frozen = lora.split(params)
    opt = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       jax.eval_shape(optimizer.init, params), opt_state_shardings(optimizer, params, mesh))
    abstract = {"params": params, "opt_state": opt,
                "rng": jax.ShapeDtypeStruct((2,), np.uint32, sharding=replicated(mesh))}
    state_sh = {"params": _shardings(params), "opt_state": _shardings(opt), "step": replicated(mesh)}
    # The fused last layer's hand-written backward computes its weights' gradients: a LoRA base has no
    # use for them (they cost a compiled step more memory than the base's gradient-free layers, and a
    # quantized base's integer codes cannot take one). Evaluation computes no gradient: it stays fused.
    fuse = t.fuse_last_layer and not model.lora.enabled
    loss_fn = None
    if t.objective != "sft":
        loss_fn = make_loss_fn(graphdef, t.objective, cfg.kd, t.loss_chunk, fuse,
                               teacher.graphdef if teacher is not None else None)
    teacher_sh = _shardings(teacher.params) if teacher is not None else None
    frozen_sh = _shardings(frozen) if frozen is not None else None
    dropout_seed = t.seed if model.lora.enabled and model.lora.dropout > 0 else None
    train_step = make_train_step(graphdef, optimizer, mesh, state_sh, t.loss_chunk, fuse, model.platform,
                                 loss_fn, teacher_sh, frozen_sh, dropout_seed)
    eval_sh = state_sh["params"] if frozen is None else lora.combine(state_sh["params"], frozen_sh)
    eval_step = make_eval_step(graphdef, mesh, eval_sh, t.loss_chunk, t.fuse_last_layer, model.platform)
    return Program(cfg, mesh, model, graphdef, optimizer, schedule, total_steps, abstract, train_step, eval_step,
                   frozen)


@dataclasses.dataclass
class AbstractTeacher:
    """The in-mesh teacher of kd.source=teacher without its weights (compile-check): the same fields
    `build_program` and `check_teacher` read from a loaded one, its params ShapeDtypeStructs."""

    config: ModelConfig
    graphdef: Any
    params: Any  # ShapeDtypeStructs, sharded by the same rules as the student's
    source: str


def abstract_teacher(model: ModelConfig, mesh: Mesh, source: str) -> AbstractTeacher:
    """`model` (in the teacher's own dtype) as a frozen teacher on `mesh`: its platform is the mesh's,
    as for a loaded teacher, and it has no optimizer state."""
    model = with_platform(dataclasses.replace(model, platform=None), mesh)
    try:
        model.validate()
    except ValueError as exc:
        raise ConfigError(f"kd.teacher ({source}): {exc}") from None
    return AbstractTeacher(model, model_graph(model)[0], abstract_params(model, mesh), source)


def check_teacher(teacher: Any, student: ModelConfig) -> None:
    """An in-mesh teacher must share the student's vocabulary (the same tokenizer)."""
    if teacher.config.vocab_size != student.vocab_size:
        raise ConfigError(f"kd.teacher: its vocabulary has {teacher.config.vocab_size} ids but the student's has "
                          f"{student.vocab_size}; an in-mesh teacher needs the student's tokenizer")


def _shardings(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)
