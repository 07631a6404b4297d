"""Will this config fit that TPU slice? Lower and compile the real train step for a TPU topology on a
machine without a TPU (libtpu from `pip install .[tpu]` compiles for compile-only devices) and
compare its per-device memory with the chip's HBM. Nothing is allocated and no data is read.

Slice names follow Cloud TPU: v4 and v5p names count TensorCores, two per chip, and each chip runs
as one megacore device (`v4-32` = 16 chips = 16 JAX devices, topology 2x2x4); v5e and v6e names
count chips, one core each (`v5e-256` = 256 chips, 16x16). A topology can also be given directly
as `v4:2x2x4`, `v5p:4x4x4`, `v5e:4x8` or `v6e:8x8` (chips per dimension).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # how slice names spell it
    hbm_gib: float  # HBM per chip (= per JAX device: v4/v5p run as megacores)
    libtpu_prefix: str  # how libtpu's topology names spell it
    cores_per_chip_in_name: int  # v4-8 counts 8 cores = 4 chips
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    chip_config: str  # libtpu chip_config_name


CHIPS = {
    "v4": Chip("v4", 32, "v4", 2, 3, "megacore"),
    "v5p": Chip("v5p", 95, "v5", 2, 3, "megacore"),
    "v5e": Chip("v5e", 16, "v5e", 1, 2, "default"),
    "v6e": Chip("v6e", 32, "v6e", 1, 2, "default"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e"}
# 2-D slices (v5e/v6e) come in these shapes only.
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
SMALL_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4)}


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: Chip
    shape: tuple[int, ...]  # chips per dimension

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def libtpu_name(self) -> str:  # e.g. "v4:2x2x4"
        return f"{self.chip.libtpu_prefix}:{'x'.join(map(str, self.shape))}"

    @property
    def slice_name(self) -> str:  # e.g. "v4-32"
        return f"{self.chip.name}-{self.chips * self.chip.cores_per_chip_in_name}"

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Torus wrap-around links: full 3-D tori from 4x4x4 up; 2-D slices wrap along 16-chip sides."""
        if self.chip.dims == 3:
            return (all(s % 4 == 0 for s in self.shape),) * 3
        return tuple(s == 16 for s in self.shape) + (False,)  # type: ignore[return-value]

    @property
    def hbm_bytes(self) -> int:
        return int(self.chip.hbm_gib * GiB)


