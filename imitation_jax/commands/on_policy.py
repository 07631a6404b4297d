"""On-policy distillation (GKD, Agarwal et al. 2023) for `kd.source=teacher`: before each step a
share of the batch's rows is replaced by the student's own samples, which the in-mesh teacher then
scores in the ordinary kd step (its divergence on the sampled tokens is GKD's on-policy term; the
other rows stay the teacher's text, the off-policy term).

For `kd.on_policy.fraction` of each global batch's rows (round(fraction x rows), at least one;
which rows is drawn from the run seed and the step) the row's prompt is its FIRST example's tokens
up to its first trained target (the rest of a packed row is dropped). The student samples up to
`max_new_tokens` tokens after it with the KV-cache Generator on the live training parameters (on
the training mesh; compiled once per generator bucket, not per step), each row with a seed drawn
from (run seed, step, row), so a resumed run samples the same tokens. The new row is the single
example prompt + samples (+ the stop id when one was sampled), assembled as the data pipeline
assembles rows (data.packing.assemble), trained on the sampled tokens incl. the stop id. A row
whose first example has no trained target stays as it was.

Served teacher (kd.source=stored + kd.on_policy.teacher_url, `ServedTeacher`): the new rows are
scored by POST /v1/completions with the row's ids as the prompt, echo, max_tokens=0 and logprobs=K
(K = the prepared set's teacher_k, vLLM's prompt-scoring request); the echoed top_logprobs at the
sampled positions become the rows' teacher_ids / teacher_logprobs, so the ordinary stored-KD step
trains on them. Same tokenizer only. The request asks for vLLM's `return_tokens_as_token_ids`
(alternatives keyed "token_id:N": exact; vLLM and our serve); a server that ignores it keys them by text,
mapped back to ids through the tokenizer. A text several ids share (e.g. "A" and the byte-fallback
piece <0x41>) is one entry in that format (the higher-ranked id's logprob): it maps to the id the
tokenizer encodes the text as, and is counted (`on_policy_score_ambiguous`); an alternative that is
no student id is dropped (`on_policy_score_dropped`; its probability joins the sparse loss's tail
bucket). Metric `on_policy_score_s`: the scoring's wall time.

The batch goes through the host: every process gathers the global batch, all generate the same
samples (the computation is SPMD over the global parameters) and each rebuilds its shards. Tested
on one process (any mesh), not on several.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from typing import Optional

import jax
import numpy as np

from imitation_jax.errors import ConfigError

_ROWS, _SAMPLES = 0x6F6E70, 0x73616D  # salts: the row choice and the sampling seeds are separate streams


def on_policy_source(cfg):
    """The loop's `batch_transform` factory for kd.on_policy (None when it is off)."""
    op = cfg.kd.on_policy
    scorer = cfg.kd.source == "teacher" or (cfg.kd.source == "stored" and op.teacher_url)
    if not (cfg.train.objective == "kd" and scorer and op.fraction > 0):
        return None
    return lambda program, tokenizer: OnPolicyRollout(program, tokenizer)


def on_policy_rows(batch_size: int, fraction: float, seed: int, step: int) -> np.ndarray:
    """The global rows (sorted) that step `step` makes on-policy."""
    if fraction <= 0:
        return np.zeros((0,), np.int64)
    n = min(batch_size, max(1, math.floor(fraction * batch_size + 0.5)))
    rng = np.random.default_rng([seed, step, _ROWS])
    return np.sort(rng.choice(batch_size, n, replace=False))


def sampling_seed(seed: int, step: int, row: int) -> int:
    """The generator seed of global row `row` at step `step` (a uint32)."""
    return int(np.random.SeedSequence([seed, step, row, _SAMPLES]).generate_state(1)[0])


def first_prompt(inputs: np.ndarray, loss_mask: np.ndarray, segment_ids: np.ndarray) -> Optional[list[int]]:
    """One row's prompt: its first example's ids up to and including the input whose target is the
    example's first trained token (None if that example trains nothing)."""
    trained = np.flatnonzero((segment_ids == 1) & (loss_mask > 0))
    if not len(trained):
        return None
    return [int(t) for t in inputs[:trained[0] + 1]]


def on_policy_row(prompt: list[int], sampled: list[int], stop_id: Optional[int]):
    """The compact row (tokens, loss_mask, lengths) of one example: prompt, then the sampled tokens
    and the stop id that ended them, if any, trained."""
    tokens = np.asarray(prompt + sampled + ([] if stop_id is None else [stop_id]), np.int32)
    mask = np.zeros(len(tokens), np.bool_)
    mask[len(prompt):] = True
    return tokens, mask, np.asarray([len(tokens)], np.int32)


