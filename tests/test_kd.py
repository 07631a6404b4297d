"""Distillation losses (train.kd) against autodiff of the textbook formulas written plainly with full
logits: the K + 1-bucket distributions of the sparse loss are built by hand, row by row. Tiny fp32
shapes (vocabulary 50)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imitation_jax.errors import ConfigError
from imitation_jax.train.kd import dense_kd_loss, sparse_kd_loss
from imitation_jax.train.loss import masked_cross_entropy

B, T, D, DT, V, K = 3, 8, 6, 10, 50, 5
FLOOR = 1e-6
CASES = [("forward_kl", 0.5, 1.0), ("reverse_kl", 0.5, 2.0), ("jsd", 0.5, 0.7), ("jsd", 0.1, 1.0),
         ("jsd", 0.9, 1.5)]


def _kl(p, q):
    return jnp.sum(p * (jnp.log(p) - jnp.log(q)))


def _reference_divergence(p, q, loss, beta):
    """Probabilities p (teacher), q (student) over one row's outcomes."""
    if loss == "forward_kl" or (loss == "jsd" and beta == 0):
        return _kl(p, q)
    if loss == "reverse_kl" or (loss == "jsd" and beta == 1):
        return _kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def _reference_dense(h, k, th, tk, mask, loss, beta, temp):
    q = jax.nn.softmax((h @ k) / temp, axis=-1)
    p = jax.nn.softmax(jax.lax.stop_gradient(th @ tk) / temp, axis=-1)
    total = 0.0
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            total = total + mask[b, t] * _reference_divergence(p[b, t], q[b, t], loss, beta)
    return total, jnp.sum(mask)


def _temper(probs, temp):
    w = probs ** (1.0 / temp)
    return w / jnp.sum(w)


def _reference_sparse(h, k, ids, logprobs, mask, loss, beta, temp):
    """Row by row: the listed ids and one tail bucket, for the teacher (tail = 1 - listed mass,
    floored, renormalised) and the student (its full softmax), each tempered over the buckets."""
    q_full = jax.nn.softmax(h @ k, axis=-1)
    ids, logprobs, mask = np.asarray(ids), np.asarray(logprobs), np.asarray(mask)
    total = 0.0
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            if mask[b, t] == 0:
                continue
            keep = [j for j in range(ids.shape[-1]) if 0 <= ids[b, t, j] < V]
            listed = [int(ids[b, t, j]) for j in keep]
            rest = [i for i in range(V) if i not in listed]
            p = [float(np.exp(logprobs[b, t, j])) for j in keep]
            q = [q_full[b, t, i] for i in listed]
            if rest:
                p.append(max(1.0 - sum(p), FLOOR))
                q.append(jnp.sum(q_full[b, t, np.asarray(rest)]))
            p = jnp.asarray(p) / sum(p)
            total = total + _reference_divergence(_temper(p, temp), _temper(jnp.stack(q), temp), loss, beta)
    return total, jnp.asarray(mask.sum(), jnp.float32)


def _inputs(seed=0, t=T):
    ks = jax.random.split(jax.random.key(seed), 5)
    hidden = jax.random.normal(ks[0], (B, t, D))
    kernel = jax.random.normal(ks[1], (D, V)) * 0.7
    t_hidden = jax.random.normal(ks[2], (B, t, DT))
    t_kernel = jax.random.normal(ks[3], (DT, V)) * 0.7
    mask = np.zeros((B, t), np.float32)
    mask[0, 1:4] = 1
    mask[0, t - 2] = 1
    mask[1, t - 3:] = 1  # only at the end: sorting brings them forward
    mask[2, 0] = 1
    return hidden, kernel, t_hidden, t_kernel, jnp.asarray(mask)


def _top_k(t_hidden, t_kernel, k=K):
    """The teacher's top-k ids and full-distribution logprobs, a few slots padded (-1), one trained
    position with every slot padded."""
    logp = jax.nn.log_softmax(t_hidden @ t_kernel, axis=-1)
    lp, ids = jax.lax.top_k(logp, k)
    ids, lp = np.array(ids), np.array(lp)
    ids[0, 2, k - 2:] = -1
    lp[0, 2, k - 2:] = 0.0
    ids[1, -1, 1:] = -1
    ids[2, 0, :] = -1
    return jnp.asarray(ids), jnp.asarray(lp)


