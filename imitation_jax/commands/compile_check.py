"""`imitation-jax compile-check CONFIG --topology SLICE`: will this config fit that TPU slice?

train.objective=kd: kd.source=stored batches carry --teacher-k top-K slots per position (compile-check
reads no data); kd.source=teacher compiles with the frozen teacher in the mesh. Its shape comes from
--teacher-model, else kd.teacher, read as a directory (a run, import-hf or HF dir: its saved config,
never its weights), a config YAML whose `model:` section describes the teacher (e.g.
configs/llama13b_tpu_v5e.yaml) or a preset name (llama-13b); `train` itself needs a directory.
kd.teacher_dtype, when set, is the teacher's parameter and compute dtype, as in `train`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from imitation_jax.commands import EXIT_USER_ERROR


class _IntermixedParser(argparse.ArgumentParser):
    """Positionals (config, overrides) and options in any order: plain argparse gives all positionals
    to the first run of them, so `CONFIG --topology X key=value` would reject `key=value`."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def register(sub) -> None:
    p = sub.add_parser(
        "compile-check", help="compile the train step for a TPU slice (no TPU needed) and check it fits in HBM",
        description="Lowers and compiles the real train step of CONFIG for a TPU topology with libtpu's "
        "compile-only devices (install with `make install-tpu`), prints per-device memory against the chip's "
        "HBM. Exit 0: fits; 1: does not fit; 2: a user error. v4-N/v5p-N count TensorCores (2 per chip), "
        "v5e-N/v6e-N count chips; a shape such as v4:2x2x4 works too.")
    p.add_argument("config", help="YAML config, e.g. configs/llama7b_tpu_v5e.yaml")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.batch_size=64 model.remat=full")
    p.add_argument("--topology", required=True, help="TPU slice: v5e-256, v4-32, v5p-128, v6e-64, v4:2x2x4, ...")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size when model.vocab_size is 0 (compile-check reads no tokenizer)")
    p.add_argument("--teacher-model", default=None, metavar="SPEC",
                   help="kd.source=teacher: the teacher's shape, a preset (llama-13b), a config YAML with a "
                        "model: section, or a run/import-hf/HF dir (its config only); default: kd.teacher")
    p.add_argument("--teacher-k", type=int, default=None, metavar="K",
                   help="kd.source=stored: top-K teacher log-probabilities per position in the batch (default 20, "
                        "the most an OpenAI-compatible API returns)")
    p.set_defaults(func=run)
    p.__class__ = _IntermixedParser  # overrides may come before or after --topology


def teacher_model(cfg, spec: str | None = None):
    """The ModelConfig of kd.source=teacher's teacher, from `spec` (--teacher-model) or kd.teacher,
    in kd.teacher_dtype when set; no weights are read. One-line ConfigError for anything else."""
    from imitation_jax.errors import CheckpointError, ConfigError
    from imitation_jax.model.presets import PRESETS, preset

    spec = spec or cfg.kd.teacher
    what = f"--teacher-model {spec}" if spec != cfg.kd.teacher else f"kd.teacher={spec}"
    if os.path.isdir(spec):  # what `train` would load, so it wins over a preset of the same name
        try:
            model = _saved_model(spec, what)
        except CheckpointError as exc:
            raise ConfigError(f"{what}: {exc}") from None
    elif os.path.isfile(spec):
        model = _yaml_model(spec, what)
    elif spec in PRESETS:
        model = preset(spec)
    else:
        raise ConfigError(f"{what}: no such preset, file or directory; compile-check reads only the teacher's "
                          f"config: give --teacher-model a preset ({', '.join(n for n in PRESETS if n != 'tiny')}), "
                          "a config YAML with a model: section, or a run, import-hf or HF dir")
    dtype = cfg.kd.teacher_dtype
    return model if dtype is None else dataclasses.replace(model, param_dtype=dtype, dtype=dtype)


def _yaml_model(path: str, what: str):
    """The `model:` section of a config YAML (its preset applied below it, as `load_config` does)."""
    from omegaconf import OmegaConf

    from imitation_jax.errors import ConfigError
    from imitation_jax.model.config import ModelConfig
    from imitation_jax.model.presets import preset_fields

    try:
        section = OmegaConf.load(path).get("model")
        if not section:
            raise ValueError("it has no model: section")
        layers = [OmegaConf.structured(ModelConfig)]
        if section.get("preset"):
            layers.append(OmegaConf.structured(preset_fields(section.preset)))
        return OmegaConf.to_object(OmegaConf.merge(*layers, section))
    except Exception as exc:  # YAML, OmegaConf and the presets raise many types
        raise ConfigError(f"{what}: not a teacher model config ({' '.join(str(exc).split())[:200]})") from None


def _saved_model(path: str, what: str):
    """A run dir's, import-hf dir's or HF dir's model config, without its parameters."""
    from imitation_jax.convert import params_dir
    from imitation_jax.convert.hf_config import model_config_from_dir
    from imitation_jax.convert.loading import read_run_config
    from imitation_jax.errors import ConfigError

    if os.path.isfile(os.path.join(path, "config.yaml")):
        return read_run_config(path)[0]
    if params_dir.is_params_dir(path):
        return params_dir.read(path)[0]
    if os.path.isfile(os.path.join(path, "config.json")):
        return model_config_from_dir(path)
    raise ConfigError(f"{what}: neither a run dir (config.yaml), an import-hf checkpoint "
                      f"({params_dir.MODEL_FILE}) nor a Hugging Face dir (config.json)")


def run(args: argparse.Namespace) -> int:
    from imitation_jax.train.compile_check import DEFAULT_TEACHER_K, compile_check, parse_topology
    from imitation_jax.train.config import load_config
    from imitation_jax.errors import ConfigError

    try:
        topo = parse_topology(args.topology)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    cfg = load_config(args.config, args.overrides)
    kd_source = cfg.kd.source if cfg.train.objective == "kd" else None
    if args.teacher_model and kd_source != "teacher":
        raise ConfigError("--teacher-model applies to train.objective=kd with kd.source=teacher only")
    if args.teacher_k is not None and kd_source != "stored":
        raise ConfigError("--teacher-k applies to train.objective=kd with kd.source=stored only")
    teacher = teacher_model(cfg, args.teacher_model) if kd_source == "teacher" else None
    teacher_k = DEFAULT_TEACHER_K if args.teacher_k is None else args.teacher_k
    try:
        report = compile_check(cfg, topo, vocab_size=args.vocab_size, teacher=teacher, teacher_k=teacher_k)
    except RuntimeError as exc:  # no libtpu
        print(f"imitation-jax compile-check: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0 if report.fits else 1