class OnPolicyRollout:
    """transform(step, params, batch) -> (batch with on-policy rows, metrics), for train()'s loop.

    Metrics: on_policy_rows, on_policy_tokens (sampled tokens incl. stop ids), on_policy_gen_s (the
    generation's wall time) and on_policy_train_s (from the end of the generation until the logger
    reads the step's metrics: the train step, measured where it is logged)."""

    def __init__(self, program, tokenizer):
        from imitation_jax.convert.loading import LoadedModel
        from imitation_jax.data.prepare import DEFAULT_TEMPLATE
        from imitation_jax.data.templates import get_template
        from imitation_jax.generate import Generator

        cfg = program.cfg
        self.op, self.seed, self.batch_size = cfg.kd.on_policy, cfg.train.seed, cfg.train.batch_size
        self.seq_len, self.pad_id = cfg.data.seq_len, tokenizer.pad_id
        template = get_template(cfg.data.template or DEFAULT_TEMPLATE, tokenizer, turn_tokens=cfg.data.turn_tokens)
        self.loaded = LoadedModel(program.model, program.graphdef, None, tokenizer, template, "live parameters")
        rows = len(on_policy_rows(self.batch_size, self.op.fraction, 0, 0))
        # prompt + samples fill at most seq_len + 1 ids (seq_len positions once shifted)
        self.generator = Generator(self.loaded, max_batch=1 << (rows - 1).bit_length(),
                                   max_len=self.seq_len + 1, mesh=program.mesh)
        self.teacher = ServedTeacher(self.op, tokenizer) if cfg.kd.source == "stored" else None

    def sample(self, params, step: int, rows: np.ndarray, prompts: list[list[int]]):
        """The student's completions of `prompts` (global rows `rows` of step `step`)."""
        from imitation_jax.generate import SamplingParams

        self.generator.loaded = dataclasses.replace(self.loaded, params=params)
        sampling = [SamplingParams(max_new_tokens=self.op.max_new_tokens, temperature=self.op.temperature,
                                   seed=sampling_seed(self.seed, step, int(r))) for r in rows]
        return self.generator.generate(prompts, sampling)

    def __call__(self, step: int, params, batch: dict) -> tuple[dict, dict]:
        from imitation_jax.data.packing import assemble

        host = {k: _gather(v) for k, v in batch.items()}
        shape = host["inputs"].shape  # (grad_accum, micro, T)
        flat = {k: v.reshape(-1, *v.shape[2:]) for k, v in host.items()}
        chosen = on_policy_rows(self.batch_size, self.op.fraction, self.seed, step)
        prompts = {int(r): first_prompt(flat["inputs"][r], flat["loss_mask"][r], flat["segment_ids"][r])
                   for r in chosen}
        rows = np.asarray([r for r, p in prompts.items() if p is not None], np.int64)
        start = time.perf_counter()
        done = self.sample(params, step, rows, [prompts[int(r)] for r in rows]) if len(rows) else []
        gen_s = time.perf_counter() - start
        sampled, scored = 0, {}
        teacher_k = 0
        if self.teacher is not None:
            if "teacher_ids" not in flat:
                raise ConfigError("config: kd.on_policy.teacher_url needs a prepared set with the teacher's top-K "
                                  "(collect --top-logprobs, then prepare)")
            teacher_k = flat["teacher_ids"].shape[-1]
        if len(rows):
            compact = [on_policy_row(prompts[int(r)], c.tokens, c.stop_id) for r, c in zip(rows, done)]
            new = assemble(compact, self.seq_len, self.pad_id, teacher_k=teacher_k)
            if self.teacher is not None:
                start = time.perf_counter()
                dropped, ambiguous = self.teacher.score([row[0] for row in compact], new, teacher_k)
                scored = {"on_policy_score_s": time.perf_counter() - start, "on_policy_score_dropped": float(dropped),
                          "on_policy_score_ambiguous": float(ambiguous)}
            for k, v in new.items():
                flat[k][rows] = v
            sampled = int(new["loss_mask"].sum())
        elif self.teacher is not None:
            scored = {"on_policy_score_s": 0.0, "on_policy_score_dropped": 0.0, "on_policy_score_ambiguous": 0.0}
        out = {k: _scatter(flat[k].reshape(shape[:2] + flat[k].shape[1:]), batch[k]) for k in batch}
        metrics = {"on_policy_rows": float(len(rows)), "on_policy_tokens": float(sampled),
                   "on_policy_gen_s": gen_s, **scored, "on_policy_train_s": _Since(time.perf_counter())}
        return out, metrics


