"""The study's configuration: OmegaConf structured config, a YAML file plus `dotted.key=value`
overrides, one-line `ConfigError`s for unknown keys and bad values (as `imitation_jax.settings`)."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from imitation_jax.settings import one_line, read_layers
from imitation_jax.errors import ConfigError
from imitation_jax.study.corpora import CorpusConfig
from imitation_jax.study.world import WorldConfig


@dataclasses.dataclass
class ModelSpec:  # passed to `train` as model.* (vocab from the tokenizer); unset fields: the preset's
    preset: str = "tiny"
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_layers: Optional[int] = None
    num_heads: Optional[int] = None
    num_kv_heads: Optional[int] = None


@dataclasses.dataclass
class TrainSpec:
    steps: Optional[int] = None  # exactly one of steps / epochs
    epochs: Optional[float] = None
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 10
    seq_len: int = 256
    overrides: list[str] = dataclasses.field(default_factory=list)  # more `train` overrides


@dataclasses.dataclass
class TeacherConfig:
    base_url: Optional[str] = None  # a real teacher's API (full scale): no teacher is trained or served
    model_name: str = "teacher"  # the name the teacher is asked for through the API
    export: bool = True  # serve the teacher from its export-hf dir (as a released model would be)
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    train: TrainSpec = dataclasses.field(default_factory=TrainSpec)


@dataclasses.dataclass
class BaseSpec:
    knows: str = "small"  # whose facts its pretraining text holds: small (common) | large (common + large)
    init_hf: Optional[str] = None  # full scale: a pretrained HF LLaMA dir; no pretraining stage
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    train: TrainSpec = dataclasses.field(default_factory=TrainSpec)


ARM_OBJECTIVES = ("sft", "kd", "on_policy")


@dataclasses.dataclass
class ArmSpec:
    """One way of learning from the teacher: sft (its text), kd (its stored top-K log-probabilities,
    collected with the answers) or on_policy (GKD: part of each batch is the student's own samples,
    scored by the served teacher; the rest is stored KD)."""
    objective: str = "sft"
    overrides: list[str] = dataclasses.field(default_factory=list)  # more `train` overrides for this arm


@dataclasses.dataclass
class CompareSpec:
    """The cells (base x set x budget) where every arm trains with every seed; null = all of that axis.
    Every other cell trains only the first arm with the first seed."""
    bases: Optional[list[str]] = None
    sets: Optional[list[str]] = None
    budgets: Optional[list[int]] = None


@dataclasses.dataclass
class ImitationConfig:
    sets: list[str] = dataclasses.field(default_factory=lambda: ["local", "broad"])
    budgets: list[int] = dataclasses.field(default_factory=lambda: [2000, 6000, 20000])  # trained tokens
    broad_prompts: Optional[str] = None  # default: the world's broad prompt pool
    local_seeds: Optional[str] = None  # default: the world's seed Q/A pairs
    local_num: int = 200  # bootstrapped local questions
    per_request: int = 5
    dedup_threshold: float = 0.8  # BLEU at which a bootstrapped question counts as a near duplicate
    max_tokens: int = 96
    bootstrap_max_tokens: int = 1024  # length limit of each question-generation reply
    temperature: float = 0.0
    concurrency: int = 8
    train: TrainSpec = dataclasses.field(default_factory=lambda: TrainSpec(lr=1e-3, batch_size=8))
    arms: dict[str, ArmSpec] = dataclasses.field(default_factory=lambda: {"sft": ArmSpec()})
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])  # each sets train.seed and data.seed
    compare: CompareSpec = dataclasses.field(default_factory=CompareSpec)
    top_logprobs: int = 20  # K collected with every answer when an arm distils (kd, on_policy)
    on_policy_fraction: float = 0.5  # on_policy arms' defaults (kd.on_policy.*; an arm's overrides win)
    on_policy_temperature: float = 1.0

    @property
    def distils(self) -> bool:
        return any(a.objective != "sft" for a in self.arms.values())


@dataclasses.dataclass
class EvalSpec:
    # table column -> lm-eval task; "local_task" names the local-imitation column
    tasks: dict[str, str] = dataclasses.field(default_factory=lambda: {
        "held_out_facts": "study_facts_heldout", "base_facts": "study_facts_base",
        "local_task": "study_local", "other_tasks": "study_other"})
    local_column: str = "local_task"  # the column of the local-imitation task
    include_path: Optional[str] = None  # default: the world's task dir
    limit: Optional[int] = None
    batch_size: int = 32
    num_fewshot: Optional[int] = None
    confirm_run_unsafe_code: bool = False  # needed by lm-eval's humaneval (runs generated code)
    in_process: bool = True  # run lm-eval in the study's process (the eval command's library calls);
    # false: one `imitation-jax eval` subprocess per model


@dataclasses.dataclass
class JudgeSpec:
    base_url: Optional[str] = None  # a judge API; default: the study's style judge, served locally
    model: str = "style-judge"
    prompts: Optional[str] = None  # default: the world's chat prompts
    max_new_tokens: int = 64
    concurrency: int = 8


@dataclasses.dataclass
class StudyConfig:
    work_dir: str = MISSING
    template: str = "koala"
    tokenizer: Optional[str] = None  # default: a SentencePiece model trained on the world's text
    vocab_size: int = 1024  # of that tokenizer
    world: WorldConfig = dataclasses.field(default_factory=WorldConfig)
    corpus: CorpusConfig = dataclasses.field(default_factory=CorpusConfig)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    bases: dict[str, BaseSpec] = dataclasses.field(default_factory=lambda: {
        "small": BaseSpec(knows="small"),
        "large": BaseSpec(knows="large")})
    imitation: ImitationConfig = dataclasses.field(default_factory=ImitationConfig)
    eval: EvalSpec = dataclasses.field(default_factory=EvalSpec)
    judge: JudgeSpec = dataclasses.field(default_factory=JudgeSpec)
    train_overrides: list[str] = dataclasses.field(default_factory=list)  # passed to every `train`


def load_study_config(path: Optional[str], overrides: Sequence[str] = ()) -> StudyConfig:
    layers = read_layers(path, overrides, label="study config")
    base = OmegaConf.structured(StudyConfig)
    for where, layer in layers:
        in_file = not where.startswith("override ")  # the file or one it extends
        if in_file and "bases" in layer:  # a file's bases replace the default pair (or those it extends)
            base.bases = {}
        if in_file and "arms" in (layer.get("imitation") or {}) or where.startswith("override 'imitation.arms="):
            base.imitation.arms = {}  # a file's arms, or `imitation.arms={...}`, replace the arms before it
        try:
            base = OmegaConf.merge(base, layer)
        except OmegaConfBaseException as exc:
            raise ConfigError(one_line(exc, where)) from None
    try:
        if OmegaConf.is_missing(base, "work_dir"):
            raise ConfigError("study config: required key not set: work_dir")
        cfg: StudyConfig = OmegaConf.to_object(base)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise ConfigError(one_line(exc, "study config")) from None
    _validate(cfg)
    return cfg


def _validate(cfg: StudyConfig) -> None:
    if not cfg.bases:
        raise ConfigError("study config: bases: at least one base model is needed")
    for name, b in cfg.bases.items():
        if b.knows not in ("small", "large"):
            raise ConfigError(f"study config: bases.{name}.knows={b.knows!r} is not one of small, large")
        if b.init_hf is None and (b.train.steps is None) == (b.train.epochs is None):
            raise ConfigError(f"study config: bases.{name}.train: set exactly one of steps and epochs")
    for key, spec in [("imitation.train", cfg.imitation.train)] + ([("teacher.train", cfg.teacher.train)] if cfg.teacher.base_url is None else []):
        if (spec.steps is None) == (spec.epochs is None):
            raise ConfigError(f"study config: {key}: set exactly one of steps and epochs")
    bad = [s for s in cfg.imitation.sets if s not in ("local", "broad")]
    if bad or not cfg.imitation.sets:
        raise ConfigError(f"study config: imitation.sets={cfg.imitation.sets} must name local and/or broad")
    if not cfg.imitation.budgets or any(b < 1 for b in cfg.imitation.budgets):
        raise ConfigError(f"study config: imitation.budgets={cfg.imitation.budgets} must be positive token counts")
    _validate_arms(cfg)
    if "local" in cfg.imitation.sets and cfg.eval.local_column not in cfg.eval.tasks:
        raise ConfigError(f"study config: eval.local_column={cfg.eval.local_column!r} is not a column of eval.tasks "
                          f"({', '.join(cfg.eval.tasks)})")


def _validate_arms(cfg: StudyConfig) -> None:
    im = cfg.imitation
    if not im.arms:
        raise ConfigError("study config: imitation.arms: at least one arm is needed (e.g. sft: {})")
    for name, arm in im.arms.items():
        if arm.objective not in ARM_OBJECTIVES:
            raise ConfigError(f"study config: imitation.arms.{name}.objective={arm.objective!r} is not one of "
                              f"{', '.join(ARM_OBJECTIVES)}")
        if not name.replace("_", "").isalnum():
            raise ConfigError(f"study config: imitation.arms: the name {name!r} must be letters, digits and _")
    if not im.seeds or len(set(im.seeds)) != len(im.seeds):
        raise ConfigError(f"study config: imitation.seeds={im.seeds} must be distinct and at least one")
    if im.distils and not 1 <= im.top_logprobs <= 20:
        raise ConfigError(f"study config: imitation.top_logprobs={im.top_logprobs} must be 1-20 for the kd and "
                          "on_policy arms")
    for axis, allowed in (("bases", list(cfg.bases)), ("sets", im.sets), ("budgets", im.budgets)):
        picked = getattr(im.compare, axis)
        bad = [v for v in picked or [] if v not in allowed]
        if bad:
            raise ConfigError(f"study config: imitation.compare.{axis}={picked}: {bad} not among imitation's "
                              f"{axis} ({', '.join(map(str, allowed))})")
