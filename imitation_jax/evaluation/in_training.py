"""lm-eval tasks during training (`eval.tasks` in the train config), on the live parameters.

A training-loop hook (imitation_jax.train.hooks), added by the `train` command: it runs every
`eval.tasks_every_steps` steps and at the end; the flat scores ({"mini_mmlu/acc": ...}) go to metrics.jsonl and TensorBoard with the prefix
`task/`. One backend object lives for the whole run and only its parameters are swapped, so the
scoring and generation functions compile once. Every process runs the same requests (the
computation is SPMD over the global parameters) and only process 0 writes the metrics; the tests
cover one process (with any mesh), not several.
"""

from __future__ import annotations

from typing import Any


class TaskEval:
    pauses_clock = True  # its time is kept out of tokens/s

    def __init__(self, cfg, graphdef, tokenizer):
        """cfg: the run's resolved Config (eval.*, model, data.template/turn_tokens, run_dir)."""
        from imitation_jax.data.templates import get_template
        from imitation_jax.data.prepare import DEFAULT_TEMPLATE
        from imitation_jax.evaluation import runner

        eval_cfg = cfg.eval
        self.cfg = eval_cfg
        self.tasks = list(eval_cfg.tasks)
        self.include_paths = list(eval_cfg.tasks_include_path)
        runner.offline()
        runner.check_tasks(runner.task_manager(self.include_paths), self.tasks)  # fail before training starts
        template = get_template(cfg.data.template or DEFAULT_TEMPLATE, tokenizer, turn_tokens=cfg.data.turn_tokens)
        self._spec = (cfg.model, graphdef, tokenizer, template, cfg.run_dir)
        self._lm = None

    def due(self, done: int, total: int, start: int = 0) -> bool:
        every = self.cfg.tasks_every_steps
        return done == total or bool(every and done % every == 0)

    def run(self, info) -> None:
        """The hook: score the live parameters, log them as task/<task>/<metric>."""
        info.log(self.scores(info.state["params"]), prefix="task/")

    def scores(self, params: Any) -> dict[str, float]:
        from imitation_jax.evaluation import runner
        from imitation_jax.evaluation.lm_backend import ImitationJaxLM
        from imitation_jax.convert.loading import LoadedModel

        if self._lm is None:
            model_cfg, graphdef, tokenizer, template, source = self._spec
            self._lm = ImitationJaxLM(model=LoadedModel(model_cfg, graphdef, params, tokenizer, template, source),
                                      batch_size=self.cfg.tasks_batch_size)
        else:
            self._lm.set_params(params)
        limit = self.cfg.tasks_limit
        if limit is not None and limit >= 1:
            limit = int(limit)
        results = runner.run_eval(self._lm, self.tasks, include_paths=self.include_paths, limit=limit,
                                  num_fewshot=self.cfg.tasks_num_fewshot, verbosity="ERROR")
        return runner.scores(results)
