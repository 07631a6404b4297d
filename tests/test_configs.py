"""Every YAML in configs/ loads with the real config loader (data paths may be placeholders), and
the reference study's recipes say what they claim."""

from __future__ import annotations

import pathlib
import re

import pytest

from imitation_jax.train.config import load_config

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.yaml"))
REFERENCE = [p for p in CONFIGS if p.name.startswith("llama")]


def test_reference_configs_exist():
    names = {p.stem for p in REFERENCE}
    assert {"llama7b_tpu_v4", "llama7b_tpu_v5e", "llama7b_gpu8",
            "llama13b_tpu_v4", "llama13b_tpu_v5e", "llama13b_gpu8"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(str(path), [])
    assert cfg.run_dir


@pytest.mark.parametrize("path", REFERENCE, ids=lambda p: p.name)
def test_reference_recipe(path):
    cfg = load_config(str(path), [])
    size = "13b" if "13b" in path.name else "7b"
    assert cfg.model.preset == f"llama-{size}" and cfg.model.vocab_size == 32000  # compile-check needs it
    assert (cfg.model.dtype, cfg.model.param_dtype, cfg.data.seq_len) == ("bfloat16", "float32", 2048)
    assert cfg.model.remat != "none" and cfg.data.template == "koala"
    assert cfg.init.checkpoint and size in cfg.init.checkpoint  # the imported base model
    assert cfg.optim.lr == 2e-5 and cfg.train.batch_size % 8 == 0
    assert cfg.checkpoint.every_steps > 0 and cfg.checkpoint.every_minutes > 0  # preemptible hardware


@pytest.mark.parametrize("override, named", [("model.num_kv_heads=3", "model.num_heads"),
                                             ("model.num_heads=3", "model.num_heads"),
                                             ("model.head_dim=33", "model.head_dim=33")])
def test_train_model_shape_error_is_one_line_naming_the_key(small_overrides, override, named, capsys):
    """ModelConfig's own checks (heads divisible by kv heads) reach the user as one config line, exit 2."""
    from imitation_jax.cli import main

    tiny = str(pathlib.Path(__file__).parent.parent / "configs" / "tiny.yaml")
    assert main(["train", tiny, *small_overrides, override]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "config" in lines[0], lines


def test_extends_merges_the_parent_first_and_refuses_cycles(tmp_path, capsys):
    """`extends: OTHER.yaml` (relative to the file): the parent's keys, the child's on top, command-line
    overrides on top of both; a chain of two; a missing parent, a non-path and a cycle are one line."""
    from imitation_jax.cli import main
    from imitation_jax.errors import ConfigError

    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("run_dir: r\nmodel: {preset: tiny, dtype: bfloat16}\ntrain: {steps: 7}\n"
                                        "data: {path: prepared}\n")
    (tmp_path / "sub" / "mid.yaml").write_text("extends: ../root.yaml\ntrain: {steps: 8, batch_size: 2}\n")
    (tmp_path / "leaf.yaml").write_text("extends: sub/mid.yaml\nrun_dir: leaf\n")
    cfg = load_config(str(tmp_path / "leaf.yaml"), ["train.batch_size=3"])
    assert (cfg.run_dir, cfg.model.dtype, cfg.train.steps, cfg.train.batch_size) == ("leaf", "bfloat16", 8, 3)

    (tmp_path / "a.yaml").write_text("extends: b.yaml\nrun_dir: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    (tmp_path / "lost.yaml").write_text("extends: nowhere.yaml\nrun_dir: x\n")
    (tmp_path / "odd.yaml").write_text("extends: [a.yaml]\nrun_dir: x\n")
    for name, words in (("a", "cycle"), ("lost", "nowhere.yaml (extended by"), ("odd", "extends must be")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            load_config(str(tmp_path / f"{name}.yaml"))
        assert main(["train", str(tmp_path / f"{name}.yaml")]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("family", ["qwen3_8b", "mistral7b", "gemma3_4b"])
def test_family_configs_are_the_llama7b_recipe_with_their_student(family):
    root = pathlib.Path(__file__).parent.parent / "configs"
    cfg, recipe = load_config(str(root / f"{family}_tpu_v5e.yaml")), load_config(str(root / "llama7b_tpu_v5e.yaml"))
    assert (cfg.optim, cfg.train, cfg.mesh, cfg.eval) == (recipe.optim, recipe.train, recipe.mesh, recipe.eval)
    assert cfg.model.family != "llama" and cfg.data.template != "koala" and cfg.run_dir != recipe.run_dir
