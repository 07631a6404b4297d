"""Every YAML in configs/ loads with the real config loader (data paths may be placeholders), and
the reference study's recipes say what they claim."""

from __future__ import annotations

import pathlib

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