def _assert_loss_and_grads(ours, ref, args, rtol=1e-5, atol=1e-6):
    """ours, ref: (hidden, kernel) -> (loss sum, tokens); compares values and d/d(hidden, kernel)."""
    a, r = ours(*args), ref(*args)
    np.testing.assert_allclose(a[0], r[0], rtol=rtol, atol=atol)
    np.testing.assert_allclose(a[1], r[1])
    ga = jax.grad(lambda *x: ours(*x)[0], argnums=(0, 1))(*args)
    gr = jax.grad(lambda *x: ref(*x)[0], argnums=(0, 1))(*args)
    for x, y in zip(ga, gr):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("loss,beta,temp", CASES)
@pytest.mark.parametrize("chunk", [0, 3])
def test_sparse_matches_reference(loss, beta, temp, chunk):
    hidden, kernel, th, tk, mask = _inputs()
    ids, lp = _top_k(th, tk)
    ours = lambda h, k: sparse_kd_loss(h, k, ids, lp, mask, loss=loss, beta=beta, temperature=temp,  # noqa: E731
                                       chunk=chunk, tail_floor=FLOOR)
    ref = lambda h, k: _reference_sparse(h, k, ids, lp, mask, loss, beta, temp)  # noqa: E731
    _assert_loss_and_grads(ours, ref, (hidden, kernel))
    assert ours(hidden, kernel)[0] > 0


def test_sparse_teacher_tail_floor():
    """A teacher whose rounded logprobs sum past 1: its tail is the floor, renormalised; the reverse
    KL stays finite."""
    hidden, kernel, th, tk, mask = _inputs(1)
    ids, lp = _top_k(th, tk)
    lp = lp.at[:, :, 0].set(0.0)  # "certain" top token, as APIs report it
    for loss in ("forward_kl", "reverse_kl", "jsd"):
        ours = lambda h, k: sparse_kd_loss(h, k, ids, lp, mask, loss=loss, tail_floor=FLOOR)  # noqa: E731
        ref = lambda h, k: _reference_sparse(h, k, ids, lp, mask, loss, 0.5, 1.0)  # noqa: E731
        _assert_loss_and_grads(ours, ref, (hidden, kernel), rtol=1e-4)
        assert np.isfinite(ours(hidden, kernel)[0])


@pytest.mark.parametrize("loss,beta,temp", CASES)
@pytest.mark.parametrize("chunk", [0, 3])
def test_dense_matches_reference(loss, beta, temp, chunk):
    hidden, kernel, th, tk, mask = _inputs()
    ours = lambda h, k: dense_kd_loss(h, k, th, tk, mask, loss=loss, beta=beta, temperature=temp,  # noqa: E731
                                      chunk=chunk)
    ref = lambda h, k: _reference_dense(h, k, th, tk, mask, loss, beta, temp)  # noqa: E731
    _assert_loss_and_grads(ours, ref, (hidden, kernel))


@pytest.mark.parametrize("loss,beta,temp", CASES)
def test_identical_teacher_gives_zero_loss_and_gradient(loss, beta, temp):
    hidden, kernel, _, _, mask = _inputs(2)
    kw = dict(loss=loss, beta=beta, temperature=temp)
    dense = lambda h, k: dense_kd_loss(h, k, hidden, kernel, mask, **kw)[0]  # noqa: E731
    logp = jax.nn.log_softmax(hidden @ kernel, axis=-1)
    perm = jnp.broadcast_to(jax.random.permutation(jax.random.key(3), V), (B, T, V))
    full = lambda h, k: sparse_kd_loss(h, k, perm, jnp.take_along_axis(logp, perm, -1), mask, **kw)[0]  # noqa: E731
    lp, ids = jax.lax.top_k(logp, K)  # K < V: the tail bucket is the student's own tail, at any temperature
    top = lambda h, k: sparse_kd_loss(h, k, ids, lp, mask, **kw)[0]  # noqa: E731
    for f in (dense, full, top):
        np.testing.assert_allclose(f(hidden, kernel), 0.0, atol=2e-6)
        for g in jax.grad(f, argnums=(0, 1))(hidden, kernel):
            np.testing.assert_allclose(g, 0.0, atol=2e-6)


