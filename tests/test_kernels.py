"""Hand-written backward passes (fused linear cross entropy, blocked einsum attention, SwiGLU)
against plain autodiff of the textbook formulas. The attention runs as traced for CPU (its transposed
keys and values behind a conditional) and for other platforms (without)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imitation_jax.model.attention import attention, segment_mask
from imitation_jax.model.cpu import swiglu
from imitation_jax.train.loss import masked_cross_entropy


def _reference_ce(hidden, kernel, targets, mask):
    logp = jax.nn.log_softmax(hidden @ kernel, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logp, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(correct * mask), jnp.sum(mask)


@pytest.mark.parametrize("chunk", [0, 4, 8, 5])  # 5 does not divide 16: padded
def test_fused_cross_entropy_matches_autodiff(chunk):
    b, t, d, v = 3, 16, 8, 37
    ks = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(ks[0], (b, t, d))
    kernel = jax.random.normal(ks[1], (d, v)) * 0.5
    targets = jax.random.randint(ks[2], (b, t), 0, v)
    mask = np.zeros((b, t), np.float32)
    mask[0, 3:7] = 1     # trained tokens in the middle of a row
    mask[0, 12:14] = 1
    mask[1, -2:] = 1     # only at the end: sorting must bring them forward
    # row 2 trains nothing
    mask = jnp.asarray(mask)

    ours = masked_cross_entropy(hidden, kernel, targets, mask, chunk)
    ref = _reference_ce(hidden, kernel, targets, mask)
    for a, r in zip(ours, ref):
        np.testing.assert_allclose(a, r, rtol=1e-5)

    loss = lambda f: lambda h, k: f(h, k, targets, mask)[0]  # noqa: E731
    g_ours = jax.grad(loss(lambda h, k, y, m: masked_cross_entropy(h, k, y, m, chunk)), argnums=(0, 1))(hidden, kernel)
    g_ref = jax.grad(loss(_reference_ce), argnums=(0, 1))(hidden, kernel)
    for a, r in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)


def _reference_attention(q, k, v, segment_ids):
    h, kv = q.shape[2], k.shape[2]
    k, v = jnp.repeat(k, h // kv, axis=2), jnp.repeat(v, h // kv, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    s = jnp.where(segment_mask(segment_ids), s, -1e30)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(s, axis=-1), v)


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
@pytest.mark.parametrize("t", [256, 24])  # several query blocks (128) / one block
def test_blocked_einsum_attention_matches_autodiff(t, platform):
    b, h, kv, d = 2, 4, 2, 8
    ks = jax.random.split(jax.random.key(1), 4)
    q, k, v = (jax.random.normal(ks[i], (b, t, n, d)) for i, n in enumerate((h, kv, kv)))
    seg = np.ones((b, t), np.int32)
    seg[0, t // 3:] = 2  # two examples packed in row 0
    seg = jnp.asarray(seg)
    w = jax.random.normal(ks[3], (b, t, h, d))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    ours = lambda q, k, v: attention(q, k, v, seg, "einsum", platform)  # noqa: E731
    ref = lambda q, k, v: _reference_attention(q, k, v, seg)  # noqa: E731
    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
    for a, r in zip(jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v), jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)


def test_swiglu_matches_autodiff():
    ks = jax.random.split(jax.random.key(2), 5)
    x = jax.random.normal(ks[0], (2, 5, 8))
    gate, up = jax.random.normal(ks[1], (8, 12)), jax.random.normal(ks[2], (8, 12))
    down = jax.random.normal(ks[3], (12, 8))
    w = jax.random.normal(ks[4], (2, 5, 8))
    ref = lambda x, g, u, dn: (jax.nn.silu(x @ g) * (x @ u)) @ dn  # noqa: E731
    np.testing.assert_allclose(swiglu(x, gate, up, down), ref(x, gate, up, down), rtol=1e-5, atol=1e-5)
    args = (x, gate, up, down)
    g_ours = jax.grad(lambda *a: jnp.sum(swiglu(*a) * w), argnums=(0, 1, 2, 3))(*args)
    g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums=(0, 1, 2, 3))(*args)
    for a, r in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4)
