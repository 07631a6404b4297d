"""`imitation-jax compile-check`: TPU slice names, the HBM table and the fits verdict (fast, any venv),
and real compiles of LLaMA-7B for a v5e and a v4 slice (slow; need libtpu, i.e. `make test-tpu`)."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest

from imitation_jax.cli import main
from imitation_jax.train.compile_check import GiB, MemoryReport, parse_topology

ROOT = pathlib.Path(__file__).parent.parent
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed in this venv; the TPU "
                                  "compile-check tests run in .venv-tpu: make test-tpu")


@pytest.mark.parametrize("name, libtpu_name, chips, hbm_gib", [
    ("v5e-256", "v5e:16x16", 256, 16), ("v5e-16", "v5e:4x4", 16, 16), ("v5e-8", "v5e:2x4", 8, 16),
    ("v5litepod-32", "v5e:4x8", 32, 16), ("v6e-64", "v6e:8x8", 64, 32), ("v6e-1", "v6e:1x1", 1, 32),
    # v4 and v5p names count TensorCores, two per chip: v4-32 is 16 chips.
    ("v4-8", "v4:2x2x1", 4, 32), ("v4-16", "v4:2x2x2", 8, 32), ("v4-32", "v4:2x2x4", 16, 32),
    ("v4-128", "v4:4x4x4", 64, 32), ("v4-384", "v4:4x4x12", 192, 32), ("v4-512", "v4:4x8x8", 256, 32),
    ("v5p-8", "v5:2x2x1", 4, 95), ("v5p-128", "v5:4x4x4", 64, 95), ("v5p-2304", "v5:8x12x12", 1152, 95),
    ("v4:2x2x4", "v4:2x2x4", 16, 32), ("V5P:4x4x8", "v5:4x4x8", 128, 95), ("v5e:4x8", "v5e:4x8", 32, 16),
])
def test_topology_names(name, libtpu_name, chips, hbm_gib):
    topo = parse_topology(name)
    assert (topo.libtpu_name, topo.chips, topo.chip.hbm_gib) == (libtpu_name, chips, hbm_gib)
    assert topo.hbm_bytes == hbm_gib * GiB
    assert parse_topology(topo.slice_name) == topo  # slice name and shape round-trip


def test_topology_slice_name_and_wrap():
    assert parse_topology("v4:2x2x4").slice_name == "v4-32"
    assert parse_topology("v5:4x4x4").slice_name == "v5p-128"
    assert parse_topology("v4-32").wrap == (False, False, False)
    assert parse_topology("v4-128").wrap == (True, True, True)
    assert parse_topology("v5e-256").wrap == (True, True, False)
    assert parse_topology("v5e-128").wrap == (False, True, False)


@pytest.mark.parametrize("name, message", [
    ("v3-8", "unknown TPU topology"), ("tpu", "unknown TPU topology"), ("v4-7", "2 per chip"),
    ("v4-12", "no v4 slice of 6 chips"), ("v5e-12", "no v5e slice of 12 chips"), ("v4:2x2", "3 dimensions"),
])
def test_topology_errors(name, message):
    with pytest.raises(ValueError, match=message):
        parse_topology(name)


def test_memory_report_total_and_fits():
    stats = types.SimpleNamespace(argument_size_in_bytes=5 * GiB, output_size_in_bytes=5 * GiB,
                                  alias_size_in_bytes=5 * GiB, temp_size_in_bytes=9 * GiB,
                                  generated_code_size_in_bytes=GiB // 2)
    report = MemoryReport.from_compiled(stats, 16 * GiB)
    assert report.total == 14.5 * GiB  # donated outputs are counted once
    assert report.fits and report.lines()[-1] == "fits: yes (1.50 GiB to spare)"
    tight = MemoryReport.from_compiled(stats, 14 * GiB)
    assert not tight.fits and tight.lines()[-1] == "fits: NO (0.50 GiB over)"
    assert MemoryReport.from_compiled(stats, int(14.5 * GiB)).fits  # exactly full still fits
    # The TPU compiler refuses a program that does not fit: its message is the verdict.
    refused = MemoryReport(19 * GiB, 0, 0, 0, 0, 16 * GiB, compiler_error="Ran out of memory in memory space hbm")
    assert not refused.fits and refused.lines()[-1] == "fits: NO"
    assert any("Ran out of memory" in line for line in refused.lines())


def test_cli_user_errors_exit_2(capsys):
    assert main(["compile-check", str(ROOT / "configs/llama7b_tpu_v5e.yaml"), "--topology", "v3-8"]) == 2
    assert "unknown TPU topology 'v3-8'" in capsys.readouterr().err
    # vocab_size 0 ("take the tokenizer's") cannot be resolved: compile-check reads no tokenizer.
    assert main(["compile-check", str(ROOT / "configs/tiny.yaml"), "--topology", "v5e-4"]) == 2
    assert "set model.vocab_size" in capsys.readouterr().err


@pytest.mark.skipif(HAS_LIBTPU, reason="checks the message shown when libtpu is missing")
def test_cli_without_libtpu_says_how_to_install(capsys):
    assert main(["compile-check", str(ROOT / "configs/llama7b_tpu_v5e.yaml"), "--topology", "v5e-16"]) == 2
    assert "make install-tpu" in capsys.readouterr().err


def _compile_check(config: str, topology: str, *overrides: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "imitation_jax.cli", "compile-check", config, "--topology",
                           topology, *overrides], cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    return proc.returncode, proc.stdout + proc.stderr


def _gib(output: str, row: str) -> float:
    return float(re.search(rf"^\s+{row}\s+([\d.]+) GiB", output, re.M).group(1))


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("config, topology, devices, hbm", [
    ("configs/llama7b_tpu_v5e.yaml", "v5e-16", 16, 16),
    ("configs/llama7b_tpu_v4.yaml", "v4-16", 8, 32),
])
def test_compile_check_llama7b(config, topology, devices, hbm):
    code, out = _compile_check(config, topology)
    assert code == 0, out
    assert f"{devices} devices" in out and "6.74B params" in out
    # Arguments: fp32 params and two AdamW moments (12 bytes/param) sharded over every device, plus the batch.
    expected = (6_738_415_616 * 12 + 5 * 4 * 32 * 2048) / devices / GiB
    assert _gib(out, "arguments") == pytest.approx(expected, rel=0.02), out
    total = _gib(out, "total")
    assert _gib(out, "temporaries") > 0 and 0 < total <= hbm
    assert re.search(rf"total\s+{total:.2f} GiB\s+of {hbm} GiB HBM", out) and "fits: yes" in out


@pytest.mark.slow
@needs_libtpu
def test_compile_check_does_not_fit_exits_1():
    # LLaMA-7B with fp32 AdamW cannot fit on 4 v5e chips (12 bytes/param alone = 19 GiB per chip).
    code, out = _compile_check("configs/llama7b_tpu_v5e.yaml", "v5e-4", "train.batch_size=4", "model.remat=full")
    assert code == 1, out
    assert "ran out of HBM" in out and "fits: NO" in out
    # Its arguments are computed from the shardings: 12 bytes/param over 4 chips, about 18.8 GiB.
    assert _gib(out, "arguments") == pytest.approx(6_738_415_616 * 12 / 4 / GiB, rel=0.02)


KD_SLICE = "v5e-16"


@pytest.mark.slow
@needs_libtpu
def test_compile_check_llama7b_with_an_in_mesh_llama13b_teacher():
    # configs/README.md: the smallest v5e slice a bf16 LLaMA-13B teacher and a LLaMA-7B student fit.
    code, out = _compile_check("configs/kd_llama7b_from_13b_tpu_v5e.yaml", KD_SLICE, "--teacher-model", "llama-13b")
    assert code == 0, out
    assert "6.74B params" in out and "in-mesh teacher: 13.02B params (bfloat16)" in out
    # The student's 12 bytes/param and the teacher's 2 bytes/param, sharded over every chip, plus the batch.
    devices = parse_topology(KD_SLICE).chips
    expected = (6_738_415_616 * 12 + 13_015_864_320 * 2 + 5 * 4 * 32 * 2048) / devices / GiB
    assert _gib(out, "arguments") == pytest.approx(expected, rel=0.02), out
    assert "teacher params)" in out and "fits: yes" in out


def _tiny_cfg(tmp_path, *extra):
    from imitation_jax.train.config import load_config

    return load_config(str(ROOT / "configs/tiny.yaml"), [
        f"run_dir={tmp_path}", "model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=128",
        "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "data.seq_len=128",
        "train.batch_size=8", "train.steps=2", *extra])


def _conditionals(lowered_text: str) -> int:
    # _tiny_cfg's rows are one loss chunk, so the loss's own chunk-skipping conditional (every
    # platform) is not in the program: what is counted comes from the CPU path.
    return len(re.findall(r"stablehlo\.(?:case|if)\b", lowered_text))


def test_the_cpu_train_step_has_its_fusion_conditionals(tmp_path):
    """The counterpart of the TPU check below: on CPU devices the run builder's program does carry
    the CPU-only conditionals (RoPE tables, transposed keys/values), so their absence means something."""
    import jax

    from imitation_jax.sharding import make_mesh
    from imitation_jax.train.builder import build_program, resolve_model

    cfg = _tiny_cfg(tmp_path, "model.attention=auto")
    mesh = make_mesh(cfg.mesh, devices=jax.devices()[:1])
    model = resolve_model(cfg.model, mesh)
    with jax.set_mesh(mesh):
        program = build_program(cfg, mesh, model, 2)
        text = program.train_step.lower(program.abstract_step_state(), program.abstract_batch(128)).as_text()
    assert _conditionals(text) > 0


@needs_libtpu
def test_the_train_step_checked_for_a_tpu_has_no_cpu_path(tmp_path):
    """compile-check lowers the program a TPU would run: the platform comes from the topology's devices,
    so none of the CPU path's conditionals are in it, with attention left on `auto`."""
    from imitation_jax.train.compile_check import lower_train_step

    low = lower_train_step(_tiny_cfg(tmp_path, "model.attention=auto"), parse_topology("v5e-4"))
    assert _conditionals(low.lowered.as_text()) == 0