@pytest.mark.parametrize("loss,beta,temp", CASES)
def test_sparse_with_every_id_equals_dense(loss, beta, temp):
    hidden, kernel, th, tk, mask = _inputs(4)
    logp = jax.nn.log_softmax(th @ tk, axis=-1)
    perm = jnp.stack([jax.random.permutation(k, V) for k in jax.random.split(jax.random.key(5), B * T)])
    ids = perm.reshape(B, T, V)
    kw = dict(loss=loss, beta=beta, temperature=temp, chunk=3)
    sparse = lambda h, k: sparse_kd_loss(h, k, ids, jnp.take_along_axis(logp, ids, -1), mask, **kw)  # noqa: E731
    dense = lambda h, k: dense_kd_loss(h, k, th, tk, mask, **kw)  # noqa: E731
    _assert_loss_and_grads(sparse, dense, (hidden, kernel))


@pytest.mark.parametrize("source", ["sparse", "dense"])
def test_masked_and_padded_positions_contribute_nothing(source):
    hidden, kernel, th, tk, mask = _inputs(6)
    ids, lp = _top_k(th, tk)
    off = (mask == 0)[..., None]
    noise = jax.random.normal(jax.random.key(7), hidden.shape) * 3
    hidden2 = jnp.where(off, hidden + noise, hidden)
    th2 = jnp.where(off, th * 2 + 1, th)
    ids2 = jnp.where(off, (ids + 7) % V, ids)
    lp2 = jnp.where(off, jnp.nan, jnp.where(ids < 0, -3.0, lp))  # padded slots' values are ignored
    # more slots, all padded
    ids2 = jnp.concatenate([ids2, jnp.full((B, T, 2), -1)], -1)
    lp2 = jnp.concatenate([lp2, jnp.full((B, T, 2), 5.0)], -1)
    for loss in ("forward_kl", "reverse_kl", "jsd"):
        if source == "sparse":
            f1 = lambda h, k: sparse_kd_loss(h, k, ids, lp, mask, loss=loss, chunk=3)[0]  # noqa: E731
            f2 = lambda h, k: sparse_kd_loss(h, k, ids2, lp2, mask, loss=loss, chunk=3)[0]  # noqa: E731
        else:
            f1 = lambda h, k: dense_kd_loss(h, k, th, tk, mask, loss=loss, chunk=3)[0]  # noqa: E731
            f2 = lambda h, k: dense_kd_loss(h, k, th2, tk, mask, loss=loss, chunk=3)[0]  # noqa: E731
        np.testing.assert_allclose(f2(hidden2, kernel), f1(hidden, kernel), rtol=1e-6)
        g1, g2 = jax.grad(f1, argnums=(0, 1))(hidden, kernel), jax.grad(f2, argnums=(0, 1))(hidden2, kernel)
        np.testing.assert_allclose(g2[1], g1[1], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(g2[0], g1[0], rtol=1e-5, atol=1e-7)
        assert not np.any(np.asarray(g1[0])[np.asarray(mask) == 0])


@pytest.mark.parametrize("source", ["sparse", "dense"])
def test_chunked_equals_unchunked(source):
    t = 16
    hidden, kernel, th, tk, mask = _inputs(8, t)
    ids, lp = _top_k(th, tk)
    for loss, beta, temp in CASES[:3]:
        kw = dict(loss=loss, beta=beta, temperature=temp)
        if source == "sparse":
            f = lambda h, k, c: sparse_kd_loss(h, k, ids, lp, mask, chunk=c, **kw)  # noqa: E731
        else:
            f = lambda h, k, c: dense_kd_loss(h, k, th, tk, mask, chunk=c, **kw)  # noqa: E731
        def value_and_grads(chunk):  # one traced evaluation: ((loss, trained count), (d hidden, d kernel))
            return jax.value_and_grad(lambda h, k: f(h, k, chunk), argnums=(0, 1), has_aux=True)(hidden, kernel)

        whole, g_whole = value_and_grads(0)
        for chunk in (1, 4, 5, 16, 40):  # 5 does not divide 16: padded
            (loss, count), g = value_and_grads(chunk)
            np.testing.assert_allclose(loss, whole[0], rtol=1e-5)
            assert count == whole[1] == mask.sum()
            for a, b in zip(g, g_whole):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("source", ["sparse", "dense"])
def test_jsd_endpoints_are_the_kls(source):
    """beta = 0 / 1 are exactly forward / reverse KL; near them the JSD is beta (1 - beta) times it
    (to first order: the teacher is a perturbed student, so the next order stays small)."""
    hidden, kernel, _, _, mask = _inputs(9)
    th, tk = hidden, kernel + 0.3 * jax.random.normal(jax.random.key(17), kernel.shape)
    ids, lp = _top_k(th, tk)
    if source == "sparse":
        f = lambda loss, beta: sparse_kd_loss(hidden, kernel, ids, lp, mask, loss=loss, beta=beta,  # noqa: E731
                                              temperature=1.3)[0]
    else:
        f = lambda loss, beta: dense_kd_loss(hidden, kernel, th, tk, mask, loss=loss, beta=beta,  # noqa: E731
                                             temperature=1.3)[0]
    fwd, rev = f("forward_kl", 0.5), f("reverse_kl", 0.5)
    assert fwd > 0 and rev > 0 and not np.isclose(fwd, rev, rtol=1e-2)
    np.testing.assert_allclose(f("jsd", 0.0), fwd, rtol=1e-6)
    np.testing.assert_allclose(f("jsd", 1.0), rev, rtol=1e-6)
    np.testing.assert_allclose(f("jsd", 1e-3) / 1e-3, fwd, rtol=1e-2)
    np.testing.assert_allclose(f("jsd", 1 - 1e-3) / 1e-3, rev, rtol=1e-2)


def test_teacher_gets_no_gradient():
    hidden, kernel, th, tk, mask = _inputs(10)
    ids, lp = _top_k(th, tk)
    for loss in ("forward_kl", "jsd"):
        gd = jax.grad(lambda a, b: dense_kd_loss(hidden, kernel, a, b, mask, loss=loss, chunk=3)[0],
                      argnums=(0, 1))(th, tk)
        gs = jax.grad(lambda a: sparse_kd_loss(hidden, kernel, ids, a, mask, loss=loss, chunk=3)[0])(lp)
        for g in (*gd, gs):
            assert not np.any(np.asarray(g))


class _Tail(nnx.Module):
    """Position-wise, two inputs, like `Llama.trunk`'s tail."""

    def __init__(self, d_in, d_a, d_out, seed):
        ks = jax.random.split(jax.random.key(seed), 2)
        self.w = nnx.Param(jax.random.normal(ks[0], (d_in, d_out)) * 0.5)
        self.u = nnx.Param(jax.random.normal(ks[1], (d_a, d_out)) * 0.5)

    def __call__(self, x, a):
        return jnp.tanh(x @ self.w[...] + a @ self.u[...])


@pytest.mark.parametrize("source", ["sparse", "dense"])
def test_tails_run_inside_the_chunks(source):
    """With tail modules the student's (differentiated: params, inputs, kernel) and the teacher's last
    layers run in the chunks; the same as applying them first."""
    hidden, kernel, th, tk, mask = _inputs(11)
    a, ta = jax.random.normal(jax.random.key(12), (B, T, 4)), jax.random.normal(jax.random.key(13), (B, T, 3))
    tail, t_tail = _Tail(D, 4, D, 14), _Tail(DT, 3, DT, 15)
    graphdef, params = nnx.split(tail)
    ids, lp = _top_k(t_tail(th, ta), tk)
    kw = dict(loss="jsd", beta=0.3, temperature=1.2, chunk=3)

    def ours(params, x, k):
        if source == "sparse":
            return sparse_kd_loss((x, a), k, ids, lp, mask, tail=nnx.merge(graphdef, params), **kw)[0]
        return dense_kd_loss((x, a), k, (th, ta), tk, mask, tail=nnx.merge(graphdef, params), teacher_tail=t_tail,
                             **kw)[0]

    def ref(params, x, k):
        h = nnx.merge(graphdef, params)(x, a)
        if source == "sparse":
            return _reference_sparse(h, k, ids, lp, mask, "jsd", 0.3, 1.2)[0]
        return _reference_dense(h, k, t_tail(th, ta), tk, mask, "jsd", 0.3, 1.2)[0]

    np.testing.assert_allclose(ours(params, hidden, kernel), ref(params, hidden, kernel), rtol=1e-5)
    g_ours = jax.grad(ours, argnums=(0, 1, 2))(params, hidden, kernel)
    g_ref = jax.grad(ref, argnums=(0, 1, 2))(params, hidden, kernel)
    for x, y in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_under_jit_with_bf16_hidden():
    """The train step's setting: jitted, bf16 hidden states and kernel; fp32 loss close to fp32's."""
    hidden, kernel, th, tk, mask = _inputs(16)
    ids, lp = _top_k(th, tk)
    f = jax.jit(lambda h, k: sparse_kd_loss(h, k, ids, lp, mask, loss="jsd", chunk=3))
    g = jax.jit(lambda h, k, a, b: dense_kd_loss(h, k, a, b, mask, loss="reverse_kl", chunk=3))
    bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
    for ours, ref in ((f(bf(hidden), bf(kernel)), f(hidden, kernel)),
                      (g(bf(hidden), bf(kernel), bf(th), bf(tk)), g(hidden, kernel, th, tk))):
        assert ours[0].dtype == jnp.float32
        np.testing.assert_allclose(ours[0], ref[0], rtol=5e-2)
    grads = jax.jit(jax.grad(lambda h, k: f(h, k)[0], argnums=(0, 1)))(bf(hidden), bf(kernel))
    assert grads[0].dtype == grads[1].dtype == jnp.bfloat16


def _reference_ce(h, k, targets, mask):
    logp = jax.nn.log_softmax(h @ k, axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * mask)


@pytest.mark.parametrize("source", ["sparse", "dense"])
@pytest.mark.parametrize("chunk", [0, 3])
@pytest.mark.parametrize("loss,temp", [("reverse_kl", 1.5), ("forward_kl", 1.0), ("forward_kl", 2.0)])
def test_cross_entropy_weighted_in_from_the_same_logits(source, chunk, loss, temp):
    """With targets: loss = kd_weight * kd + ce_weight * ce, its gradient that of the textbook mix;
    the parts equal the divergence alone and `masked_cross_entropy` (dense forward KL at T = 1
    shares the student's softmax between the two: its own code path)."""
    hidden, kernel, th, tk, mask = _inputs(18)
    ids, lp = _top_k(th, tk)
    targets = jax.random.randint(jax.random.key(19), (B, T), 0, V)
    targets = jnp.where(jnp.arange(T) % 2 == 0, jnp.argmax(hidden @ kernel, -1), targets)  # some correct
    kw = dict(loss=loss, temperature=temp, chunk=chunk)
    if source == "sparse":
        f = lambda h, k, **w: sparse_kd_loss(h, k, ids, lp, mask, **kw, **w)  # noqa: E731
        kd_ref = lambda h, k: _reference_sparse(h, k, ids, lp, mask, loss, 0.5, temp)[0]  # noqa: E731
    else:
        f = lambda h, k, **w: dense_kd_loss(h, k, th, tk, mask, **kw, **w)  # noqa: E731
        kd_ref = lambda h, k: _reference_dense(h, k, th, tk, mask, loss, 0.5, temp)[0]  # noqa: E731
    ours = lambda h, k: f(h, k, targets=targets, kd_weight=0.4, ce_weight=0.6)[:2]  # noqa: E731
    # Sparse: a trained position with every slot padded (no teacher target) trains with plain cross
    # entropy, the divergence's weight included.
    plain = jnp.all(ids < 0, axis=-1) * mask if source == "sparse" else jnp.zeros_like(mask)
    ref = lambda h, k: (0.4 * kd_ref(h, k) + 0.6 * _reference_ce(h, k, targets, mask)  # noqa: E731
                        + 0.4 * _reference_ce(h, k, targets, plain), jnp.sum(mask))
    _assert_loss_and_grads(ours, ref, (hidden, kernel))
    _, tokens, parts = f(hidden, kernel, targets=targets, kd_weight=0.4, ce_weight=0.6)
    ce, correct, ce_tokens = masked_cross_entropy(hidden, kernel, targets, mask)
    np.testing.assert_allclose(parts["kd"], f(hidden, kernel)[0], rtol=1e-6)
    np.testing.assert_allclose(parts["ce"], ce, rtol=1e-6)
    assert parts["correct"] == correct > 0 and tokens == ce_tokens
    with pytest.raises(ValueError, match="ce_weight needs the targets"):
        f(hidden, kernel, ce_weight=0.5)


@pytest.mark.parametrize("kw,message", [
    (dict(loss="kl"), "kd.loss must be one of forward_kl, reverse_kl, jsd"),
    (dict(beta=1.5), "kd.beta must be in"),
    (dict(temperature=0.0), "kd.temperature must be > 0"),
])
def test_bad_settings_are_one_line_errors(kw, message):
    hidden, kernel, th, tk, mask = _inputs()
    ids, lp = _top_k(th, tk)
    with pytest.raises(ConfigError, match=message):
        sparse_kd_loss(hidden, kernel, ids, lp, mask, **kw)
    with pytest.raises(ConfigError, match=message):
        dense_kd_loss(hidden, kernel, th, tk, mask, **kw)