class ServedTeacher:
    """Scores token sequences with a served same-tokenizer teacher's top-K (module docstring)."""

    def __init__(self, op, tokenizer):
        from imitation_jax.generate.text import TokenStrings

        self.url, self.model = op.teacher_url, op.teacher_model
        self.timeout, self.max_retries = op.teacher_timeout, op.teacher_max_retries
        self.tokenizer, strings = tokenizer, TokenStrings(tokenizer)
        sp = getattr(tokenizer, "_sp", None)
        # each id's text as the server writes it: mid-sequence, and as the first piece with bytes
        # (SentencePiece's dummy prefix dropped); a text several ids share maps to the first that is
        # no byte-fallback piece (what the tokenizer encodes it as), and is counted as ambiguous
        self.ids: tuple[dict, dict] = ({}, {})
        self.ambiguous: tuple[set, set] = (set(), set())
        order = sorted(range(tokenizer.vocab_size), key=lambda i: bool(sp is not None and sp.is_byte(i)))
        for i in order:
            text, raw = strings(i)
            first = text
            if raw is not None and tokenizer.first_token_bytes(i)[1]:
                first = tokenizer.first_token_bytes(i)[0].decode("utf-8", errors="backslashreplace")
            for table, ambiguous, key in zip(self.ids, self.ambiguous, (text, first)):
                if key in table:
                    ambiguous.add(key)
                else:
                    table[key] = i

    def lookup(self, key: str, at_start: bool) -> tuple[int, bool]:
        """(student id or -1, ambiguous) of one top_logprobs key."""
        if key.startswith("token_id:"):  # vLLM's return_tokens_as_token_ids: exact
            tid = int(key[len("token_id:"):])
            return (tid if 0 <= tid < self.tokenizer.vocab_size else -1), False
        table, ambiguous = self.ids[at_start], self.ambiguous[at_start]
        return table.get(key, -1), key in ambiguous

    def score(self, sequences: list, rows: dict, k: int) -> tuple[int, int]:
        """Fills rows' teacher_ids / teacher_logprobs (B, T, k) at their trained positions from the
        teacher's top-k of `sequences` (each row's compact ids); returns (alternatives that are no
        student id, alternatives whose text several ids share)."""
        tops = asyncio.run(self._request(sequences, k))
        dropped = ambiguous = 0
        for r, (ids, top) in enumerate(zip(sequences, tops)):
            at_start = True  # until a token with bytes: the server's first-piece form
            for i in range(1, len(ids)):
                at_start = at_start and self.tokenizer.token_bytes(int(ids[i - 1])) is None
                if not rows["loss_mask"][r, i - 1] or top[i] is None:
                    continue
                slot = 0
                for text, lp in top[i].items():
                    tid, shared = self.lookup(text, at_start)
                    ambiguous += shared
                    if tid < 0 or slot >= k:
                        dropped += 1
                        continue
                    rows["teacher_ids"][r, i - 1, slot], rows["teacher_logprobs"][r, i - 1, slot] = tid, lp
                    slot += 1
        return dropped, ambiguous

    async def _request(self, sequences: list, k: int) -> list:
        from imitation_jax.collect.client import bounded_map, describe_error, make_client

        client = make_client(self.url, timeout=self.timeout, max_retries=self.max_retries)

        async def one(index: int):
            response = await client.completions.create(model=self.model, prompt=[int(t) for t in sequences[index]],
                                                       echo=True, max_tokens=0, logprobs=k,
                                                       extra_body={"return_tokens_as_token_ids": True})
            top = response.choices[0].logprobs.top_logprobs if response.choices[0].logprobs else None
            if top is None or len(top) != len(sequences[index]):
                raise ValueError(f"the response scores {0 if top is None else len(top)} tokens, not the "
                                 f"{len(sequences[index])} sent")
            return top

        out: list = [None] * len(sequences)
        try:
            async for index, result in bounded_map(one, range(len(sequences)), len(sequences)):
                if isinstance(result, BaseException):
                    what = " ".join(describe_error(result).split())
                    raise ConfigError(f"kd.on_policy.teacher_url={self.url}: scoring the on-policy samples failed: "
                                      f"{what}")
                out[index] = result
        finally:
            await client.close()
        return out


class _Since:
    """Seconds from `start` until it is read as a float (the logger reads a step's metrics once the
    step has finished)."""

    def __init__(self, start: float):
        self.start = start

    def __float__(self) -> float:
        return time.perf_counter() - self.start


def _gather(array: jax.Array) -> np.ndarray:
    """The whole global array on this host."""
    if array.is_fully_addressable:
        return np.array(array)
    from jax.experimental import multihost_utils

    return np.array(multihost_utils.process_allgather(array, tiled=True))


def _scatter(full: np.ndarray, like: jax.Array) -> jax.Array:
    """`full` as a global array sharded like `like` (each process places its own shards)."""
    return jax.make_array_from_callback(full.shape, like.sharding, lambda index: full[index])