# --------------------------------------------------------------------- train.objective=kd

def _kd_arguments(cfg, teacher, batch_rows: int, seq_len: int, k: int) -> tuple[int, int]:
    """(stored, teacher) argument bytes on one device from the model configs' parameter counts: fp32
    params + two fp32 AdamW moments (12 bytes/param), the teacher's params in its dtype, the batch's
    5 (grad_accum, micro, T) int32/fp32 arrays, stored top-K's ids (int32) and logprobs (fp32)."""
    import numpy as np

    student = cfg.model.num_params() * 12 + 5 * 4 * batch_rows * seq_len
    return (student + batch_rows * seq_len * k * (4 + 4),
            student + teacher.num_params() * np.dtype(teacher.param_dtype).itemsize)


def _kd_cfg(tmp_path, *extra):
    return _tiny_cfg(tmp_path, "train.objective=kd", "data.seq_len=64", *extra)


def _teacher_yaml(tmp_path) -> str:
    """A tiny teacher twice the student's depth and wider, described by a config's model: section."""
    path = tmp_path / "teacher.yaml"
    path.write_text("model:\n  preset: tiny\n  vocab_size: 512\n  hidden_size: 96\n  intermediate_size: 256\n"
                    "  num_layers: 4\n  num_heads: 4\n  num_kv_heads: 2\n")
    return str(path)