def _shape_3d(chips: int) -> tuple[int, int, int] | None:
    """Cloud TPU's 3-D shapes: the small slices, then sides that are multiples of 4, as cubic as
    possible (v4-128 = 4x4x4, v4-384 = 4x4x12, v5p-1152 = 4x12x12)."""
    if chips in SMALL_3D:
        return SMALL_3D[chips]
    if chips % 64:
        return None
    best = None
    for a in range(4, round(chips ** (1 / 3)) + 1, 4):
        for b in range(a, math.isqrt(chips // a) + 1, 4):
            c, rem = divmod(chips, a * b)
            if not rem and c % 4 == 0 and c >= b and (best is None or c < best[2]):
                best = (a, b, c)
    return best


def parse_topology(name: str) -> Topology:
    """`v5e-256`, `v4-32`, `v5p-128`, `v6e-16`, `v5litepod-16`, or a libtpu shape like `v4:2x2x4`."""
    text = name.strip().lower()
    known = "v4-N, v5p-N (N TensorCores, 2 per chip), v5e-N, v6e-N (N chips), or e.g. v4:2x2x4, v5e:4x8"
    m = re.fullmatch(r"(v4|v5p|v5|v5e|v6e):(\d+(?:x\d+)+)", text)
    if m:
        chip = CHIPS["v5p" if m.group(1) == "v5" else m.group(1)]
        shape = tuple(int(s) for s in m.group(2).split("x"))
        if len(shape) != chip.dims or min(shape) < 1:
            raise ValueError(f"topology {name!r}: a {chip.name} shape has {chip.dims} dimensions")
        return Topology(chip, shape)
    m = re.fullmatch(r"([a-z0-9]+?)-(\d+)", text)
    if not m or ALIASES.get(m.group(1), m.group(1)) not in CHIPS:
        raise ValueError(f"unknown TPU topology {name!r}; expected {known}")
    chip = CHIPS[ALIASES.get(m.group(1), m.group(1))]
    count = int(m.group(2))
    if count % chip.cores_per_chip_in_name:
        raise ValueError(f"topology {name!r}: {chip.name} names count TensorCores, 2 per chip, so N is even")
    chips = count // chip.cores_per_chip_in_name
    shape = SHAPES_2D.get(chips) if chip.dims == 2 else _shape_3d(chips)
    if shape is None:
        sizes = (", ".join(f"{chip.name}-{n}" for n in SHAPES_2D) if chip.dims == 2 else
                 f"{chip.name}-8, -16, -32, -64, then multiples of 128")
        raise ValueError(f"topology {name!r}: no {chip.name} slice of {chips} chips; known sizes: {sizes} "
                         f"(or give the shape, e.g. {chip.name}:{'x'.join(['4'] * chip.dims)})")
    return Topology(chip, shape)


@dataclasses.dataclass
class MemoryReport:
    arguments: int
    outputs: int
    aliased: int  # outputs written in place of donated arguments
    temporaries: int
    generated_code: int
    hbm: int
    compiler_error: str | None = None  # the TPU compiler's own "ran out of HBM" verdict
    contents: str = "params, optimizer state, batch"  # what the arguments are

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

    @property
    def fits(self) -> bool:
        return self.compiler_error is None and self.total <= self.hbm

    @classmethod
    def from_compiled(cls, stats: Any, hbm: int, contents: str = "params, optimizer state, batch") -> "MemoryReport":
        return cls(stats.argument_size_in_bytes, stats.output_size_in_bytes, stats.alias_size_in_bytes,
                   stats.temp_size_in_bytes, stats.generated_code_size_in_bytes, hbm, contents=contents)

    def lines(self) -> list[str]:
        g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
        if self.compiler_error is not None:
            return ["per-device memory: the TPU compiler ran out of HBM",
                    f"  arguments       {g(self.arguments)}  ({self.contents})",
                    f"  compiler        {self.compiler_error}",
                    "fits: NO"]
        return ["per-device memory:",
                f"  arguments       {g(self.arguments)}  ({self.contents})",
                f"  outputs         {g(self.outputs)}  ({self.aliased / GiB:.2f} GiB of it in donated arguments)",
                f"  temporaries     {g(self.temporaries)}  (activations, gradients, collectives)",
                f"  generated code  {g(self.generated_code)}",
                f"  total           {g(self.total)}  of {self.hbm / GiB:.0f} GiB HBM ({self.total / self.hbm:.0%})",
                f"fits: yes ({(self.hbm - self.total) / GiB:.2f} GiB to spare)" if self.fits else
                f"fits: NO ({(self.total - self.hbm) / GiB:.2f} GiB over)"]


def topology_devices(topo: Topology) -> list:
    """Compile-only devices of the slice (needs libtpu; a clear error without it)."""
    import os

    # Quiet libtpu's probing of the TPU-VM metadata server, which does not exist here.
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("TPU_ACCELERATOR_TYPE", topo.slice_name.replace("v5e-", "v5litepod-"))):
        os.environ.setdefault(key, value)
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=topo.libtpu_name, chip_config_name=topo.chip.chip_config,
            chips_per_host_bounds=(1, 1, 1) if topo.chips == 1 else (2, 2, 1), num_slices=1, wrap=topo.wrap)
    except Exception as exc:  # no libtpu: RuntimeError / JaxRuntimeError with a long message
        raise RuntimeError(f"cannot create TPU topology {topo.libtpu_name}: {str(exc).splitlines()[0]} "
                           "(compile-check needs libtpu: make install-tpu, then .venv-tpu/bin/imitation-jax)") from None
    return list(desc.devices)


DEFAULT_TEACHER_K = 20  # kd.source=stored: top-K slots per position (OpenAI's top_logprobs maximum)


@dataclasses.dataclass
class Lowered:
    """The train step of a config lowered for a topology, not yet compiled."""

    lowered: Any  # jax.stages.Lowered
    args: tuple  # the abstract arguments it was lowered against: state, batch[, teacher params]
    lines: list[str]  # what is being checked, for the report
    contents: str = "params, optimizer state, batch"  # what the arguments are


