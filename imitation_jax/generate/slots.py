"""Continuous batching: requests join and leave a decoding batch between decode calls.

`SlotEngine` keeps one KV cache for every running request (a row each) and runs the `Generator`'s
own compiled prefill and decode on it: a new request is prefilled alone (its prompt bucket, as
`Generator.generate` would for it alone) and its keys and values are copied into a free row
between two decode calls; a request that finishes or is cancelled frees its row at once.

The cache (`model/kv_cache.py`) writes every row at one shared slot `index`, row r holding slots
[start[r], index). So a prompt of p tokens goes to [index - p, index) of its row (its positions
count from its own start, as in a prefill), and a relayout moves every row by one shift when the
index runs out of room or a prompt is longer than the index, dropping the slots before the oldest
running row. Rows and slots are bucketed (powers of two), so the decode compiles once per (rows,
slots) bucket pair; the relayout also packs running rows first and shrinks the buckets as the
load falls, so a lone request decodes one row, not `slots`.

Decoding is pipelined as in `Generator`: the next call is dispatched before the tokens of the
previous one are read; rows that finished meanwhile decode one call in vain (their output is
dropped: each call remembers which request owned each row).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from imitation_jax.generate.engine import Completion, Generator, PromptTooLong, TokenLogprob, _bucket, _mesh_context
from imitation_jax.generate.sampling import SamplingParams, row_arrays
from imitation_jax.generate.text import TextTracker
from imitation_jax.model.kv_cache import KVCache

log = logging.getLogger("imitation_jax.generate")


class Sink(Protocol):
    """Where a request's output goes (called on the engine's thread)."""

    cancelled: bool  # set by the owner (a client that went away): the row is freed at the next step

    def text(self, delta: str) -> None: ...  # new text, held back at possible stop strings

    def logprob(self, entry: TokenLogprob) -> None: ...  # each token's, before its text

    def prompt_logprobs(self, entries: list) -> None: ...

    def done(self, completion: Completion) -> None: ...

    def error(self, exc: BaseException) -> None: ...


@dataclasses.dataclass
class _Seq:
    prompt: list[int]
    params: SamplingParams
    sink: Any
    completion: Completion
    tracker: TextTracker
    budget: int
    row: int = -1
    start: int = 0  # first cache slot of the row (host copy)
    produced: int = 0  # tokens sampled so far, dispatched calls included: the next one's sampling step
    finished: bool = False


def _pow2_buckets(top: int) -> list[int]:
    out = [1]
    while out[-1] < top:
        out.append(min(out[-1] * 2, top))
    return out


class SlotEngine:
    """Continuous batching over up to `slots` concurrent requests with `generator`'s model."""

    def __init__(self, generator: Generator, *, slots: int = 16):
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.gen = generator
        self.slots = slots
        self.n = generator.steps_per_call
        self.row_buckets = _pow2_buckets(slots)
        # Slot buckets: the generator's length buckets up to the longest a cache can need (a row
        # of max_len tokens, one call dispatched past it, one call of headroom), rounded to 16.
        cap = -(-(generator.max_len + 3 * self.n) // 16) * 16
        self.slot_buckets = [b for b in generator.buckets if b < cap] + [cap]
        self.cache: Optional[KVCache] = None
        self.last = None  # (rows,) the token each row feeds to the next decode step
        self.rows: list[Optional[_Seq]] = []
        self.index = 0  # host copy of cache.index
        self.pending = None  # (chunk, owners, want_lp) of the dispatched call not yet read
        self.stats = {"decode_calls": 0, "relayouts": 0, "prefills": 0}
        self.traces = {"relayout": 0, "insert": 0}
        cfg = generator.loaded.config

        def create(start, slots):
            return KVCache.create(cfg, start, slots)

        def relayout(cache: KVCache, last, rowmap, shift, slots):
            # Row i of the new cache is old row rowmap[i]; slot s is old slot s - shift.
            self.traces["relayout"] += 1
            src = jnp.arange(slots) - shift
            valid = ((src >= 0) & (src < cache.k.shape[2]))[None, None, :, None, None]
            src = jnp.clip(src, 0, cache.k.shape[2] - 1)

            def move(a):
                return jnp.where(valid, jnp.take(jnp.take(a, rowmap, axis=1), src, axis=2), 0).astype(a.dtype)

            return (KVCache(move(cache.k), move(cache.v), cache.index + shift, cache.start[rowmap] + shift),
                    last[rowmap])

        def insert(cache: KVCache, last, row, k, v, length, first):
            # A prefilled prompt (k, v: (layers, 1, W, kv_heads, head_dim), its `length` tokens at the
            # end) becomes row `row`, ending at the cache's index; the rest of the row is zeroed.
            self.traces["insert"] += 1
            width, slots = k.shape[2], cache.k.shape[2]
            src = jnp.arange(slots) - cache.index + width
            valid = ((src >= width - length) & (src < width))[None, :, None, None]
            src = jnp.clip(src, 0, width - 1)

            def put(big, small):
                new = jnp.where(valid, jnp.take(small[:, 0], src, axis=1), 0).astype(big.dtype)
                return jax.lax.dynamic_update_slice(big, new[:, None], (0, row, 0, 0, 0))

            return (cache._replace(k=put(cache.k, k), v=put(cache.v, v),
                                   start=cache.start.at[row].set(cache.index - length)),
                    last.at[row].set(first))

        self._create = jax.jit(create, static_argnums=(1,))
        self._relayout = jax.jit(relayout, static_argnums=(4,))
        self._insert = jax.jit(insert, donate_argnums=(0,))

    # ------------------------------------------------------------------ state

    @property
    def active(self) -> int:
        return sum(1 for s in self.rows if s is not None)

    @property
    def free(self) -> int:
        return self.slots - self.active

    def busy(self) -> bool:
        return self.active > 0 or self.pending is not None

    def _row_bucket(self, n: int) -> int:
        return next(b for b in self.row_buckets if b >= n)

    def _slot_bucket(self, n: int) -> int:
        return _bucket(min(n, self.slot_buckets[-1]), self.slot_buckets)

    # ------------------------------------------------------------------ admission

    def admit(self, requests: list[tuple[list[int], SamplingParams, Any]]) -> None:
        """Prefill each (prompt, params, sink) and give it a row; at most `free` of them. Bad ones
        (empty prompt, no room in the context) get `sink.error`."""
        if len(requests) > self.free:
            raise ValueError(f"{len(requests)} requests for {self.free} free slots")
        joining: list[tuple[_Seq, Any, Any]] = []
        for prompt, params, sink in requests:
            try:
                seq = self._prefill(prompt, params, sink)
            except (ValueError, PromptTooLong) as exc:
                sink.error(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - the request must hear about it; others go on
                log.exception("prefill failed")
                sink.error(exc)
                continue
            if seq is not None:
                joining.append(seq)
        if not joining:
            return
        with _mesh_context(self.gen.mesh):
            self._plan(len(joining), max(len(s[0].prompt) for s in joining))
            free_rows = [r for r, s in enumerate(self.rows) if s is None]
            for (seq, state, first), row in zip(joining, free_rows):
                p = len(seq.prompt)
                self.cache, self.last = self._insert(self.cache, self.last, jnp.int32(row), state.k, state.v,
                                                     jnp.int32(p), first[0])
                seq.row, seq.start, seq.produced = row, self.index - p, 1
                self.rows[row] = seq

    def _prefill(self, prompt: list[int], params: SamplingParams, sink):
        """The prompt alone through the generator's prefill; its first token handed out. Returns
        (seq, its cache, first token) if it goes on decoding, else None (finished)."""
        gen = self.gen
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= gen.max_len and params.max_new_tokens > 0:
            raise PromptTooLong(f"the prompt has {len(prompt)} tokens; the context limit is {gen.max_len}")
        budget = max(0, min(params.max_new_tokens, gen.max_len - len(prompt)))
        seq = _Seq(prompt, params, sink, Completion([], "", "length", len(prompt),
                                                     [] if params.logprobs is not None else None),
                   TextTracker(gen.tokenizer, params.stop), budget)
        if budget == 0 and params.prompt_logprobs is None:
            self._finish(seq)
            return None
        width = _bucket(len(prompt), gen.buckets)
        tokens = np.full((1, width), gen.tokenizer.pad_id, np.int32)
        tokens[0, width - len(prompt):] = prompt
        start = np.asarray([width - len(prompt)], np.int32)
        want_lp, want_plp = params.logprobs is not None, params.prompt_logprobs is not None
        with _mesh_context(gen.mesh):
            samp = {k: jnp.asarray(v) for k, v in row_arrays([params], 1).items()}
            first, state, first_lp, prompt_lp = gen._prefill(gen.loaded.params, tokens, start, samp, width,
                                                             want_lp, want_plp)
        self.stats["prefills"] += 1
        if want_plp:
            gen._take_prompt_logprobs([prompt], [params], start, prompt_lp, [seq.completion])
            sink.prompt_logprobs(seq.completion.prompt_logprobs)
        if budget == 0:
            self._finish(seq)
            return None
        token = int(np.asarray(first)[0])
        entry = None
        if want_lp:
            chosen, ids, lps = (np.asarray(a) for a in first_lp)
            k = params.logprobs
            entry = TokenLogprob(token, float(chosen[0]), list(zip(ids[0, :k].tolist(), lps[0, :k].tolist())))
        if not self._accept(seq, token, entry):
            self._finish(seq)
            return None
        return seq, state, first

    # ------------------------------------------------------------------ decoding

    def step(self) -> bool:
        """Drop cancelled requests, dispatch one decode call for the running rows, then hand out
        the tokens of the previous call. False when nothing runs and nothing is left to read."""
        for seq in self.rows:
            if seq is not None and seq.sink.cancelled:
                self._release(seq)
        dispatched = None
        if self.active:
            with _mesh_context(self.gen.mesh):
                self._plan(0, 0)
                owners = list(self.rows)
                want_lp = any(s is not None and s.params.logprobs is not None for s in owners)
                step0 = np.asarray([s.produced if s is not None else 0 for s in owners], np.int32)
                params = [s.params if s is not None else SamplingParams() for s in owners]
                samp = {k: jnp.asarray(v) for k, v in row_arrays(params, len(owners)).items()}
                chunk, self.cache, self.last = self.gen._decode(self.gen.loaded.params, self.cache, self.last,
                                                                jnp.asarray(step0), samp, self.n, want_lp)
            self.index += self.n
            for s in owners:
                if s is not None:
                    s.produced += self.n
            self.stats["decode_calls"] += 1
            dispatched = (chunk, owners, want_lp)
        if self.pending is not None:
            self._take(*self.pending)  # the device is already busy with the call just dispatched
        self.pending = dispatched
        return self.busy()

    def _take(self, chunk, owners, want_lp) -> None:
        chunk = [np.asarray(a) for a in chunk]
        for r, seq in enumerate(owners):
            if seq is None or seq.finished or seq.sink.cancelled:
                continue
            for s in range(chunk[0].shape[0]):
                token, entry = int(chunk[0][s, r]), None
                if seq.params.logprobs is not None:
                    k = seq.params.logprobs
                    entry = TokenLogprob(token, float(chunk[1][s, r]),
                                         list(zip(chunk[2][s, r, :k].tolist(), chunk[3][s, r, :k].tolist())))
                if not self._accept(seq, token, entry):
                    self._finish(seq)
                    break

    def _accept(self, seq: _Seq, token: int, entry) -> bool:
        return self.gen._accept(seq.row, token, seq.completion, seq.tracker, seq.budget, seq, None,
                                lambda s, delta: s.sink.text(delta), entry,
                                lambda s, e: s.sink.logprob(e))

    def _finish(self, seq: _Seq) -> None:
        c = seq.completion
        if seq.tracker.finish() and c.finish_reason == "length":
            c.finish_reason = "stop"  # the completed last character finished a stop string
        c.text = seq.tracker.text
        delta = seq.tracker.pop_delta(final=True)
        if delta:
            seq.sink.text(delta)
        self._release(seq)
        seq.sink.done(c)

    def _release(self, seq: _Seq) -> None:
        seq.finished = True
        if 0 <= seq.row < len(self.rows) and self.rows[seq.row] is seq:
            self.rows[seq.row] = None

    # ------------------------------------------------------------------ layout

    def _plan(self, joining: int, longest: int) -> None:
        """Relayout the cache if `joining` new rows (prompts up to `longest` tokens) or the next
        decode call do not fit, or if smaller buckets now hold everything (packing running rows
        first). The shift puts the index at max(span of the running rows, longest)."""
        running = [s for s in self.rows if s is not None]
        if not running and not joining:
            return
        lo = min((s.start for s in running), default=self.index)
        target = max(self.index - lo, longest)
        rows = self._row_bucket(len(running) + joining)
        slots = self._slot_bucket(target + 2 * self.n)
        have = len(self.rows)
        if self.cache is not None and running:
            fits = (len(running) + joining <= have and self.index >= longest and self.index + self.n <= self.cache.k.shape[2])
            if fits and rows >= have and slots >= self.cache.k.shape[2]:
                return
        if self.cache is None or not running:
            # Nothing to keep: a fresh cache of the right size (so a lone request always decodes
            # in the same layout, whatever ran before it).
            self.cache = self._create(jnp.full((rows,), target, jnp.int32), slots)
            self.cache = self.cache._replace(index=jnp.int32(target))
            self.last = jnp.zeros((rows,), jnp.int32)
            self.rows, self.index = [None] * rows, target
            self.stats["relayouts"] += 1
            return
        order = sorted(running, key=lambda s: s.row)
        rowmap = [s.row for s in order] + [0] * (rows - len(order))
        shift = target - self.index
        t0 = time.perf_counter()
        self.cache, self.last = self._relayout(self.cache, self.last, jnp.asarray(rowmap, jnp.int32),
                                               jnp.int32(shift), slots)
        self.rows = [None] * rows
        for r, s in enumerate(order):
            s.row, s.start = r, s.start + shift
            self.rows[r] = s
        self.index = target
        self.stats["relayouts"] += 1
        log.debug("relayout to %d rows x %d slots (%.1f ms dispatch)", rows, slots, 1000 * (time.perf_counter() - t0))

    # ------------------------------------------------------------------ warm-up and offline use

    WARMUP_SCOPES = ("basic", "full", "none")

    def warm_up_tasks(self, scope: str = "basic") -> list:
        """Compiles to run before serving, one callable each: the prefill of every prompt bucket up
        to the context limit (no logprobs), then the decode (no logprobs) of one row at every slot
        bucket with the cache copies a lone request needs there ("basic"), or the decode of every
        (rows, slots) bucket pair too ("full"). Shapes left out compile at their first use."""
        if scope not in self.WARMUP_SCOPES:
            raise ValueError(f"warm-up scope {scope!r} is not one of {', '.join(self.WARMUP_SCOPES)}")
        if scope == "none":
            return []
        gen = self.gen
        widths = sorted({b for b in gen.buckets if b < gen.max_len} | {_bucket(gen.max_len - 1, gen.buckets)})
        rows = self.row_buckets if scope == "full" else [1]
        pairs = [(r, s) for r in rows for s in self.slot_buckets if s > 2 * self.n]
        greedy = SamplingParams()

        def prefill(width):
            samp = {k: jnp.asarray(v) for k, v in row_arrays([greedy], 1).items()}
            tokens = np.full((1, width), gen.tokenizer.pad_id, np.int32)
            out = gen._prefill(gen.loaded.params, tokens, np.asarray([width - 1], np.int32), samp, width, False, False)
            jax.block_until_ready(out[0])

        def decode(rows, slots):
            cache = self._create(jnp.zeros((rows,), jnp.int32), slots)
            samp = {k: jnp.asarray(v) for k, v in row_arrays([greedy] * rows, rows).items()}
            out = gen._decode(gen.loaded.params, cache, jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), jnp.int32),
                              samp, self.n, False)
            jax.block_until_ready(out[0])

        cfg = gen.loaded.config

        def one_row(slots):  # a fresh cache, the insert of each prompt bucket, the relayouts of one row
            cache = self._create(jnp.zeros((1,), jnp.int32), slots)
            last = jnp.zeros((1,), jnp.int32)
            for w in widths:
                if w <= slots:
                    k = jnp.zeros((cfg.num_layers, 1, w, cfg.kv_heads, cfg.dim_per_head), cfg.compute_dtype)
                    cache, last = self._insert(cache, last, jnp.int32(0), k, k, jnp.int32(1), jnp.int32(0))
            for to in self.slot_buckets:
                if to >= slots and to > 2 * self.n:
                    out = self._relayout(cache, last, jnp.zeros((1,), jnp.int32), jnp.int32(0), to)
                    jax.block_until_ready(out[1])
                    if to > slots:
                        break

        def in_mesh(fn, *args):
            def task():
                with _mesh_context(gen.mesh):
                    fn(*args)
            task.what = f"{fn.__name__}{args}"
            return task

        return ([in_mesh(prefill, w) for w in widths] + [in_mesh(decode, r, s) for r, s in pairs]
                + [in_mesh(one_row, s) for s in self.slot_buckets if s > 2 * self.n])

    def warm_up(self, scope: str = "basic") -> int:
        """Runs `warm_up_tasks(scope)`; returns how many shapes it compiled."""
        tasks = self.warm_up_tasks(scope)
        for task in tasks:
            task()
        return len(tasks)

    def run(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """All `prompts` through the slots (joining as rows free up), as `Generator.generate` returns
        them: for tests and offline use."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        results: list[Optional[Completion]] = [None] * len(prompts)
        errors: list[Optional[BaseException]] = [None] * len(prompts)
        sinks = [_Collect(i, results, errors) for i in range(len(prompts))]
        waiting = list(range(len(prompts)))
        while waiting or self.busy():
            take, waiting = waiting[:self.free], waiting[self.free:]
            if take:
                self.admit([(prompts[i], params[i], sinks[i]) for i in take])
            self.step()
        for e in errors:
            if e is not None:
                raise e
        return results  # type: ignore[return-value]


class _Collect:
    cancelled = False

    def __init__(self, i, results, errors):
        self.i, self.results, self.errors = i, results, errors

    def text(self, delta):
        pass

    def logprob(self, entry):
        pass

    def prompt_logprobs(self, entries):
        pass

    def done(self, completion):
        self.results[self.i] = completion

    def error(self, exc):
        self.errors[self.i] = exc