def test_compile_check_kd_counts_the_teacher_in_the_arguments(tmp_path):
    """Both kd sources lowered and compiled (for this machine's CPU device, so without libtpu): stored
    top-K batches carry their (grad_accum, micro, T, K) arrays, an in-mesh teacher its parameters.
    (Per-device division over a slice: test_compile_check_llama7b_with_an_in_mesh_llama13b_teacher;
    XLA:CPU's memory analysis of a multi-device program is not per device, and tiny arrays on a TPU
    are mostly tile padding.)"""
    import jax

    from imitation_jax.commands.compile_check import teacher_model
    from imitation_jax.train.compile_check import compile_check

    topo, devices, lines = parse_topology("v5e-1"), jax.devices("cpu")[:1], []
    stored = compile_check(_kd_cfg(tmp_path, "kd.source=stored"), topo, out=lines.append,
                           teacher_k=3, devices=devices)
    assert "objective: kd (forward_kl) from stored top-3 teacher log-probabilities in the batch" in lines
    cfg = _kd_cfg(tmp_path, "kd.source=teacher", "kd.teacher_dtype=bfloat16", f"kd.teacher={_teacher_yaml(tmp_path)}")
    teacher = teacher_model(cfg)  # kd.teacher: a config's model: section, in kd.teacher_dtype
    assert (teacher.hidden_size, teacher.num_layers, teacher.param_dtype, teacher.dtype) == (96, 4, "bfloat16",
                                                                                             "bfloat16")
    lines.clear()
    in_mesh = compile_check(cfg, topo, out=lines.append, teacher=teacher, devices=devices)
    assert any("from an in-mesh teacher" in line and "(bfloat16), frozen" in line for line in lines), lines
    assert "arguments" in lines[-6] and "teacher params" in lines[-6], lines
    want_stored, want_teacher = _kd_arguments(cfg, teacher, 8, 64, 3)
    # Beyond the arrays counted: the step and AdamW's count, scalars.
    assert 0 <= stored.arguments - want_stored <= 64, (stored.arguments, want_stored)
    assert 0 <= in_mesh.arguments - want_teacher <= 64, (in_mesh.arguments, want_teacher)
    assert in_mesh.fits and stored.fits


