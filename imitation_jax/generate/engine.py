"""Batched generation: left-padded prefill and decoding under `jax.jit`, driven from Python.

Shapes are bucketed so that new prompts rarely compile anything: the batch is padded to a power of
two rows (at most `max_batch`), the prompt to the next bucket length (powers of two by default),
and the decode state to a bucket that holds the prompt plus every step. One compiled prefill per
(rows, prompt bucket, state bucket) and one compiled decode per (rows, state bucket).

Decoding runs `steps_per_call` steps per jitted call (a `lax.scan`) and Python looks at the tokens
in between (stop ids, stop strings, streaming callbacks). The next call is dispatched before the
previous call's tokens are read, so that host work overlaps the device's.

Log-probabilities are computed only for batches where some request asks for them: a static flag of
the compiled prefill / decode (so at most two variants of each per bucket). Then every row gets the
log-softmax of the raw logits at its token and the top MAX_LOGPROBS alternatives (one `top_k` per
step), and each request keeps as many as it asked for.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from imitation_jax.generate import cache as decode_cache
from imitation_jax.generate.sampling import MAX_LOGPROBS, SamplingParams, row_arrays, sample, token_logprobs
from imitation_jax.generate.text import TextTracker


class PromptTooLong(ValueError):
    """A prompt leaves no room for even one new token within the context limit."""


@dataclasses.dataclass
class TokenLogprob:
    token: int
    logprob: float  # log-softmax of the model's raw logits (before temperature, top-k, top-p)
    top: list[tuple[int, float]]  # the most likely (id, logprob), descending, as many as asked


@dataclasses.dataclass
class Completion:
    tokens: list[int]  # generated ids: without the stop id that ended them; with a stop string, up to
    # and including the token that completed it
    text: str  # decoded tokens, cut before a stop string
    finish_reason: str  # 'stop' (stop id or stop string) | 'length' (max_new_tokens or context)
    prompt_tokens: int
    logprobs: Optional[list[TokenLogprob]] = None  # one per token of `tokens`, when asked
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None  # one per prompt token (the first: None)
    stop_id: Optional[int] = None  # the stop id that ended the completion, if one did


def default_buckets(max_len: int, smallest: int = 16) -> list[int]:
    """Powers of two from `smallest` up to the first one >= max_len."""
    out = [smallest]
    while out[-1] < max_len:
        out.append(out[-1] * 2)
    return out


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    # Past the largest bucket: round up to a multiple of it (decode state of long generations).
    return math.ceil(n / buckets[-1]) * buckets[-1]


class Generator:
    """Generates for any number of token prompts, `max_batch` at a time, with the model of `loaded`
    (an `imitation_jax.convert.loading.LoadedModel`)."""

    def __init__(self, loaded, *, max_batch: int = 8, max_len: Optional[int] = None, mesh=None,
                 buckets: Optional[Sequence[int]] = None, steps_per_call: int = 8):
        from imitation_jax.data.templates import stop_ids

        if max_batch < 1 or steps_per_call < 1:
            raise ValueError("max_batch and steps_per_call must be at least 1")
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.max_batch = max_batch
        self.max_len = int(max_len or loaded.config.max_position_embeddings)
        self.buckets = sorted(buckets) if buckets else default_buckets(self.max_len)
        self.steps_per_call = steps_per_call
        self.mesh = mesh if mesh is not None else _mesh_of(loaded.params)
        self.stop_ids = frozenset(stop_ids(self.tokenizer, loaded.template) + [self.tokenizer.eos_id])
        self.traces = {"prefill": 0, "decode": 0}  # incremented when JAX (re)traces: one per compile
        graphdef = _graph_for(loaded, self.mesh)

        top = min(MAX_LOGPROBS, loaded.config.vocab_size)

        def prefill(params, tokens, start, samp, length, logprobs, prompt_logprobs):
            self.traces["prefill"] += 1
            hidden, state = decode_cache.prefill_hidden(_merge(graphdef, params), tokens, start, length)
            logits = _merge(graphdef, params).logits(hidden[:, -1])
            token = sample(logits, jnp.uint32(0), **samp)
            lp = token_logprobs(logits, token, top) if logprobs else None
            plp = None
            if prompt_logprobs:
                # Slot j's logits score the token at slot j + 1; one row at a time, so only
                # (prompt bucket, vocab) fp32 logits exist at once.
                def row(args):
                    h, ids = args
                    return token_logprobs(_merge(graphdef, params).logits(h[:-1]), ids[1:], top)

                plp = jax.lax.map(row, (hidden, tokens))
            return token, state, lp, plp

        def decode(params, state, last, step0, samp, steps, logprobs):
            self.traces["decode"] += 1

            def one(carry, i):
                # NNX wants a module built at the trace level that uses it: merged inside the loop
                # body, from the closed-over parameters (in the carry, XLA copied them every step).
                state, last = carry
                logits, state = decode_cache.extend(_merge(graphdef, params), state, last)
                token = sample(logits, (step0 + i).astype(jnp.uint32), **samp)
                return (state, token), ((token, *token_logprobs(logits, token, top)) if logprobs else (token,))

            (state, last), out = jax.lax.scan(one, (state, last), jnp.arange(steps))
            return out, state, last

        self._prefill = jax.jit(prefill, static_argnums=(4, 5, 6))
        self._decode = jax.jit(decode, static_argnums=(5, 6), donate_argnums=(1,))

    # ------------------------------------------------------------------ public API

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 on_token: Optional[Callable[[int, int], None]] = None,
                 on_text: Optional[Callable[[int, str], None]] = None,
                 on_logprob: Optional[Callable[[int, TokenLogprob], None]] = None,
                 on_prompt_logprobs: Optional[Callable[[int, list], None]] = None) -> list[Completion]:
        """Completions of token `prompts` (any number; per-request params allowed).

        on_token(i, id) is called for each token of request i as it is produced; on_text(i, delta)
        with its new text, held back while it could be the start of a stop string (the deltas of
        a request add up to its final text); on_logprob(i, entry) with each token's log-probabilities,
        for requests that ask for them, right after on_token; on_prompt_logprobs(i, entries) with the
        prompt's (`Completion.prompt_logprobs`) as soon as the prefill has them."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) >= self.max_len and params[i].max_new_tokens > 0:
                raise PromptTooLong(f"prompt {i} has {len(p)} tokens; the context limit is {self.max_len}")
        # Similar lengths batched together waste less padding; results go back in request order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        results: list[Optional[Completion]] = [None] * len(prompts)
        for lo in range(0, len(order), self.max_batch):
            ids = order[lo:lo + self.max_batch]
            done = self._generate_batch([prompts[i] for i in ids], [params[i] for i in ids], ids,
                                        on_token, on_text, on_logprob, on_prompt_logprobs)
            for i, c in zip(ids, done):
                results[i] = c
        return results  # type: ignore[return-value]

    def chat(self, conversations: list[list[dict]], params: SamplingParams | list[SamplingParams],
             **callbacks) -> list[Completion]:
        """Replies to OpenAI-style message lists, rendered with the model's chat template."""
        return self.generate([self.encode_chat(c) for c in conversations], params, **callbacks)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        from imitation_jax.data.templates import encode_prompt

        return [int(t) for t in encode_prompt(self.tokenizer, _as_messages(messages), self.loaded.template)]

    # ------------------------------------------------------------------ one batch

    def _generate_batch(self, prompts, params, ids, on_token, on_text, on_logprob=None,
                        on_prompt_logprobs=None) -> list[Completion]:
        n = len(prompts)
        rows = min(1 << (n - 1).bit_length(), self.max_batch) if n > 1 else 1
        rows = max(rows, n)
        budgets = [max(0, min(p.max_new_tokens, self.max_len - len(t))) for p, t in zip(params, prompts)]
        trackers = [TextTracker(self.tokenizer, p.stop) for p in params]
        out = [Completion([], "", "length", len(t), [] if p.logprobs is not None else None)
               for p, t in zip(params, prompts)]
        running = [b > 0 for b in budgets]
        want_lp = any(p.logprobs is not None for p in params)
        want_prompt_lp = any(p.prompt_logprobs is not None for p in params)
        if not any(running) and not want_prompt_lp:
            return out
        width = _bucket(max(len(t) for t in prompts), self.buckets)
        steps = max(max(budgets) - 1, 0)  # the first token comes from the prefill
        calls = math.ceil(steps / self.steps_per_call)
        length = _bucket(width + calls * self.steps_per_call, self.buckets)

        tokens = np.full((rows, width), self.tokenizer.pad_id, np.int32)
        start = np.full((rows,), width - 1, np.int32)  # filler rows: a one-token prompt
        for r, t in enumerate(prompts):
            tokens[r, width - len(t):] = t
            start[r] = width - len(t)
        def take(chunk) -> None:  # (tokens (steps, rows)[, chosen, top ids, top logprobs]), in order
            chunk = [np.asarray(a) for a in chunk]
            for s, step_tokens in enumerate(chunk[0]):
                for r in range(n):
                    if running[r]:
                        entry = None
                        if params[r].logprobs is not None:
                            k = params[r].logprobs
                            entry = TokenLogprob(int(step_tokens[r]), float(chunk[1][s, r]),
                                                 list(zip(chunk[2][s, r, :k].tolist(), chunk[3][s, r, :k].tolist())))
                        running[r] = self._accept(r, int(step_tokens[r]), out[r], trackers[r], budgets[r],
                                                  ids[r], on_token, on_text, entry, on_logprob)

        with _mesh_context(self.mesh):  # the sampling arrays too: compiled once, whatever the caller's mesh
            samp = {k: jnp.asarray(v) for k, v in row_arrays(params, rows).items()}
            first, state, first_lp, prompt_lp = self._prefill(self.loaded.params, tokens, start, samp, length,
                                                              want_lp, want_prompt_lp)
            if want_prompt_lp:
                self._take_prompt_logprobs(prompts, params, start, prompt_lp, out)
                if on_prompt_logprobs is not None:
                    for r, c in enumerate(out):
                        if c.prompt_logprobs is not None:
                            on_prompt_logprobs(ids[r], c.prompt_logprobs)
            pending = (first[None],) + (tuple(a[None] for a in first_lp) if want_lp else ())
            last = first
            for c in range(calls):
                if not any(running):
                    break
                chunk, state, last = self._decode(self.loaded.params, state, last,
                                                  jnp.int32(1 + c * self.steps_per_call), samp, self.steps_per_call,
                                                  want_lp)
                take(pending)  # the device is already busy with `chunk`
                pending = chunk
            take(pending)
        for r, c in enumerate(out):
            if trackers[r].finish() and c.finish_reason == "length":
                c.finish_reason = "stop"  # the completed last character finished a stop string
            c.text = trackers[r].text
            if on_text is not None:
                delta = trackers[r].pop_delta(final=True)
                if delta:
                    on_text(ids[r], delta)
        return out

    @staticmethod
    def _take_prompt_logprobs(prompts, params, start, prompt_lp, out) -> None:
        """Prompt token i of row r sits at slot start[r] + i and is scored by slot start[r] + i - 1."""
        chosen, top_ids, top_lp = (np.asarray(a) for a in prompt_lp)
        for r, (prompt, p) in enumerate(zip(prompts, params)):
            if p.prompt_logprobs is None:
                continue
            k, s = p.prompt_logprobs, int(start[r])
            out[r].prompt_logprobs = [None] + [
                TokenLogprob(int(prompt[i]), float(chosen[r, s + i - 1]),
                             list(zip(top_ids[r, s + i - 1, :k].tolist(), top_lp[r, s + i - 1, :k].tolist())))
                for i in range(1, len(prompt))]

    def _accept(self, r, token, completion, tracker, budget, request, on_token, on_text,
                entry=None, on_logprob=None) -> bool:
        """Take one token for row r; False once the row is finished."""
        if token in self.stop_ids:
            completion.finish_reason, completion.stop_id = "stop", token
            return False
        completion.tokens.append(token)
        if on_token is not None:
            on_token(request, token)
        if entry is not None:
            completion.logprobs.append(entry)
            if on_logprob is not None:
                on_logprob(request, entry)
        if tracker.add(token):
            completion.finish_reason = "stop"
        elif len(completion.tokens) >= budget:
            completion.finish_reason = "length"
        if on_text is not None:
            delta = tracker.pop_delta()
            if delta:
                on_text(request, delta)
        return not tracker.stopped and len(completion.tokens) < budget


def _graph_for(loaded, mesh):
    """The loaded model's graph, traced for the platform of `mesh`'s devices (as `load_model` decides
    it); rebuilt when the loaded config's platform is another or undecided (a hand-built model)."""
    if mesh is None:
        return loaded.graphdef
    from imitation_jax.model.config import with_platform
    from imitation_jax.model.params import model_graph
    from imitation_jax.sharding import platform_of

    if loaded.config.platform == platform_of(mesh):
        return loaded.graphdef
    return model_graph(with_platform(dataclasses.replace(loaded.config, platform=None), mesh))[0]


def _merge(graphdef, params):
    from flax import nnx

    return nnx.merge(graphdef, params)


def _as_messages(messages: list[dict]):
    from imitation_jax.data.formats import Message

    return [m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in messages]


def _mesh_of(params: Any):
    for leaf in jax.tree.leaves(params):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return sharding.mesh
    return None


def _mesh_context(mesh):
    import contextlib

    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
