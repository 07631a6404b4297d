"""tools/profile_train.py and tools/profile_trace.py: arms parse, a tiny A/B runs and a trace is read back."""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp

TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools")


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOOLS, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


TINY = "58m,num_layers=2,hidden_size=64,num_heads=4,num_kv_heads=2,intermediate_size=96,vocab_size=256,seq=64,batch=2"


def test_arms_parse_and_patch():
    pt = _tool("profile_train")
    arm = pt.parse_arm("135m,num_layers=4,num_kv_heads=None+chunk128+@p", {"p": {"os.sep": "#"}})
    assert arm.shape["num_layers"] == 4 and arm.shape["num_kv_heads"] is None and arm.shape["hidden_size"] == 576
    assert arm.step == {"loss_chunk": 128} and arm.patches == {"os.sep": "#"}
    before = os.sep
    with pt.patched(arm.patches):
        assert os.sep == "#"
    assert os.sep == before


def test_profile_train_tiny_ab_and_trace(tmp_path, capsys):
    pt, tr = _tool("profile_train"), _tool("profile_trace")
    assert pt.main([TINY, TINY + "+unroll1", "--steps", "1", "--warmup", "0", "--host-memory", "release",
                    "--trace", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "time/ref" in out and "+unroll1" in out
    assert tr.main([str(tmp_path / "0"), "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "module jit_step" in out and "YNNPACK fusions" in out


def test_profile_trace_counts_dot_flops(tmp_path):
    tr = _tool("profile_trace")
    x, w = jnp.ones((64, 48)), jnp.ones((48, 32))
    (tmp_path / "hlo.txt").write_text(jax.jit(lambda x, w: jnp.tanh(x @ w)).lower(x, w).compile().as_text())
    instructions, computations = tr.read_hlo(str(tmp_path / "hlo.txt"))
    # The dot is a dot instruction or inside a (YNNPACK) fusion: either way its FLOPs are found.
    assert max(tr.flops(n, instructions, computations) for n in instructions) == 2 * 64 * 48 * 32
