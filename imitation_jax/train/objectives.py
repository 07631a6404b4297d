"""Training objectives behind one loss interface: `sft` (cross entropy on the teacher's text) and
`kd` (a divergence to the teacher's distribution, optionally mixed with that cross entropy).

A loss function takes (params, micro-batch, *teacher) and returns (loss sum, sums), where `sums`
are per-token sums the train step divides by the trained tokens of the whole global batch and
reports as metrics. `kd.source=stored` reads the teacher's top-K from the rows (batch keys
`teacher_ids`, `teacher_logprobs`, written by `prepare` from `collect --top-logprobs`);
`kd.source=teacher` runs a frozen teacher in the same mesh on the same batch (its parameters are
the step's third argument: sharded by the same rules, no gradient, no optimizer state).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
from flax import nnx

from imitation_jax.errors import ConfigError
from imitation_jax.train.kd import check_divergence, dense_kd_loss, sparse_kd_loss
from imitation_jax.train.loss import masked_cross_entropy

OBJECTIVES = ("sft", "kd")
SOURCES = ("stored", "teacher")


@dataclasses.dataclass
class OnPolicyConfig:
    """GKD's on-policy term: part of each batch's rows replaced by the student's own samples
    (commands/on_policy.py), which the teacher then scores: the in-mesh teacher (kd.source=teacher)
    like any other row, or a served one (kd.source=stored + teacher_url) whose top-K becomes the
    rows' stored targets."""

    fraction: float = 0.0  # share of each global batch's rows made on-policy (0 = off)
    max_new_tokens: int = 128  # sampled tokens per row at most (the row's seq_len also bounds it)
    temperature: float = 1.0  # the student's sampling temperature (0 = greedy)
    teacher_url: Optional[str] = None  # kd.source=stored: an OpenAI-style /v1 base URL of the same-tokenizer teacher
    teacher_model: Optional[str] = None  # the model name sent to teacher_url
    teacher_timeout: float = 120.0  # seconds per scoring request
    teacher_max_retries: int = 3  # re-sends after a connection error, timeout, 408/409/429 or 5xx


@dataclasses.dataclass
class KDConfig:
    source: str = "stored"  # stored: the top-K in the prepared rows | teacher: a model in the same mesh
    teacher: Optional[str] = None  # kd.source=teacher: a run dir, import-hf dir or HF dir, loaded frozen
    teacher_dtype: Optional[str] = None  # the teacher's parameter and compute dtype (default: as saved)
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd (generalized JSD of GKD, with beta)
    beta: float = 0.5  # jsd only: 0 is forward KL, 1 reverse KL
    temperature: float = 1.0  # both distributions tempered (train.kd's docstring says how)
    alpha: float = 0.0  # weight of cross entropy on the teacher's text; the divergence gets 1 - alpha
    on_policy: OnPolicyConfig = dataclasses.field(default_factory=OnPolicyConfig)


def validate(objective: str, kd: KDConfig) -> None:
    if objective not in OBJECTIVES:
        raise ConfigError(f"config: train.objective={objective!r} is not one of {', '.join(OBJECTIVES)}")
    if objective != "kd":
        if kd.on_policy.fraction:
            raise ConfigError(f"config: kd.on_policy.fraction={kd.on_policy.fraction} needs train.objective=kd")
        return
    if kd.source not in SOURCES:
        raise ConfigError(f"config: kd.source={kd.source!r} is not one of {', '.join(SOURCES)}")
    if kd.source == "teacher" and not kd.teacher:
        raise ConfigError("config: kd.source=teacher needs kd.teacher (a run dir, import-hf dir or HF dir)")
    if kd.teacher_dtype not in (None, "float32", "bfloat16", "float16"):
        raise ConfigError(f"config: kd.teacher_dtype={kd.teacher_dtype!r} is not one of float32, bfloat16, float16")
    if not 0.0 <= kd.alpha <= 1.0:
        raise ConfigError(f"config: kd.alpha={kd.alpha} must be in [0, 1]")
    try:
        check_divergence(kd.loss, kd.beta, kd.temperature)
    except ConfigError as exc:
        raise ConfigError(f"config: {exc}") from None
    _validate_on_policy(kd)


