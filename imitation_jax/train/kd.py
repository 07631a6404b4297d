"""Distillation losses: a divergence between the teacher's and the student's next-token
distributions at every trained position, in fp32, from final hidden states, chunk by chunk.

Two teacher signals:
- `sparse_kd_loss`: stored top-K per position (token ids + the teacher's log-probabilities of its
  full distribution, as an OpenAI-compatible API returns them). Both distributions are reduced to
  K + 1 outcomes: the K ids and one "tail" bucket holding the rest of the vocabulary.
- `dense_kd_loss`: a teacher in the same mesh; its logits come from its hidden states and output
  kernel inside the same chunks as the student's, so neither model's (tokens, vocab) logits exist
  beyond one chunk.

Divergences (`loss`), with P the teacher's distribution and Q the student's:
- "forward_kl": KL(P || Q) = sum P (log P - log Q)  (mode covering; the usual KD loss)
- "reverse_kl": KL(Q || P) = sum Q (log Q - log P)  (mode seeking)
- "jsd": the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2023, eq. 1, as TRL's
  `GKDTrainer.generalized_jsd_loss` computes it): with M = beta P + (1 - beta) Q,
  JSD(beta) = beta KL(P || M) + (1 - beta) KL(Q || M). Like TRL, beta = 0 is exactly forward KL and
  beta = 1 exactly reverse KL; for 0 < beta < 1 the value tends to beta KL(P || Q) as beta -> 0 and
  to (1 - beta) KL(Q || P) as beta -> 1, so the endpoints are the limits up to that scale.

Temperature T: dense, both models' logits are divided by T before the log-softmax (as in TRL).
Sparse, the same map is applied to both sides: each full distribution (at T = 1) is first reduced
to its K + 1 buckets, then tempered over those buckets (log p / T, renormalised). So a teacher equal
to the student gives zero loss at every T and K, and with K = vocabulary (empty tail) this is
exactly the dense tempering. No T^2 factor is applied (TRL's GKD applies none either); a caller
wanting Hinton's gradient scale multiplies the loss by T^2.

Both return *sums* (loss, trained tokens) like `train.loss.masked_cross_entropy` (with `targets`,
the student's cross entropy is weighted in from the same logits and a dict of parts follows); the
caller divides by the trained-token count of the whole global batch. The output layer and the divergence
are one `jax.custom_vjp` computed as in `train.loss`: the forward pass computes d(loss)/d(hidden)
and d(loss)/d(kernel) chunk by chunk (the divergence's gradient w.r.t. the chunk's logits in closed
form, written in the same pass as the loss), and the backward pass only scales them. The teacher
gets no gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from imitation_jax.errors import ConfigError
from imitation_jax.train.loss import cross_entropy_rows, output_layer

LOSSES = ("forward_kl", "reverse_kl", "jsd")

# Log-probability of an outcome that does not exist (a padded top-K slot, the tail bucket when all
# V ids are listed). Finite, so that 0 * (log p - log q) stays 0 and gradients stay free of NaN.
_NEG = -1e30


def check_divergence(loss: str, beta: float, temperature: float) -> None:
    """ConfigError (one line) unless `loss` is one of LOSSES, 0 <= beta <= 1 and temperature > 0."""
    if loss not in LOSSES:
        raise ConfigError(f"kd.loss must be one of {', '.join(LOSSES)}, not {loss!r}")
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"kd.beta must be in [0, 1], not {beta}")
    if not temperature > 0.0:
        raise ConfigError(f"kd.temperature must be > 0, not {temperature}")


def divergence(log_p: jax.Array, log_q: jax.Array, loss: str, beta: float = 0.5) -> jax.Array:
    """Per-row divergence over the last axis between normalised log-probabilities log_p (teacher)
    and log_q (student); outcomes with log-probability `_NEG` in both contribute nothing."""
    return _divergence_and_grad(log_p, log_q, loss, beta)[0]


def _divergence_and_grad(log_p, log_q, loss: str, beta: float):
    """(per-row divergence, its gradient w.r.t. the student's logits u, log_q = log_softmax(u)).
    With a = d(div)/dq, that gradient is q * (a - <q, a>): forward KL a = -p/q, so q - p; reverse
    KL a = log q - log p + 1; JSD a = (1 - beta)(log q - log m)."""
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    dot = lambda x, y: jnp.sum(x * y, axis=-1, keepdims=True)  # noqa: E731
    if loss == "forward_kl" or (loss == "jsd" and beta == 0.0):
        return dot(p, log_p - log_q)[..., 0], q - p
    if loss == "reverse_kl" or (loss == "jsd" and beta == 1.0):
        r = log_q - log_p
        div = dot(q, r)
        return div[..., 0], q * (r - div)
    log_m = jnp.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    a = (1.0 - beta) * (log_q - log_m)
    div = beta * dot(p, log_p - log_m) + dot(q, a)
    return div[..., 0], q * (a - dot(q, a))


def _identity(params, h):
    return h


def _call_module(graphdef, params, *xs):
    return nnx.merge(graphdef, params)(*xs)


def _log1mexp(x):
    """log(1 - exp(x)) for x <= 0, accurate at both ends (-inf at x = 0)."""
    return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _sparse_buckets(logits, ids, teacher_logprobs, temperature: float, tail_floor: float):
    """(rows, V) student logits, (rows, K) ids and teacher logprobs -> tempered log-probabilities
    (rows, K + 1) of the teacher and the student over the K ids and the tail bucket, and for the
    backward pass: the log-sum-exp of the unlisted ids' logits (rows, 1)."""
    v = logits.shape[-1]
    valid = (ids >= 0) & (ids < v)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    listed = jnp.take_along_axis(logits, jnp.where(valid, ids, 0), axis=-1)
    # The student's tail: the log-sum-exp of the logits of every id not listed (no cancellation).
    rows = jnp.arange(logits.shape[0])[:, None]
    in_set = jnp.zeros(logits.shape, bool).at[rows, jnp.where(valid, ids, v)].set(True, mode="drop")
    rest = jax.nn.logsumexp(jnp.where(in_set, _NEG, logits), axis=-1, keepdims=True)
    has_tail = jnp.sum(valid, axis=-1, keepdims=True) < v  # all V ids listed: no tail bucket
    student = jnp.concatenate([jnp.where(valid, listed - lse, _NEG), jnp.where(has_tail, rest - lse, _NEG)], -1)
    # The teacher's tail: 1 - (the listed mass), floored (the API's rounded logprobs may sum past 1,
    # and a zero tail would make the reverse KL infinite); the buckets are renormalised below.
    lt = jnp.where(valid, teacher_logprobs.astype(jnp.float32), _NEG)
    listed_mass = jax.nn.logsumexp(lt, axis=-1, keepdims=True)
    tail = jnp.maximum(_log1mexp(jnp.minimum(listed_mass, 0.0)), math.log(tail_floor))
    teacher = jax.lax.stop_gradient(jnp.concatenate([lt, jnp.where(has_tail, tail, _NEG)], -1))
    temper = lambda a: jax.nn.log_softmax(a / temperature, axis=-1)  # noqa: E731
    return temper(teacher), temper(student), rest


@dataclass(frozen=True)
class _Sparse:
    """Teacher signal per chunk: (ids (B, C, K), logprobs (B, C, K)); no teacher model."""
    loss: str
    beta: float
    temperature: float
    tail_floor: float
    kd_weight: float
    ce_weight: float

    def teacher(self, const, chunk):
        ids, logprobs = chunk
        return ids.reshape(-1, ids.shape[-1]), logprobs.reshape(-1, logprobs.shape[-1])

    def terms(self, logits, signal, y, m, with_grads: bool):
        ids = signal[0]
        plain = jnp.all((ids < 0) | (ids >= logits.shape[-1]), axis=-1).astype(jnp.float32)  # no target here
        return _with_cross_entropy(self, *self._divergence(logits, signal, m, with_grads), logits, y, m, with_grads,
                                   plain)

    def _divergence(self, logits, signal, m, with_grads: bool):
        """Masked divergence sum and its gradient w.r.t. the (rows, V) logits (None without grads)."""
        loss, beta, temperature, tail_floor = self.loss, self.beta, self.temperature, self.tail_floor
        ids, _ = signal
        log_p, log_q, rest = _sparse_buckets(logits, *signal, temperature, tail_floor)
        div, g = _divergence_and_grad(log_p, log_q, loss, beta)
        if not with_grads:
            return jnp.sum(div * m), None
        # g: the gradient w.r.t. the tempered buckets' logits (bucket log-probabilities / T). A listed
        # id's logit moves its bucket alone; an unlisted one moves the tail's log-sum-exp by its
        # share of the tail. The log-sum-exp over the whole vocabulary shifts every bucket alike,
        # which the tempered softmax ignores, so it contributes nothing.
        g = g * (m[:, None] / temperature)
        v = logits.shape[-1]
        rows = jnp.arange(logits.shape[0])[:, None]
        # Unlisted ids have logit <= rest; the listed ones' values are then overwritten in place.
        dlogits = g[:, -1:] * jnp.exp(jnp.minimum(logits - rest, 0.0))
        dlogits = dlogits.at[rows, jnp.where((ids >= 0) & (ids < v), ids, v)].set(g[:, :-1], mode="drop")
        return jnp.sum(div * m), dlogits


@dataclass(frozen=True)
class _Dense:
    """Teacher signal per chunk: its tail inputs (B, C, ...) -> its tempered logits (rows, V)."""
    loss: str
    beta: float
    temperature: float
    teacher_call: Callable
    kd_weight: float
    ce_weight: float

    def teacher(self, const, chunk):
        params, kernel = const
        hidden = self.teacher_call(params, *chunk)
        logits = jnp.dot(hidden.reshape(-1, hidden.shape[-1]), kernel, preferred_element_type=jnp.float32)
        return jax.lax.stop_gradient(logits / self.temperature)

    def terms(self, logits, tt, y, m, with_grads: bool):
        """Few (rows, V) arrays live at once: each side's log-sum-exp is a reduction that writes
        nothing, the log-probabilities are recomputed from it where used, and at T = 1 the cross
        entropy shares the student's log-sum-exp (less peak memory; docs/benchmarks.md)."""
        loss, temperature = self.loss, self.temperature
        st = logits if temperature == 1.0 else logits / temperature
        (ls, top), (lt, _) = _lse(st), _lse(tt)
        mm = m[:, None]
        if loss == "jsd" and 0.0 < self.beta < 1.0:
            div, g = _divergence_and_grad(tt - lt, st - ls, loss, self.beta)
            dkd = g * (mm / temperature) if with_grads else None
        elif loss == "forward_kl" or loss == "jsd" and self.beta == 0.0:  # sum p (log p - log q)
            div = jnp.sum(jnp.exp(tt - lt) * (tt - st), axis=-1) + (ls - lt)[:, 0]
            dkd = (jnp.exp(st - ls) - jnp.exp(tt - lt)) * (mm / temperature) if with_grads else None
        else:  # reverse KL: sum q (log q - log p)
            div = jnp.sum(jnp.exp(st - ls) * (st - tt), axis=-1) + (lt - ls)[:, 0]
            dkd = (jnp.exp(st - ls) * ((st - ls) - (tt - lt) - div[:, None])) * (mm / temperature) if with_grads else None
        # At T = 1 the cross entropy reuses the student's log-sum-exp and max.
        return _with_cross_entropy(self, jnp.sum(div * m), dkd, logits, y, m, with_grads,
                                   lse_top=(ls, top) if temperature == 1.0 else None)

def _lse(x):
    """(log-sum-exp, max) over the last axis, keepdims."""
    top = jnp.max(x, axis=-1, keepdims=True)
    return top + jnp.log(jnp.sum(jnp.exp(x - top), axis=-1, keepdims=True)), top


def _with_cross_entropy(kind, kd, dkd, logits, y, m, with_grads: bool, plain=None, lse_top=None):
    """(loss, kd, ce, correct, dlogits): the divergence sum kd (gradient dkd) weighted, plus the
    student's cross entropy on y from the same logits when y is given. plain (rows,) {0, 1}: rows
    with no teacher signal, whose cross entropy also takes the divergence's weight (they train with
    plain cross entropy)."""
    ce = correct = jnp.zeros((), jnp.float32)
    loss = kind.kd_weight * kd
    dlogits = kind.kd_weight * dkd if with_grads else None
    if y is not None:
        ce_rows, correct_rows, grad = cross_entropy_rows(logits, y, lse_top)
        w = kind.ce_weight * m if plain is None else (kind.ce_weight + kind.kd_weight * plain) * m
        ce, correct = jnp.sum(ce_rows * m), jnp.sum(correct_rows * m)
        loss = loss + jnp.sum(ce_rows * w)
        if with_grads:
            dlogits = dlogits + grad(w)
    return loss, kd, ce, correct, dlogits


def _chunk_terms(kind, tail, params, xs, kernel, const, tchunk, m, with_grads: bool):
    """One chunk: xs (B, C, ...) student tail inputs, tchunk (the teacher's chunk, targets (B, C) or
    None), m (B*C,) fp32 -> sums (loss, kd, ce, correct) [, d(tail params), d(xs), dkernel fp32]."""
    logits, backward = output_layer(tail, params, xs, kernel, with_grads)
    teacher_chunk, y = tchunk
    y = y.reshape(-1) if y is not None else None
    loss, kd, ce, correct, dlogits = kind.terms(logits, kind.teacher(const, teacher_chunk), y, m, with_grads)
    sums = (loss, kd, ce, correct)
    if not with_grads:
        return sums
    return (sums, *backward(dlogits))


def _over_chunks(kind, tail, params, xs, kernel, const, tchunks, m, live, with_grads: bool):
    """xs, tchunks: (n, B, C, ...) leaves, m (n, B*C): a loop over the n chunks that computes only
    the first `live` (trained positions come first, so the later chunks hold nothing to learn)."""
    n = m.shape[0]
    first = lambda tree: jax.tree.map(lambda a: a[0], tree)  # noqa: E731
    if n == 1:
        out = _chunk_terms(kind, tail, params, first(xs), kernel, const, first(tchunks), m[0], with_grads)
        return out if not with_grads else (out[0], out[1], tuple(d[None] for d in out[2]), out[3])
    f32_zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), tree)  # noqa: E731
    add = lambda a, b: jax.tree.map(jnp.add, a, b)  # noqa: E731

    def body(carry, chunk):
        i, xc, tc, mc = chunk

        def compute(carry):
            out = _chunk_terms(kind, tail, params, xc, kernel, const, tc, mc, with_grads)
            if not with_grads:
                return add(carry, out), None
            return add(carry, (out[0], out[1], out[3])), out[2]

        def skip(carry):
            return carry, (tuple(jnp.zeros(x.shape, x.dtype) for x in xc) if with_grads else None)

        return jax.lax.cond(i < live, compute, skip, carry)

    sums = (jnp.zeros((), jnp.float32),) * 4
    init = (sums, f32_zeros(params), f32_zeros(kernel)) if with_grads else sums
    carry, dxs = jax.lax.scan(body, init, (jnp.arange(n), tuple(xs), tchunks, m))
    if not with_grads:
        return carry
    return carry[0], carry[1], dxs, carry[2]


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_kd(kind, tail, params, xs, kernel, const, tchunks, m, live):
    return _over_chunks(kind, tail, params, xs, kernel, const, tchunks, m, live, with_grads=False)


