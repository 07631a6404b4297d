"""Log-likelihood of continuations on our model, batched, bucketed and exact.

`score_requests` takes (context ids, continuation ids) pairs and returns, for each, the summed
log-probability of the continuation and whether greedy decoding would produce it (the argmax over
the whole vocabulary equals every continuation token: the same test as lm-eval's HF backend).

How it stays fast:
- requests are sorted longest first and run `batch_size` rows at a time; rows are right-padded to a
  length bucket (powers of two and 1.5x between them) and the batch to a fixed size, so a handful of shapes compile once;
- only the positions that predict continuation tokens go through the output layer (hidden states
  are gathered first), so the (batch, seq, vocab) logits tensor is never built;
- requests whose input rows are identical and whose continuations differ only in the last token
  (the choices " A"/" B"/" C"/" D" of a multiple-choice question) share one forward pass: the
  device returns the full log-softmax of that last position and each request reads its own token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LOGITS_CHUNK = 128  # continuation positions through the output layer at once (bounds memory)


def _bucket(n: int, lo: int, hi: int) -> int:
    """The smallest of lo * 2^k and (from 4 up) 1.5 * lo * 2^k that holds n — at most a third is
    padding and few shapes compile — capped at hi."""
    k = lo
    while True:
        for size in (k, k * 3 // 2 if k >= 4 else k):
            if size >= n:
                return min(size, hi) if hi >= n else n
        k *= 2


def make_score_fn(graphdef: nnx.GraphDef) -> Callable:
    """jit(params, tokens (B,T), starts (B,), n_cont (B,), targets (B,K)) ->
    (sum of log p over the first n_cont-1 targets (B,), all-greedy over them (B,),
     log-softmax at the last continuation position (B, V))."""

    def fn(params, tokens, starts, n_cont, targets):
        model = nnx.merge(graphdef, params)
        hidden = model(tokens)  # right padding: causal attention keeps pads out of real positions
        k = targets.shape[1]
        idx = jnp.minimum(starts[:, None] + jnp.arange(k)[None, :], tokens.shape[1] - 1)
        h = jnp.take_along_axis(hidden, idx[..., None], axis=1)  # (B, K, D)

        def chunk_stats(args):
            hc, tc = args  # (B, c, D), (B, c)
            logp = jax.nn.log_softmax(model.logits(hc), axis=-1)
            tgt = jnp.take_along_axis(logp, tc[..., None], axis=-1)[..., 0]
            return tgt, jnp.argmax(logp, axis=-1) == tc

        if k > LOGITS_CHUNK:
            c = LOGITS_CHUNK
            hs = h.reshape(h.shape[0], k // c, c, -1).transpose(1, 0, 2, 3)
            ts = targets.reshape(targets.shape[0], k // c, c).transpose(1, 0, 2)
            tgt, hit = jax.lax.map(chunk_stats, (hs, ts))
            tgt, hit = tgt.transpose(1, 0, 2).reshape(-1, k), hit.transpose(1, 0, 2).reshape(-1, k)
        else:
            tgt, hit = chunk_stats((h, targets))
        prefix = jnp.arange(k)[None, :] < (n_cont - 1)[:, None]
        prefix_sum = jnp.sum(jnp.where(prefix, tgt, 0.0), axis=1)
        prefix_greedy = jnp.all(hit | ~prefix, axis=1)
        last_h = jnp.take_along_axis(h, (n_cont - 1)[:, None, None], axis=1)[:, 0]
        last = jax.nn.log_softmax(model.logits(last_h), axis=-1)
        return prefix_sum, prefix_greedy, last

    return jax.jit(fn)


@dataclasses.dataclass
class _Row:
    inputs: list[int]  # (context + continuation)[:-1], left-truncated to max_length
    n_cont: int
    targets: list[int]  # the continuation without its last token (the same for the whole group)
    members: list[tuple[int, int]]  # (request index, last continuation token)


def score_requests(score_fn: Callable, params, pairs: Sequence[tuple[list[int], list[int]]], *,
                   batch_size: int, max_length: int, progress: Callable[[int], None] | None = None
                   ) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is_greedy) for each (context ids, continuation ids)."""
    rows: dict[tuple, _Row] = {}
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise ValueError(f"request {i}: empty continuation")
        whole = (list(ctx) + list(cont))[-(max_length + 1):]  # as lm-eval: truncate from the left
        n = min(len(cont), len(whole) - 1)
        inputs = whole[:-1]
        key = (tuple(inputs), n)
        row = rows.get(key)
        if row is None:
            row = rows[key] = _Row(inputs, n, list(cont[-n:-1]) if n > 1 else [], [])
        row.members.append((i, cont[-1]))

    ordered = sorted(rows.values(), key=lambda r: (-len(r.inputs), r.inputs))
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    for b in range(0, len(ordered), batch_size):
        batch = ordered[b:b + batch_size]
        t = _bucket(max(len(r.inputs) for r in batch), 16, max_length)
        k = _bucket(max(r.n_cont for r in batch), 1, t)
        if k > LOGITS_CHUNK:
            k = -(-k // LOGITS_CHUNK) * LOGITS_CHUNK
        tokens = np.zeros((batch_size, t), np.int32)
        starts = np.zeros((batch_size,), np.int32)
        n_cont = np.ones((batch_size,), np.int32)
        targets = np.zeros((batch_size, k), np.int32)
        for j, r in enumerate(batch):
            tokens[j, :len(r.inputs)] = r.inputs
            starts[j] = len(r.inputs) - r.n_cont
            n_cont[j] = r.n_cont
            targets[j, :len(r.targets)] = r.targets
        prefix_sum, prefix_greedy, last = jax.device_get(score_fn(params, tokens, starts, n_cont, targets))
        for j, r in enumerate(batch):
            top = int(np.argmax(last[j]))  # first maximum, as torch.argmax
            for i, tok in r.members:
                results[i] = (float(prefix_sum[j] + last[j, tok]), bool(prefix_greedy[j]) and top == tok)
        if progress is not None:
            progress(sum(len(r.members) for r in batch))
    return results  # type: ignore[return-value]