def _validate_on_policy(kd: KDConfig) -> None:
    op = kd.on_policy
    if not 0.0 <= op.fraction <= 1.0:
        raise ConfigError(f"config: kd.on_policy.fraction={op.fraction} must be in [0, 1]")
    if op.max_new_tokens < 1:
        raise ConfigError(f"config: kd.on_policy.max_new_tokens={op.max_new_tokens} must be >= 1")
    if op.temperature < 0:
        raise ConfigError(f"config: kd.on_policy.temperature={op.temperature} must be >= 0 (0 = greedy)")
    if op.teacher_timeout <= 0 or op.teacher_max_retries < 0:
        raise ConfigError(f"config: kd.on_policy.teacher_timeout={op.teacher_timeout} must be > 0 and "
                          f"kd.on_policy.teacher_max_retries={op.teacher_max_retries} >= 0")
    if op.fraction == 0:
        return
    if kd.source == "teacher" and op.teacher_url:
        raise ConfigError(f"config: kd.on_policy.teacher_url={op.teacher_url} is for kd.source=stored; with "
                          "kd.source=teacher the in-mesh teacher scores the samples")
    if kd.source != "teacher" and not op.teacher_url:
        raise ConfigError(f"config: kd.on_policy with kd.source={kd.source} needs kd.on_policy.teacher_url (a served "
                          "teacher to score the samples), or kd.source=teacher (an in-mesh teacher)")
    if op.teacher_url and not op.teacher_model:
        raise ConfigError("config: kd.on_policy.teacher_url needs kd.on_policy.teacher_model (the served model's name)")
    if kd.alpha != 0:
        raise ConfigError(f"config: kd.on_policy needs kd.alpha=0 (kd.alpha={kd.alpha} would add cross entropy on "
                          "the student's own samples)")


def _student(graphdef, params, batch, fuse_last_layer: bool):
    """The student model, and its final hidden states (or, fused, the last layer's inputs + tail)."""
    model = nnx.merge(graphdef, params)
    args = batch["inputs"], batch["positions"], batch["segment_ids"]
    if fuse_last_layer:
        hidden, tail = model.trunk(*args)
    else:
        hidden, tail = model(*args), None
    return model, hidden, tail


def sft_sums(graphdef: nnx.GraphDef, params, batch: dict, loss_chunk: int = 0, fuse_last_layer: bool = True):
    """(loss sum, (correct, trained tokens)) of cross entropy for one (micro-)batch of rows (B, T).

    fuse_last_layer: the model stops before the last layer's position-wise part, which the chunked
    loss then runs for the chunks holding trained tokens only (the same sums, less work)."""
    model, hidden, tail = _student(graphdef, params, batch, fuse_last_layer)
    loss, correct, tokens = masked_cross_entropy(hidden, model.output_kernel(), batch["targets"],
                                                 batch["loss_mask"], loss_chunk, tail)
    return loss, (correct, tokens)


LossFn = Callable[..., tuple[jax.Array, dict]]


def make_loss_fn(graphdef: nnx.GraphDef, objective: str, kd: KDConfig, loss_chunk: int, fuse_last_layer: bool,
                 teacher_graphdef: Any = None) -> LossFn:
    """(params, micro-batch[, teacher params]) -> (objective sum, {metric: per-token sum})."""
    if objective == "sft":
        def sft(params, batch):
            loss, (correct, _) = sft_sums(graphdef, params, batch, loss_chunk, fuse_last_layer)
            return loss, {"accuracy": correct}
        return sft

    def kd_fn(params, batch, *teacher_params):
        model, hidden, tail = _student(graphdef, params, batch, fuse_last_layer)
        kernel, mask = model.output_kernel(), batch["loss_mask"]
        # The divergence and the cross entropy on the text in one pass over the output layer.
        options = dict(loss=kd.loss, beta=kd.beta, temperature=kd.temperature, chunk=loss_chunk, tail=tail,
                       targets=batch["targets"], kd_weight=1.0 - kd.alpha, ce_weight=kd.alpha)
        if kd.source == "stored":
            loss, _, parts = sparse_kd_loss(hidden, kernel, batch["teacher_ids"], batch["teacher_logprobs"], mask,
                                            **options)
        else:
            (t_params,) = teacher_params
            teacher = nnx.merge(teacher_graphdef, jax.lax.stop_gradient(t_params))
            args = batch["inputs"], batch["positions"], batch["segment_ids"]
            if fuse_last_layer:
                t_hidden, t_tail = teacher.trunk(*args)
            else:
                t_hidden, t_tail = teacher(*args), None
            loss, _, parts = dense_kd_loss(hidden, kernel, t_hidden, teacher.output_kernel(), mask,
                                           teacher_tail=t_tail, **options)
        return loss, {"accuracy": parts["correct"], "ce": parts["ce"], "kd": parts["kd"]}

    return kd_fn
