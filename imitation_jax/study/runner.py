"""`run_study`: the imitation experiment as a list of resumable stages, each driving one of our
pipeline commands in a subprocess (train, export-hf, serve, collect, prepare, eval, generate, judge),
with a one-line progress display per stage. The teacher is reached only through its OpenAI API.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Iterator

from imitation_jax.data.storage import FORMAT_VERSION, STATS
from imitation_jax.study import corpora, report
from imitation_jax.study.config import StudyConfig, TrainSpec
from imitation_jax.study.stages import (Stage, StageState, StudyError, cli_command, free_port, run_cli, service,
                                        settings_key)
from imitation_jax.study.world import build_world


class Study:
    def __init__(self, cfg: StudyConfig, log=print):
        self.cfg = cfg
        self.work = os.path.abspath(cfg.work_dir)
        self.log = log
        self.state = StageState(self.p("state"))
        self.world = build_world(cfg.world)
        self.stages: list[Stage] = []
        self.urls: dict[str, str] = {}
        self.models: dict[str, dict] = {}  # name -> {path, train_stage, kind, base, set, budget}

    def p(self, *parts: str) -> str:
        return os.path.join(self.work, *parts)

    # ------------------------------------------------------------------ helpers

    @property
    def tokenizer(self) -> str:
        return self.cfg.tokenizer or self.p("world", "tokenizer.model")

    @property
    def tasks_dir(self) -> str:
        return self.cfg.eval.include_path or self.p("world", "tasks")

    def world_file(self, key: str) -> str:
        return self.p("world", f"{key}.jsonl")

    def _train_yaml(self, name: str, run_dir: str, model, spec: TrainSpec, data: dict, init: dict) -> str:
        from omegaconf import OmegaConf

        budget = {"steps": spec.steps} if spec.steps is not None else {"epochs": spec.epochs}
        cfg = {"run_dir": run_dir,
               "model": self._model_fields(model),
               "data": {**data, "cache_dir": self.p("cache")},
               "train": {**budget, "batch_size": spec.batch_size, "log_every": 10},
               "optim": {"lr": spec.lr, "warmup_steps": spec.warmup_steps},
               "eval": {"every_steps": 0},
               "init": init,
               "checkpoint": {"every_steps": 0, "keep": 1, "async_save": False},
               "logging": {"tensorboard": False, "progress": False}}
        path = self.p("configs", f"{name}.yaml")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(OmegaConf.to_yaml(OmegaConf.create(cfg)))
        return path

    @staticmethod
    def _model_fields(model) -> dict:
        fields = {k: v for k, v in vars(model).items() if v is not None}
        if model.num_heads is not None and model.num_kv_heads is None:
            fields["num_kv_heads"] = model.num_heads  # multi-head, whatever the preset's grouping
        return fields

    def _train(self, name: str, yaml_path: str, overrides: list[str]) -> None:
        run_cli(["train", yaml_path, *self.cfg.train_overrides, *overrides], self.p("logs", f"{name}.log"), name)

    def add(self, stage: Stage) -> None:
        self.stages.append(stage)

    # ------------------------------------------------------------------ the plan

    def plan(self) -> list[Stage]:
        cfg = self.cfg
        k = settings_key
        self.add(Stage("world", self._world, [self.p("world", "done.json")],
                       key=k(cfg.world, cfg.corpus, cfg.tokenizer, cfg.vocab_size, cfg.imitation.per_request)))
        # Teacher: trained here, or a real API named in the config.
        teacher_dep: list[str] = []
        if cfg.teacher.base_url is None:
            run = self.p("runs", "teacher")
            spec = cfg.teacher.train
            # The corpus repeats each conversation on purpose (memorising facts takes many passes):
            # no exact-duplicate removal.
            data = {"train_files": [self.world_file("teacher_text") + ":format=text", self.world_file("teacher_chat")],
                    "tokenizer": self.tokenizer, "template": cfg.template, "seq_len": spec.seq_len,
                    "cleaning": {"dedup": False}}
            self.add(Stage("train/teacher", lambda run=run, spec=spec, data=data: self._train(
                "train-teacher", self._train_yaml("teacher", run, cfg.teacher.model, spec, data, {}), spec.overrides),
                [self.p("runs", "teacher", "checkpoints")], ["world"],
                key=k(cfg.teacher.model, spec, cfg.template, cfg.train_overrides, data["cleaning"])))
            served = run
            if cfg.teacher.export:
                served = self.p("teacher_hf")
                self.add(Stage("export/teacher", lambda run=run, served=served: run_cli(
                    ["export-hf", run, "--out", served, "--dtype", "float32"], self.p("logs", "export-teacher.log"),
                    "export/teacher"), [os.path.join(served, "config.json")], ["train/teacher"], key=k(served)))
                teacher_dep = ["export/teacher"]
            else:
                teacher_dep = ["train/teacher"]
            self.teacher_model = served
            self.models["teacher"] = {"path": run, "stage": "train/teacher", "kind": "teacher"}
        # Bases.
        for b, spec in cfg.bases.items():
            if spec.init_hf is not None:
                self.models[f"base-{b}"] = {"path": spec.init_hf, "stage": "world", "kind": "base", "base": b}
                continue
            run = self.p("runs", f"base-{b}")
            data = {"train_files": [self.world_file(f"base_{spec.knows}") + ":format=text"],
                    "tokenizer": self.tokenizer, "template": cfg.template, "seq_len": spec.train.seq_len}
            self.add(Stage(f"train/base-{b}", lambda b=b, spec=spec, run=run, data=data: self._train(
                f"train-base-{b}", self._train_yaml(f"base-{b}", run, spec.model, spec.train, data, {}),
                spec.train.overrides), [os.path.join(run, "checkpoints")], ["world"],
                key=k(spec, cfg.template, cfg.train_overrides)))
            self.models[f"base-{b}"] = {"path": run, "stage": f"train/base-{b}", "kind": "base", "base": b}
        # Imitation data, through the teacher's API.
        for s in cfg.imitation.sets:
            self.add(Stage(f"collect/{s}", lambda s=s: self._collect(s), [self.p("imitation", f"{s}.clean.jsonl")],
                           ["world", *teacher_dep], needs=("teacher",), key=k(self._collect_settings(), s)))
            # A set prepared by an older on-disk format cannot be read by train: the version is part of the key.
            self.add(Stage(f"prepare/{s}", lambda s=s: self._prepare(s),
                           [self.p("imitation", "prepared", s, STATS)], [f"collect/{s}"],
                           key=k(cfg.template, cfg.imitation.train.seq_len, self.tokenizer, FORMAT_VERSION)))
        self.add(Stage("collect/reference", self._collect_reference, [self.p("answers", "teacher.jsonl")],
                       ["world", *teacher_dep], needs=("teacher",),
                       key=k(cfg.judge.prompts, cfg.judge.max_new_tokens, cfg.teacher.model_name, cfg.teacher.base_url)))
        # Students: every base x set x budget with the first arm and seed; the compared cells with
        # every arm and seed.
        for b, spec in cfg.bases.items():
            for s in cfg.imitation.sets:
                for budget in cfg.imitation.budgets:
                    for arm, seed in self._arms_and_seeds(b, s, budget):
                        self._student_stage(b, spec, s, budget, arm, seed)
        # Evaluations and the preference judgement of every model.
        for name, m in self.models.items():
            self.add(Stage(f"eval/{name}", lambda name=name: self._eval(name), [self.p("eval", f"{name}.json")],
                           [m["stage"]], key=k(cfg.eval.tasks, cfg.eval.limit, cfg.eval.num_fewshot, self.tasks_dir)))
            if m["kind"] != "teacher":
                self.add(Stage(f"answers/{name}", lambda name=name: self._answers(name),
                               [self.p("answers", f"{name}.jsonl")], [m["stage"]],
                               key=k(cfg.judge.prompts, cfg.judge.max_new_tokens)))
            deps = ["collect/reference"] + ([f"answers/{name}"] if m["kind"] != "teacher" else [])
            self.add(Stage(f"style/{name}", lambda name=name: self._style(name), [self.p("style", f"{name}.json")],
                           deps, needs=("judge",), key=k(cfg.judge.model, cfg.judge.base_url)))
        if cfg.teacher.base_url is not None:  # a real teacher's row: only its style (lm-eval needs weights)
            self.add(Stage("style/teacher", lambda: self._style("teacher"), [self.p("style", "teacher.json")],
                           ["collect/reference"], needs=("judge",)))
        evals = [s.name for s in self.stages if s.name.startswith(("eval/", "style/"))]
        self.add(Stage("report", self._report, [self.p("results", "results.json"), self.p("results", "results.md")],
                       evals, key=k(cfg.eval.tasks, report.VERSION)))
        return self.stages

    def _arms_and_seeds(self, b: str, s: str, budget: int) -> list[tuple[str, int]]:
        im = self.cfg.imitation
        c = im.compare
        compared = all(pick is None or v in pick for v, pick in ((b, c.bases), (s, c.sets), (budget, c.budgets)))
        if not compared:
            return [(next(iter(im.arms)), im.seeds[0])]
        return [(arm, seed) for arm in im.arms for seed in im.seeds]

    def student_name(self, b: str, s: str, budget: int, arm: str, seed: int) -> str:
        """The first arm at the first seed keeps the single-arm study's name (its runs stay valid)."""
        im = self.cfg.imitation
        name = f"student-{b}-{s}-{budget}"
        return name if (arm, seed) == (next(iter(im.arms)), im.seeds[0]) else f"{name}-{arm}-s{seed}"

    def _student_stage(self, b: str, spec, s: str, budget: int, arm: str, seed: int) -> None:
        cfg = self.cfg
        name = self.student_name(b, s, budget, arm, seed)
        run = self.p("runs", name)
        base = self.models[f"base-{b}"]
        init = {"hf": spec.init_hf} if spec.init_hf else {"checkpoint": base["path"]}
        data = {"path": self.p("imitation", "prepared", s), "max_train_tokens": budget}
        t = cfg.imitation.train
        first = name == f"student-{b}-{s}-{budget}"
        extra = [] if first and cfg.imitation.arms[arm].objective == "sft" else self._arm_overrides(arm, seed)
        spec_obj = cfg.imitation.arms[arm]
        self.add(Stage(f"train/{name}", lambda name=name, run=run, spec=spec, t=t, data=data, init=init, arm=arm: self._train(
            f"train-{name}", self._train_yaml(name, run, spec.model, t, data, init),
            [*t.overrides, *extra, *self._arm_runtime(arm)]),
            [os.path.join(run, "checkpoints")], [f"prepare/{s}", base["stage"]],
            needs=("teacher",) if spec_obj.objective == "on_policy" else (),
            key=settings_key(t, budget, init, cfg.train_overrides, *([extra] if extra else []))))
        self.models[name] = {"path": run, "stage": f"train/{name}", "kind": "student", "base": b, "set": s,
                             "budget": budget, "arm": arm, "seed": seed}

    def _arm_overrides(self, arm: str, seed: int) -> list[str]:
        """The `train` overrides of an arm at a seed (what the stage's key records)."""
        im = self.cfg.imitation
        spec = im.arms[arm]
        out = [f"train.seed={seed}", f"data.seed={seed}"]
        if spec.objective in ("kd", "on_policy"):
            out += ["train.objective=kd", "kd.source=stored"]
        if spec.objective == "on_policy":
            out += [f"kd.on_policy.fraction={im.on_policy_fraction}", f"kd.on_policy.max_new_tokens={im.max_tokens}",
                    f"kd.on_policy.temperature={im.on_policy_temperature}",
                    f"kd.on_policy.teacher_model={self.cfg.teacher.model_name}",
                    "train.log_every=1"]  # every step's on-policy counts reach metrics.jsonl (the cost columns)
        return out + list(spec.overrides)

    def _arm_runtime(self, arm: str) -> list[str]:
        """Overrides known only when the stage runs (the served teacher's URL: not part of the key)."""
        if self.cfg.imitation.arms[arm].objective != "on_policy":
            return []
        return [f"kd.on_policy.teacher_url={self.urls['teacher']}"]

    # ------------------------------------------------------------------ stage bodies

    def _world(self) -> None:
        from imitation_jax.collect.bootstrap import generation_messages

        per = self.cfg.imitation.per_request

        def request(seeds: list[dict]) -> str:  # the exact request `collect --bootstrap` sends
            pairs = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in seeds]
            return generation_messages(pairs, per)[0]["content"]

        out = self.p("world")
        paths = corpora.write_study_files(self.world, self.cfg.corpus, out, request, per)
        if self.cfg.tokenizer is None:
            from imitation_jax.data.tokenizer import train_sentencepiece

            texts = []
            for key in ("teacher_text", "teacher_chat"):
                for r in corpora.read_jsonl(paths[key]):
                    texts.append(r["text"] if "text" in r else "\n".join(m["content"] for m in r["messages"]))
            texts += ["BEGINNING OF CONVERSATION: USER: GPT:"] * 20
            train_sentencepiece(texts, os.path.join(out, "tokenizer"), vocab_size=self.cfg.vocab_size)
        with open(os.path.join(out, "done.json"), "w") as f:
            json.dump({"entities": len(self.world.entities), "facts": len(self.world.facts),
                       "splits": {s: len(self.world.split(s)) for s in ("heldout", "common", "large", "imitation")}}, f)

    def _collect_settings(self) -> dict:
        im = self.cfg.imitation
        return {k: getattr(im, k) for k in ("broad_prompts", "local_seeds", "local_num", "per_request",
                                             "dedup_threshold", "max_tokens", "bootstrap_max_tokens", "temperature")} | {
            "teacher": [self.cfg.teacher.model_name, self.cfg.teacher.base_url]} | (
            {"top_logprobs": im.top_logprobs} if im.distils else {})

    def _collect(self, s: str) -> None:
        from imitation_jax.collect.bootstrap import read_seeds

        cfg, im = self.cfg, self.cfg.imitation
        out = self.p("imitation", f"{s}.jsonl")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        common = ["--base-url", self.urls["teacher"], "--model", cfg.teacher.model_name, "--out", out,
                  "--concurrency", im.concurrency, "--max-tokens", im.max_tokens, "--temperature", im.temperature,
                  "--quiet"] + (["--top-logprobs", im.top_logprobs] if im.distils else [])
        if s == "local":
            seeds = im.local_seeds or self.world_file("local_seeds")
            args = ["collect", "--bootstrap", seeds, "--num", im.local_num, "--per-request", im.per_request,
                    "--dedup-threshold", im.dedup_threshold, "--bootstrap-max-tokens", im.bootstrap_max_tokens,
                    "--seed", 0, *common]
        else:
            args = ["collect", "--prompts", im.broad_prompts or self.world_file("broad_prompts"), *common]
        log = self.p("logs", f"collect-{s}.log")
        self._drop_other_kind(out, im.top_logprobs if im.distils else 0)
        runs = [args]
        if s == "local":  # the seed questions belong to the local set too (answered by the teacher)
            seed_prompts = self.p("imitation", "local.seed-prompts.jsonl")
            corpora.write_jsonl(seed_prompts, [{"id": f"seed-{i}", "prompt": q} for i, (q, _) in
                                               enumerate(read_seeds(im.local_seeds or self.world_file("local_seeds")))])
            runs.append(["collect", "--prompts", seed_prompts, *common])
        for a in runs:
            try:
                run_cli(a, log, f"collect/{s}")
            except StudyError:  # some requests failed: collect resumes, asking only for what is missing
                run_cli(a, log, f"collect/{s}")
        # The world's held-out people must never reach a student: drop any answer naming one.
        rows = corpora.read_jsonl(out)
        kept = [r for r in rows if not self.world.mentions_heldout(json.dumps(r["messages"]))]
        corpora.write_jsonl(self.p("imitation", f"{s}.clean.jsonl"), kept)
        with open(self.p("imitation", f"{s}.scrub.json"), "w") as f:
            json.dump({"collected": len(rows), "kept": len(kept), "dropped_heldout": len(rows) - len(kept)}, f)

    def _drop_other_kind(self, out: str, k: int) -> None:
        """Answers collected with another --top-logprobs (arms added or removed) are collected again;
        an interrupted collection of the same kind resumes."""
        from imitation_jax.collect.collect import answered_ids
        from imitation_jax.errors import DataError

        try:
            answered_ids(out, top_logprobs=k)
        except DataError as exc:
            if exc.kind != "mixed_logprobs":
                raise
            self.log(f"         {out}: collected with other log-probabilities; collecting again")
            os.remove(out)

    def _prepare(self, s: str) -> None:
        out = self.p("imitation", "prepared", s)
        run_cli(["prepare", self.p("imitation", f"{s}.clean.jsonl"), "--tokenizer", self.tokenizer,
                 "--template", self.cfg.template, "--seq-len", self.cfg.imitation.train.seq_len, "--out", out,
                 "--quiet", "--workers", 1], self.p("logs", f"prepare-{s}.log"), f"prepare/{s}")

    def _collect_reference(self) -> None:
        out = self.p("answers", "teacher.jsonl")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        args = ["collect", "--prompts", self.cfg.judge.prompts or self.world_file("chat_prompts"),
                "--base-url", self.urls["teacher"], "--model", self.cfg.teacher.model_name, "--out", out + ".part",
                "--max-tokens", self.cfg.judge.max_new_tokens, "--temperature", 0.0, "--quiet"]
        run_cli(args, self.p("logs", "collect-reference.log"), "collect/reference")
        os.replace(out + ".part", out)

    def _eval(self, name: str) -> None:
        e = self.cfg.eval
        out = self.p("eval", f"{name}.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        if e.in_process:  # what `imitation-jax eval` runs, without paying its start-up once per model
            from imitation_jax.evaluation import runner as ev

            with open(self.p("logs", f"eval-{name}.log"), "a") as log, \
                    contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                lm = ev.make_lm(self.models[name]["path"], batch_size=e.batch_size)
                results = ev.run_eval(lm, list(e.tasks.values()), include_paths=[self.tasks_dir], limit=e.limit,
                                      num_fewshot=e.num_fewshot, confirm_run_unsafe_code=e.confirm_run_unsafe_code)
                print(ev.results_table(results))
            ev.write_results(results, out)
            return
        args = ["eval", self.models[name]["path"], "--tasks", ",".join(e.tasks.values()), "--out", out + ".part",
                "--include-path", self.tasks_dir, "--batch-size", e.batch_size]
        if e.limit:
            args += ["--limit", e.limit]
        if e.num_fewshot is not None:
            args += ["--num-fewshot", e.num_fewshot]
        if e.confirm_run_unsafe_code:
            args += ["--confirm-run-unsafe-code"]
        run_cli(args, self.p("logs", f"eval-{name}.log"), f"eval/{name}")
        os.replace(out + ".part", out)

    def _answers(self, name: str) -> None:
        out = self.p("answers", f"{name}.jsonl")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        run_cli(["generate", self.models[name]["path"], "--prompts", self.cfg.judge.prompts or
                 self.world_file("chat_prompts"), "--chat", "--max-new-tokens", self.cfg.judge.max_new_tokens,
                 "--temperature", 0.0, "--out", out + ".part"], self.p("logs", f"answers-{name}.log"),
                f"answers/{name}")
        os.replace(out + ".part", out)

    def _style(self, name: str) -> None:
        mine = self.p("answers", f"{name}.jsonl")
        out = self.p("style", f"{name}.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        run_cli(["judge", "--a", mine, "--b", self.p("answers", "teacher.jsonl"), "--base-url", self.urls["judge"],
                 "--model", self.cfg.judge.model, "--out", out + ".part", "--concurrency", self.cfg.judge.concurrency,
                 "--quiet"], self.p("logs", f"style-{name}.log"), f"style/{name}")
        os.replace(out + ".part", out)

    def _report(self) -> None:
        report.write_report(self, self.p("results"))

    # ------------------------------------------------------------------ services

    @contextlib.contextmanager
    def _service(self, need: str) -> Iterator[None]:
        """The teacher's API (served from its run or export) or the judge's, for the stages needing it."""
        given = {"teacher": self.cfg.teacher.base_url, "judge": self.cfg.judge.base_url}[need]
        if given:
            self.urls[need] = given
            yield
            return
        port = free_port()
        if need == "teacher":
            cmd = cli_command(["serve", self.teacher_model, "--port", port, "--model-name",
                               self.cfg.teacher.model_name, "--max-batch", 16,
                               "--warmup", "none"])  # its first requests compile what they need
        else:
            cmd = [sys.executable, "-m", "imitation_jax.study.judge_server", "--port", str(port)]
        self.log(f"         starting the {need} API on http://127.0.0.1:{port}/v1")
        with service(cmd, port, self.p("logs", f"serve-{need}.log"), f"the {need} API") as url:
            self.urls[need] = url
            yield
        self.log(f"         stopped the {need} API")

    # ------------------------------------------------------------------ running

    def run(self) -> dict:
        stages = self.plan()
        todo = [s for s in stages if not self._done(s)]
        self.log(f"study: {len(stages)} stages, {len(stages) - len(todo)} already done, {len(todo)} to run "
                 f"(work dir {self.work})")
        start = time.monotonic()
        ran: list[str] = []
        running: dict[str, contextlib.ExitStack] = {}  # services, started when first needed
        try:
            for i, stage in enumerate(stages):
                head = f"[{i + 1:3d}/{len(stages)}] {stage.name:<44}"
                if self._done(stage):
                    self.log(f"{head} done earlier")
                    continue
                for need in stage.needs:
                    if need not in running:
                        running[need] = contextlib.ExitStack()
                        running[need].enter_context(self._service(need))
                self.log(f"{head} running ...")
                t0 = time.monotonic()
                stage.run()
                dt = time.monotonic() - t0
                self.state.mark_done(stage, dt)
                ran.append(stage.name)
                self.log(f"{head} done in {dt:6.1f}s (total {time.monotonic() - start:6.0f}s)")
                for need in list(running):  # stop a service no later stage needs
                    if not any(need in s.needs and not self._done(s) for s in stages[i + 1:]):
                        running.pop(need).close()
        finally:
            for stack in running.values():
                stack.close()
        return {"ran": ran, "stages": [s.name for s in stages], "seconds": time.monotonic() - start,
                "results": self.p("results")}

    def _done(self, stage: Stage) -> bool:
        return self.state.is_done(stage)


def run_study(cfg: StudyConfig, log=print) -> dict:
    return Study(cfg, log=log).run()
