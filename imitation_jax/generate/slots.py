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
previous one are read (each call remembers which request owned each row). A row whose request
has all its max_tokens in dispatched calls is free for the next admission at once; one that stops
earlier (a stop id or string) decodes one call in vain, its output dropped. Admission does not
wait for the device either: prompts are prefilled and put into their rows, and their first
tokens are read while the next decode call runs.
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
    first: Any = None  # (prefill outputs, index) until its first token has been read
    start: int = 0  # first cache slot of the row (host copy)
    produced: int = 0  # tokens sampled so far, dispatched calls included: the next one's sampling step
    finished: bool = False


MAX_PREFILL_ROWS = 8  # prompts prefilled by one call (padded to 1, 2, 4 or 8 rows)


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _pow2_buckets(top: int) -> list[int]:
    out = [1]
    while out[-1] < top:
        out.append(min(out[-1] * 2, top))
    return out


class SlotEngine:
    """Continuous batching over up to `slots` concurrent requests with `generator`'s model."""

    def __init__(self, generator: Generator, *, slots: int = 16, steps_per_call: Optional[int] = None):
        if slots < 1 or (steps_per_call is not None and steps_per_call < 1):
            raise ValueError("slots and steps_per_call must be at least 1")
        self.gen = generator
        self.slots = slots
        self.n = steps_per_call or generator.steps_per_call  # decode steps per call (the generator's by default)
        self.row_buckets = _pow2_buckets(slots)
        # Slot buckets: the generator's length buckets and 1.5x each (decoding costs about in
        # proportion to the slots), up to the longest a cache can need (a row of max_len tokens,
        # one call dispatched past it, one call of headroom), rounded to 16.
        cap = -(-(generator.max_len + 3 * self.n) // 16) * 16
        finer = set(generator.buckets) | {b * 3 // 2 for b in generator.buckets if b >= 32}
        self.slot_buckets = sorted(b for b in finer if b < cap) + [cap]
        self.cache: Optional[KVCache] = None
        self.last = None  # (rows,) the token each row feeds to the next decode step
        self.rows: list[Optional[_Seq]] = []
        self.index = 0  # host copy of cache.index
        self.pending = None  # (chunk, owners, want_lp) of the dispatched call not yet read
        self._firsts: list[_Seq] = []  # prefilled, first token not read yet
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

        def insert(cache: KVCache, last, rows, k, v, lengths, first):
            # Prefilled prompts (k, v: (layers, P, W, kv_heads, head_dim), prompt i's lengths[i] tokens
            # at the end) become rows `rows` (P,), ending at the cache's index; the rest of each row is
            # zeroed. A row index past the cache (a filler prompt) is dropped.
            self.traces["insert"] += 1
            width, slots = k.shape[2], cache.k.shape[2]
            src = jnp.arange(slots) - cache.index + width
            valid = ((src[None, :] >= width - lengths[:, None]) & (src[None, :] < width))[None, :, :, None, None]
            src = jnp.clip(src, 0, width - 1)

            def put(big, small):
                new = jnp.where(valid, jnp.take(small, src, axis=2), 0).astype(big.dtype)
                return big.at[:, rows].set(new, mode="drop")

            return (cache._replace(k=put(cache.k, k), v=put(cache.v, v),
                                   start=cache.start.at[rows].set(cache.index - lengths, mode="drop")),
                    last.at[rows].set(first, mode="drop"))

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
        return self.active > 0 or self.pending is not None or bool(self._firsts)

    def _row_bucket(self, n: int) -> int:
        return next(b for b in self.row_buckets if b >= n)

    def _slot_bucket(self, n: int) -> int:
        return _bucket(min(n, self.slot_buckets[-1]), self.slot_buckets)

    # ------------------------------------------------------------------ admission

    def admit(self, requests: list[tuple[list[int], SamplingParams, Any]]) -> None:
        """Prefill each (prompt, params, sink) and give it a row; at most `free` of them. Nothing
        here waits for the device: prompts of one length bucket are prefilled together (up to
        MAX_PREFILL_ROWS a call) and put into their rows, and their first tokens are read at the
        next `step`, while the decode call it dispatches runs. Bad requests (empty prompt, no room
        in the context) get `sink.error`."""
        if len(requests) > self.free:
            raise ValueError(f"{len(requests)} requests for {self.free} free slots")
        gen = self.gen
        groups: dict[int, list[_Seq]] = {}
        for prompt, params, sink in requests:
            if not prompt:
                sink.error(ValueError("the prompt is empty"))
                continue
            if len(prompt) >= gen.max_len and params.max_new_tokens > 0:
                sink.error(PromptTooLong(f"the prompt has {len(prompt)} tokens; the context limit is {gen.max_len}"))
                continue
            budget = max(0, min(params.max_new_tokens, gen.max_len - len(prompt)))
            seq = _Seq(prompt, params, sink, Completion([], "", "length", len(prompt),
                                                         [] if params.logprobs is not None else None),
                       TextTracker(gen.tokenizer, params.stop), budget)
            if budget == 0 and params.prompt_logprobs is None:
                self._finish(seq)
                continue
            groups.setdefault(_bucket(len(prompt), gen.buckets), []).append(seq)
        with _mesh_context(gen.mesh):
            for width, seqs in sorted(groups.items()):
                for lo in range(0, len(seqs), MAX_PREFILL_ROWS):
                    try:
                        self._prefill(width, seqs[lo:lo + MAX_PREFILL_ROWS])
                    except Exception as exc:  # noqa: BLE001 - these requests must hear about it; others go on
                        log.exception("prefill failed")
                        for seq in seqs[lo:lo + MAX_PREFILL_ROWS]:
                            self._release(seq)
                            seq.sink.error(exc)

    def _prefill(self, width: int, seqs: list[_Seq]) -> None:
        """One prefill call for prompts of one bucket (as `Generator.generate` runs a batch), the
        rows of those that decode on filled in."""
        gen = self.gen
        rows = _pow2_at_least(len(seqs))
        tokens = np.full((rows, width), gen.tokenizer.pad_id, np.int32)
        start = np.full((rows,), width - 1, np.int32)  # filler rows: a one-token prompt
        for i, seq in enumerate(seqs):
            tokens[i, width - len(seq.prompt):] = seq.prompt
            start[i] = width - len(seq.prompt)
        params = [s.params for s in seqs]
        want_lp = any(p.logprobs is not None for p in params)
        want_plp = any(p.prompt_logprobs is not None for p in params)
        samp = {k: jnp.asarray(v) for k, v in row_arrays(params, rows).items()}
        first, state, first_lp, prompt_lp = gen._prefill(gen.loaded.params, tokens, start, samp, width,
                                                         want_lp, want_plp)
        self.stats["prefills"] += 1
        out = (first, first_lp, prompt_lp, start)
        decoding = [s for s in seqs if s.budget > 1]  # (one token: the prefill's, no row needed)
        for i, seq in enumerate(seqs):
            seq.first = (out, i)
            self._firsts.append(seq)
        if not decoding:
            return
        self._plan(len(decoding), max(len(s.prompt) for s in decoding))
        free_rows = iter(r for r, s in enumerate(self.rows) if s is None)
        target = np.full((rows,), len(self.rows), np.int32)  # past the cache: dropped
        lengths = np.ones((rows,), np.int32)
        for i, seq in enumerate(seqs):
            if seq.budget > 1:
                seq.row = next(free_rows)
                seq.start, seq.produced = self.index - len(seq.prompt), 1
                self.rows[seq.row] = seq
                target[i], lengths[i] = seq.row, len(seq.prompt)
        self.cache, self.last = self._insert(self.cache, self.last, jnp.asarray(target), state.k, state.v,
                                             jnp.asarray(lengths), first)

    def _take_first(self, seq: _Seq) -> None:
        """A prefilled request's prompt logprobs and first token, read from its prefill's output."""
        (first, first_lp, prompt_lp, start), i = seq.first
        seq.first = None
        if seq.finished:
            return
        p = seq.params
        if p.prompt_logprobs is not None:
            one = tuple(np.asarray(a)[i:i + 1] for a in prompt_lp)
            self.gen._take_prompt_logprobs([seq.prompt], [p], start[i:i + 1], one, [seq.completion])
            seq.sink.prompt_logprobs(seq.completion.prompt_logprobs)
        if seq.budget == 0:
            self._finish(seq)
            return
        token = int(np.asarray(first)[i])
        entry = None
        if p.logprobs is not None:
            chosen, ids, lps = (np.asarray(a) for a in first_lp)
            entry = TokenLogprob(token, float(chosen[i]), list(zip(ids[i, :p.logprobs].tolist(),
                                                                   lps[i, :p.logprobs].tolist())))
        if not self._accept(seq, token, entry):
            self._finish(seq)

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
                    if s.produced >= s.budget:
                        # Its last token is in this call: the row is free for the next admission
                        # (its tokens still come, through `owners`).
                        self.rows[s.row] = None
            self.stats["decode_calls"] += 1
            dispatched = (chunk, owners, want_lp)
        firsts, self._firsts = self._firsts, []
        for seq in firsts:  # the device is already busy with the call just dispatched
            self._take_first(seq)
        if self.pending is not None:
            self._take(*self.pending)
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

    def fail_all(self, exc: BaseException) -> None:
        """Every unfinished request gets `sink.error(exc)` and the engine starts afresh (after a
        failed device call, whose state cannot be trusted)."""
        seqs = [s for s in self.rows if s is not None] + list(self._firsts)
        if self.pending is not None:
            seqs += [s for s in self.pending[1] if s is not None]
        for seq in {id(s): s for s in seqs}.values():
            if not seq.finished:
                seq.finished = True
                seq.sink.error(exc)
        self.rows, self._firsts, self.pending, self.cache, self.last = [], [], None, None, None

    def _release(self, seq: _Seq) -> None:
        seq.finished = True
        if 0 <= seq.row < len(self.rows) and self.rows[seq.row] is seq:
            self.rows[seq.row] = None

    # ------------------------------------------------------------------ layout

    def _plan(self, joining: int, longest: int) -> None:
        """Relayout the cache if `joining` new rows (prompts up to `longest` tokens) or the next
        decode call do not fit, or if buckets a quarter the size (or less) now hold everything
        (packing running rows first; the quarter, so that a load going up and down across one
        bucket does not relayout every call). The shift puts the index at max(span of the
        running rows, longest)."""
        running = [s for s in self.rows if s is not None]
        if not running and not joining:
            return
        lo = min((s.start for s in running), default=self.index)
        target = max(self.index - lo, longest)
        need = len(running) + joining
        rows = self._row_bucket(need)
        slots = self._slot_bucket(target + 4 * self.n)  # room for 4 calls before the next relayout
        have = len(self.rows)
        if self.cache is not None and running:
            size = self.cache.k.shape[2]
            rows = have if have // 4 < need <= have else rows
            slots = size if size // 4 < slots <= size else slots
            fits = need <= have and self.index >= longest and self.index + self.n <= size
            if fits and rows == have and slots == size:
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
        """Compiles to run before serving, one callable each: the prefill of one prompt at every
        prompt bucket up to the context limit (no logprobs), then the decode (no logprobs) of one
        row at every slot bucket with the cache copies a lone request needs there ("basic"); or
        the prefill of 1, 2, 4, 8 prompts and the decode of every (rows, slots) bucket pair too
        ("full"). Shapes left out compile at their first use."""
        if scope not in self.WARMUP_SCOPES:
            raise ValueError(f"warm-up scope {scope!r} is not one of {', '.join(self.WARMUP_SCOPES)}")
        if scope == "none":
            return []
        gen = self.gen
        widths = sorted({b for b in gen.buckets if b < gen.max_len} | {_bucket(gen.max_len - 1, gen.buckets)})
        rows = self.row_buckets if scope == "full" else [1]
        pairs = [(r, s) for r in rows for s in self.slot_buckets if s > 4 * self.n]
        greedy = SamplingParams()

        def prefill(width, rows):
            samp = {k: jnp.asarray(v) for k, v in row_arrays([greedy], rows).items()}
            tokens = np.full((rows, width), gen.tokenizer.pad_id, np.int32)
            out = gen._prefill(gen.loaded.params, tokens, np.full((rows,), width - 1, np.int32), samp, width,
                               False, False)
            jax.block_until_ready(out[0])

        def decode(rows, slots):
            cache = self._create(jnp.zeros((rows,), jnp.int32), slots)
            samp = {k: jnp.asarray(v) for k, v in row_arrays([greedy] * rows, rows).items()}
            out = gen._decode(gen.loaded.params, cache, jnp.zeros((rows,), jnp.int32), jnp.zeros((rows,), jnp.int32),
                              samp, self.n, False)
            jax.block_until_ready(out[0])

        cfg = gen.loaded.config

        # (prompt bucket, slots) of a lone request's fresh cache, for each prompt length
        alone = {(_bucket(p, gen.buckets), self._slot_bucket(p + 4 * self.n)) for p in range(1, gen.max_len)}

        def one_row(slots):  # a fresh cache, the inserts and the relayouts a lone request meets
            cache = self._create(jnp.zeros((1,), jnp.int32), slots)
            last = jnp.zeros((1,), jnp.int32)
            for w in widths:
                if (w, slots) in alone:
                    k = jnp.zeros((cfg.num_layers, 1, w, cfg.kv_heads, cfg.dim_per_head), cfg.compute_dtype)
                    one = jnp.zeros((1,), jnp.int32)
                    cache, last = self._insert(cache, last, one, k, k, one + 1, one)
            for to in self.slot_buckets:
                if to >= slots and to > 4 * self.n:
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

        prefill_rows = [r for r in (1, 2, 4, 8) if r <= min(self.slots, MAX_PREFILL_ROWS)] if scope == "full" else [1]
        return ([in_mesh(prefill, w, r) for w in widths for r in prefill_rows]
                + [in_mesh(decode, r, s) for r, s in pairs]
                + [in_mesh(one_row, s) for s in self.slot_buckets if s > 4 * self.n])

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
