"""Our model as an lm-eval model, registered as `imitation_jax`.

    lm_eval --model imitation_jax --model_args pretrained=RUN_DIR,batch_size=16 --tasks ...
    imitation-jax eval RUN_DIR --tasks ...      (the same, plus the shipped offline suite)

MODEL is anything `imitation_jax.convert.loading.load_model` reads: a run dir, an Orbax params
checkpoint or a Hugging Face LLaMA dir; in-process callers (eval during training) pass a loaded
model object (`model=`) instead. Tokenization follows lm-eval's HF backend on a LLaMA tokenizer:
every encoded string starts with BOS (when the tokenizer has one), an empty context is BOS, and
the continuation's ids are those of the whole text after the context's — so on an exported model
the two backends see identical ids and give the same log-likelihoods.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from imitation_jax.evaluation.scoring import make_score_fn, score_requests


def _as_int(value, default: int) -> int:
    if value is None or value == "auto" or (isinstance(value, str) and value.startswith("auto")):
        return default
    return int(value)


def _as_bool(value) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    return str(value).lower() in ("1", "true", "yes")


@register_model("imitation_jax")
class ImitationJaxLM(TemplateLM):
    def __init__(self, pretrained: str | None = None, model: Any = None, batch_size: int | str = 16,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 step: int | None = None, dtype: str | None = None, **_ignored):
        """`pretrained`: a path for `load_model`; or `model`: an object with config, graphdef,
        params, tokenizer (and template) — a `LoadedModel`. lm-eval's `device` and
        `max_batch_size` are accepted and ignored (JAX places the model)."""
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("imitation_jax: give pretrained=MODEL (a run dir, checkpoint or HF dir)")
            from imitation_jax.convert.loading import load_model

            model = load_model(pretrained, step=None if step is None else int(step), dtype=dtype)
        self.loaded = model
        self.tok = model.tokenizer
        self.name = str(getattr(model, "source", pretrained or "imitation_jax"))
        self.batch_size = _as_int(batch_size, 16)
        self._max_length = _as_int(max_length, model.config.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        add_bos = _as_bool(add_bos_token)
        self.add_bos = self.tok.bos_id is not None if add_bos is None else add_bos
        self._score_fn = make_score_fn(model.graphdef)
        self._generator = None

    def set_params(self, params) -> None:
        """Swap in new parameters of the same shapes (eval during training): compiled functions
        are kept, so only the first evaluation compiles."""
        self.loaded = dataclasses.replace(self.loaded, params=params)
        if self._generator is not None:
            self._generator.loaded = self.loaded

    # --- what TemplateLM needs -------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        ids = self.tok.encode(string)
        add = self.add_bos if add_special_tokens is None else add_special_tokens
        if add and self.tok.bos_id is not None:
            ids = [self.tok.bos_id] + ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids) -> str:
        return self.tok.decode(ids)

    # --- requests --------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood (imitation_jax)")
        try:
            results = score_requests(self._score_fn, self.loaded.params, [(c, t) for _, c, t in requests],
                                     batch_size=self.batch_size, max_length=self.max_length, progress=bar.update)
        finally:
            bar.close()
        for (request, _, _), answer in zip(requests, results):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document scored on its own, in disjoint windows of max_length tokens that each see
        as much preceding context as fits (lm-eval's windowing, all windows batched together).
        As lm-eval's HF backend on a LLaMA tokenizer, the document is encoded with its BOS and
        conditioned on the prefix token, so the numbers are comparable with that backend's."""
        windows, owner = [], []
        for i, req in enumerate(requests):
            (string,) = req.args
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task asks) continuations, cut at the first `until` string;
        requests with the same generation settings run as one batch through the KV-cache Generator."""
        from imitation_jax.generate import Generator, SamplingParams

        if self._generator is None:
            self._generator = Generator(self.loaded, max_batch=self.batch_size)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until (imitation_jax)")
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
            params = SamplingParams(max_new_tokens=max_new, temperature=temperature,
                                    top_k=int(kwargs.pop("top_k", 0) or 0), top_p=float(kwargs.pop("top_p", 1.0) or 1.0),
                                    stop=until, seed=int(kwargs.pop("seed", 0) or 0))
            budget = max(1, self.max_length - max_new)
            prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=budget) for i in indices]
            order = sorted(range(len(indices)), key=lambda j: -len(prompts[j]))
            completions = self._generator.generate([prompts[j] for j in order], params)
            for j, completion in zip(order, completions):
                text = completion.text
                for stop in until:  # the Generator stops at them; cut exactly at the first one
                    if stop and stop in text:
                        text = text[:text.index(stop)]
                i = indices[j]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(1)
        bar.close()
        return out  # type: ignore[return-value]