def test_teacher_model_from_a_preset_and_an_hf_dir(tmp_path):
    import json

    from imitation_jax.commands.compile_check import teacher_model
    from imitation_jax.model.presets import preset

    cfg = _kd_cfg(tmp_path, "kd.source=teacher", "kd.teacher=llama-13b")
    assert teacher_model(cfg) == preset("llama-13b")  # no kd.teacher_dtype: as described (fp32)
    assert teacher_model(cfg).num_params() == 13_015_864_320
    # An HF dir: its config.json only (no weights there to read); --teacher-model wins over kd.teacher.
    hf = tmp_path / "llama-13b-hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000, "hidden_size": 5120,
        "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "torch_dtype": "float16"}))
    cfg = _kd_cfg(tmp_path, "kd.source=teacher", "kd.teacher=/nowhere", "kd.teacher_dtype=bfloat16")
    got = teacher_model(cfg, str(hf))
    assert got.num_params() == 13_015_864_320 and (got.param_dtype, got.dtype) == ("bfloat16", "bfloat16")


@pytest.mark.parametrize("args, message", [
    (["kd.teacher=/nowhere/llama-13b"], "kd.teacher=/nowhere/llama-13b: no such preset, file or directory"),
    (["kd.teacher=llama-13b", "--teacher-model", "llama-99b"], "--teacher-model llama-99b: no such preset"),
    (["kd.teacher=CONFIG"], "not a teacher model config (it has no model: section)"),
    (["kd.teacher=llama-13b", "--teacher-k", "5"], "--teacher-k applies to train.objective=kd with kd.source=stored"),
    (["kd.teacher=EMPTY_DIR"], "neither a run dir (config.yaml), an import-hf checkpoint"),
])
def test_bad_teacher_settings_are_one_line_errors(tmp_path, capsys, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_model = tmp_path / "no_model.yaml"
    no_model.write_text("train:\n  steps: 3\n")
    args = [a.replace("CONFIG", str(no_model)).replace("EMPTY_DIR", str(empty)) for a in args]
    assert main(["compile-check", str(ROOT / "configs/tiny.yaml"), "--topology", "v5e-4", f"run_dir={tmp_path}",
                 "train.objective=kd", "kd.source=teacher", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_teacher_with_another_vocabulary_is_a_config_error(tmp_path):
    import dataclasses

    import jax

    from imitation_jax.errors import ConfigError
    from imitation_jax.model.presets import preset
    from imitation_jax.train.compile_check import lower_train_step

    cfg = _kd_cfg(tmp_path, "kd.source=teacher", "kd.teacher=llama-13b")
    teacher = dataclasses.replace(preset("tiny"), vocab_size=1024)
    with pytest.raises(ConfigError, match="its vocabulary has 1024 ids but the student's has 512"):
        lower_train_step(cfg, parse_topology("v5e-1"), teacher=teacher, devices=jax.devices("cpu")[:1])