def _fused_kd_fwd(kind, tail, params, xs, kernel, const, tchunks, m, live):
    sums, dparams, dxs, dk = _over_chunks(kind, tail, params, xs, kernel, const, tchunks, m, live, with_grads=True)
    cast = lambda d, like: jax.tree.map(lambda a, b: a.astype(b.dtype), d, like)  # noqa: E731
    return sums, (cast(dparams, params), cast(tuple(dxs), tuple(xs)), dk.astype(kernel.dtype))


def _fused_kd_bwd(kind, tail, res, g):
    # Only the weighted loss (sums[0]) is differentiated; the kd / ce / correct parts are metrics.
    scale = lambda tree: jax.tree.map(lambda a: (a * g[0]).astype(a.dtype), tree)  # noqa: E731
    dparams, dxs, dk = res
    return scale(dparams), scale(dxs), scale(dk), None, None, None, None


_fused_kd.defvjp(_fused_kd_fwd, _fused_kd_bwd)


def _split_tail(hidden, tail):
    if tail is None:
        return _identity, (), (hidden,)
    graphdef, params = nnx.split(tail)
    return partial(_call_module, graphdef), params, tuple(hidden)


def _run(kind, hidden, kernel, tail, const, teacher_per_position, targets, mask, chunk: int):
    """Sort trained positions first, cut (B, T, ...) into chunks, run the fused loss."""
    call, params, xs = _split_tail(hidden, tail)
    b, t = mask.shape
    mask = mask.astype(jnp.float32)
    kernel = kernel.astype(xs[0].dtype)
    per_position = (tuple(xs), (teacher_per_position, targets))
    if chunk <= 0 or chunk >= t:
        live, chunk = jnp.ones((), jnp.int32), t
    else:
        if t % chunk:  # pad the rows with untrained positions (they sort last and are skipped)
            pad = chunk - t % chunk
            per_position = jax.tree.map(
                lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)), per_position)
            mask = jnp.pad(mask, ((0, 0), (0, pad)))
            t += pad
        # Trained positions first within each row (the loss is a sum: order does not matter); chunk
        # c holds positions [c*chunk, (c+1)*chunk) of every row, computed only if one is trained.
        order = jnp.argsort(mask == 0, axis=1, stable=True)
        per_position = jax.tree.map(
            lambda x: jnp.take_along_axis(x, order.reshape(b, t, *(1,) * (x.ndim - 2)), axis=1), per_position)
        mask = jnp.take_along_axis(mask, order, axis=1)
        live = (jnp.max(jnp.sum(mask > 0, axis=1)) + chunk - 1) // chunk

    def to_chunks(x):  # (B, T, ...) -> (T/chunk, B, chunk, ...)
        return jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)

    xs, tchunks = jax.tree.map(to_chunks, per_position)
    m = to_chunks(mask).reshape(t // chunk, b * chunk)
    loss, kd, ce, correct = _fused_kd(kind, call, params, xs, kernel, const, tchunks, m, live)
    if targets is None:
        return loss, jnp.sum(mask)
    return loss, jnp.sum(mask), {"kd": kd, "ce": ce, "correct": correct}


def _check_weights(targets, ce_weight: float) -> None:
    if targets is None and ce_weight != 0.0:
        raise ValueError("ce_weight needs the targets")


def sparse_kd_loss(hidden, kernel: jax.Array, teacher_ids: jax.Array, teacher_logprobs: jax.Array,
                   mask: jax.Array, *, loss: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                   chunk: int = 0, tail: nnx.Module | None = None, tail_floor: float = 1e-6,
                   targets: jax.Array | None = None, kd_weight: float = 1.0, ce_weight: float = 0.0):
    """Divergence between the teacher's stored top-K and the student, summed over trained positions.

    hidden (B, T, D) the student's final hidden states (or, with `tail`, the tuple of its inputs,
    as in `masked_cross_entropy`); kernel (D, V) its output layer; teacher_ids (B, T, K) int, the
    teacher's K alternatives at each position (the distribution of the token *predicted* there,
    aligned like `targets`), distinct within a position, ids outside [0, V) (e.g. -1) are padded
    slots and ignored; teacher_logprobs (B, T, K) their log-probabilities under the teacher's full
    distribution (so they sum to <= 1 in probability); mask (B, T) {0, 1}.

    Each position compares two distributions over K + 1 outcomes: the listed ids and the tail (every
    other id). The student's are its full-vocabulary probabilities of those ids and of the rest; the
    teacher's tail is 1 - its listed mass, at least `tail_floor` while some id is unlisted, then
    renormalised. Both are then tempered over the buckets (module docstring). A position whose slots
    are all padded has only the tail bucket on both sides and costs 0.

    chunk > 0: (B, chunk) positions at a time, trained ones first, chunks past every row's last
    trained position skipped (as in `masked_cross_entropy`).

    Returns (loss sum, trained tokens) in fp32, loss = kd_weight * (divergence sum), differentiable
    w.r.t. hidden, kernel and the tail's parameters; the teacher's arrays get a zero gradient.
    With `targets` (B, T) int, the student's cross entropy on them is computed from the same chunk
    logits (one output layer for both) and the loss is kd_weight * kd + ce_weight * ce; the return
    is then (loss sum, trained tokens, {"kd": divergence sum, "ce": cross-entropy sum, "correct":
    correct predictions}), the dict's sums being metrics (not differentiated). A trained position
    with no teacher target (every slot padded: prepare found none there, e.g. an end-of-turn token
    or an alignment fallback) then trains with plain cross entropy: weight kd_weight + ce_weight.
    The train step will
    call it in `loss_sums` with batch["teacher_ids"], batch["teacher_logprobs"], batch["loss_mask"]
    (and batch["targets"] for `kd.alpha`), dividing every sum by the global trained-token count.
    """
    check_divergence(loss, beta, temperature)
    _check_weights(targets, ce_weight)
    if not tail_floor > 0.0:
        raise ConfigError(f"tail_floor must be > 0, not {tail_floor}")
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.shape[:2] != mask.shape:
        raise ValueError(f"teacher_ids {teacher_ids.shape} and teacher_logprobs {teacher_logprobs.shape} "
                         f"must both be (B, T, K) with (B, T) = mask's {mask.shape}")
    kind = _Sparse(loss, float(beta), float(temperature), float(tail_floor), float(kd_weight), float(ce_weight))
    teacher_ids = jnp.where(mask[..., None] > 0, teacher_ids, -1)  # untrained: nothing read, even NaN
    return _run(kind, hidden, kernel, tail, (), (teacher_ids, teacher_logprobs), targets, mask, chunk)


def dense_kd_loss(hidden, kernel: jax.Array, teacher_hidden, teacher_kernel: jax.Array, mask: jax.Array, *,
                  loss: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0, chunk: int = 0,
                  tail: nnx.Module | None = None, teacher_tail: nnx.Module | None = None,
                  targets: jax.Array | None = None, kd_weight: float = 1.0, ce_weight: float = 0.0):
    """Divergence between an in-mesh teacher and the student over the full vocabulary, summed over
    trained positions.

    hidden (B, T, D), kernel (D, V): the student's, as in `sparse_kd_loss`; teacher_hidden
    (B, T, Dt) and teacher_kernel (Dt, V): the teacher's final hidden states and output layer (same
    vocabulary, same positions), or with `teacher_tail` the tuple of its tail's inputs (the
    teacher's `trunk` output), so its last layer also runs for trained chunks only. Each chunk
    computes the teacher's and the student's logits together; the teacher side is under
    stop_gradient and gets a zero gradient. Logits are divided by `temperature` before the
    log-softmax. chunk, mask, targets, the weights and the return as in `sparse_kd_loss`.
    The train step will run the frozen teacher's `trunk` (or `__call__`) on the same batch and call
    this in `loss_sums` with teacher.output_kernel().
    """
    check_divergence(loss, beta, temperature)
    _check_weights(targets, ce_weight)
    t_call, t_params, t_xs = _split_tail(teacher_hidden, teacher_tail)
    t_kernel = teacher_kernel.astype(t_xs[0].dtype)
    kind = _Dense(loss, float(beta), float(temperature), t_call, float(kd_weight), float(ce_weight))
    return _run(kind, hidden, kernel, tail, (t_params, t_kernel), tuple(t_xs), targets, mask, chunk)