def shard_bytes(tree: Any) -> int:
    """Bytes of `tree`'s abstract arrays held by one device (each leaf's shard shape x itemsize)."""
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def lower_train_step(cfg, topo: Topology, vocab_size: int | None = None, *, teacher=None,
                     teacher_k: int = DEFAULT_TEACHER_K, devices: list | None = None) -> Lowered:
    """`cfg`'s train step as `train` builds it (train.builder), for the topology's compile-only
    devices: the platform comes from them, so no CPU-only path is lowered.

    train.objective=kd: kd.source=stored batches carry `teacher_k` top-K slots per position (no data
    is read, so K is given); kd.source=teacher needs `teacher`, the teacher's ModelConfig in its own
    dtype (commands.compile_check reads it from kd.teacher or --teacher-model, never its weights),
    whose abstract params, sharded by the student's rules, are the step's third argument.
    `devices`: instead of the topology's (tests lower for CPU devices without libtpu)."""
    import jax
    from jax.sharding import AxisType

    from imitation_jax.errors import ConfigError
    from imitation_jax.sharding import MESH_AXES, mesh_shape
    from imitation_jax.train.builder import (abstract_teacher, build_program, check_teacher, micro_batch,
                                             resolve_model)

    try:
        jax.config.update("jax_platforms", "cpu")  # the local accelerator, if any, is not needed
    except Exception:
        pass
    model = cfg.model
    if vocab_size:
        model = dataclasses.replace(model, vocab_size=vocab_size)
    if model.vocab_size <= 0:
        raise ConfigError("compile-check reads no tokenizer: set model.vocab_size (e.g. 32000) or --vocab-size")
    seq_len = cfg.data.seq_len
    if not seq_len:
        raise ConfigError("compile-check reads no data: set data.seq_len")
    t = cfg.train
    kd_source = cfg.kd.source if t.objective == "kd" else None
    if kd_source == "teacher" and teacher is None:
        raise ConfigError("kd.source=teacher: compile-check needs the teacher's model config "
                          "(kd.teacher or --teacher-model)")
    if kd_source == "stored" and teacher_k < 1:
        raise ConfigError(f"kd.source=stored: --teacher-k={teacher_k} must be at least 1")
    devices = list(devices) if devices is not None else topology_devices(topo)
    try:
        shape = mesh_shape(cfg.mesh, len(devices))
    except ValueError as exc:
        raise ConfigError(f"config: {exc} on {topo.slice_name}") from None
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)
    micro = micro_batch(cfg, mesh, where=f" on {topo.slice_name}")
    model = resolve_model(model, mesh)
    lines = [f"compile-check: {topo.slice_name} = {topo.libtpu_name} ({topo.chips} chips, {len(devices)} devices "
             f"of {devices[0].device_kind}, {topo.chip.hbm_gib:g} GiB HBM each)",
             f"model: {model.num_params() / 1e9:.2f}B params ({model.param_dtype} params, {model.dtype} compute, "
             f"remat {model.remat}); mesh data={shape[0]} fsdp={shape[1]} tensor={shape[2]}; batch {t.batch_size} x "
             f"{seq_len} tokens in {t.grad_accum} micro-batch(es) of {micro // (shape[0] * shape[1])} row(s) per device"]
    contents = "params, optimizer state, batch"
    if kd_source == "stored":
        lines.append(f"objective: kd ({cfg.kd.loss}) from stored top-{teacher_k} teacher log-probabilities "
                     "in the batch")
    with jax.set_mesh(mesh):
        frozen = None
        if kd_source == "teacher":
            if not teacher.vocab_size:  # e.g. the tiny preset: an in-mesh teacher shares the tokenizer
                teacher = dataclasses.replace(teacher, vocab_size=model.vocab_size)
            frozen = abstract_teacher(teacher, mesh, cfg.kd.teacher or "--teacher-model")
            check_teacher(frozen, model)
            lines.append(f"objective: kd ({cfg.kd.loss}) from an in-mesh teacher: "
                         f"{frozen.config.num_params() / 1e9:.2f}B params ({frozen.config.param_dtype}), frozen, "
                         f"sharded like the student, {shard_bytes(frozen.params) / GiB:.2f} GiB per device")
            contents = "params, optimizer state, batch, teacher params"
        program = build_program(cfg, mesh, model, t.steps or 1000, frozen)
        args = (program.abstract_step_state(),
                program.abstract_batch(seq_len, teacher_k if kd_source == "stored" else 0))
        if program.lora:  # LoRA: the state is the adapters; the frozen base is the step's third argument
            args += (program.frozen,)
            contents = contents.replace("params, optimizer state", "adapters, their optimizer state") + ", frozen base"
            lines.append(f"lora: rank {model.lora.rank} on {', '.join(model.lora.targets)}, base "
                         f"{model.lora.base_quant or model.param_dtype}, {shard_bytes(program.frozen) / GiB:.2f} GiB "
                         "per device")
        if frozen is not None:
            args += (frozen.params,)
        return Lowered(program.train_step.lower(*args), args, lines, contents)


def compile_check(cfg, topo: Topology, vocab_size: int | None = None, out=print, *, teacher=None,
                  teacher_k: int = DEFAULT_TEACHER_K, devices: list | None = None) -> MemoryReport:
    """Lower and compile `cfg`'s train step for `topo`; print and return the per-device memory.
    `teacher`, `teacher_k`, `devices`: as in `lower_train_step`."""
    start = time.perf_counter()
    low = lower_train_step(cfg, topo, vocab_size, teacher=teacher, teacher_k=teacher_k, devices=devices)
    for line in low.lines:
        out(line)
    try:
        compiled = low.lowered.compile()
    except Exception as exc:  # XlaRuntimeError; the TPU compiler checks HBM itself
        match = re.search(r"RESOURCE_EXHAUSTED: (.*)", str(exc))
        if match is None:
            raise
        compiled = None
        error = match.group(1).strip()
    out(f"{'compiled' if compiled is not None else 'compiler gave up'} in {time.perf_counter() - start:.1f} s")
    if compiled is None:
        report = MemoryReport(shard_bytes(low.args), 0, 0, 0, 0, topo.hbm_bytes, compiler_error=error,
                              contents=low.contents)
    else:
        report = MemoryReport.from_compiled(compiled.memory_analysis(), topo.hbm_bytes, low.contents)
    for line in report.lines():
        out(line)
    return report
