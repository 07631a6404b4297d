"""Distillation under every way of running the train step (issue 17: "works with packing, grad
accumulation, remat, scan and every mesh"), for both teacher signals: stored top-K in the rows
(`teacher_ids` / `teacher_logprobs`) and a frozen teacher in the same mesh.

The step is the one `train` builds (`builder.build_program`, the teacher loaded by
`commands.train.teacher_source`), with an optimizer whose state is the step's gradient (already
divided by the global batch's trained tokens): the loss, its kd / ce parts and the whole gradient
are compared, not parameters after Adam (whose first update is about lr * sign(g), noisy where g
is near 0). Packing is checked on rows made by the data layer (`packing.packed_rows` +
`assemble`): a row holding two examples gives each example the sums and gradient it gets alone.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import small_run_overrides
from imitation_jax.data.packing import FIELDS, TEACHER_FIELDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
K = 5  # stored top-K
ROWS = 8  # = train.batch_size of small_overrides

# Both signals, each with another divergence, the cross entropy on the text mixed in.
SOURCES = {
    "stored": ["train.objective=kd", "kd.source=stored", "kd.loss=forward_kl", "kd.alpha=0.3"],
    "teacher": ["train.objective=kd", "kd.source=teacher", "kd.loss=jsd", "kd.beta=0.3", "kd.temperature=2.0",
                "kd.alpha=0.3"],
}
# The reference is tiny.yaml's way: its (here 2) layers as straight-line code (scan_unroll 4), no
# remat, grad_accum 1, one loss chunk (256 >= seq_len 128), the last layer fused into the loss.
# Each mode computes the same step another way; they are grouped (a compile costs ~5 s here) so
# every setting differs from the reference in at least one mode. Scanned modes scan the teacher's
# layers too (as a teacher saved with model.scan_unroll=1 would).
MODES = {
    "remat=full grad_accum=2 loss_chunk=32": ["model.remat=full", "train.grad_accum=2", "train.loss_chunk=32"],
    "scan remat=save_dots fuse_last_layer=false": ["model.scan_unroll=1", "model.remat=save_dots",
                                                   "train.fuse_last_layer=false"],
}
# On 8 simulated devices (a subprocess: the device count is fixed when JAX starts): data, fsdp and
# tensor axes of 2, micro-batches of 4 rows over data x fsdp, remat'd scanned layers.
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.grad_accum=2", "model.scan_unroll=1",
        "model.remat=full"]

# Tolerances. Everything is fp32 (conftest asks for "highest" matmul precision); a mode changes the
# order of fp32 sums: the loss is a sum over ~1e3 trained positions of 512-way softmaxes, each
# gradient entry a sum over those positions (split into micro-batches, chunks, devices), so a few
# ulps per term leave ~1e-6 relative (measured on this CPU: <= 4.2e-7 for the loss and its parts,
# <= 5.5e-7 for gradients against their leaf's largest entry, packed rows included). The bounds
# leave ~20x room and are far below what a lost micro-batch, a mask or a target shifted by one
# position would change (>= 1e-2).
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-5  # of each leaf's largest |entry| (an entry near 0 carries only absolute error)


def _capture_gradient() -> optax.GradientTransformation:
    """An "optimizer" that leaves the parameters alone and keeps the step's gradient as its state."""
    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(grads, state, params=None):
        return jax.tree.map(jnp.zeros_like, grads), grads

    return optax.GradientTransformation(init, update)


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def _forward(graphdef):
    """jit: (params, inputs, positions, segment_ids) -> log-softmax (B, T, V) of the model's logits."""
    from flax import nnx

    def logprobs(params, inputs, positions, segments):
        model = nnx.merge(graphdef, params)
        return jax.nn.log_softmax(model.logits(model(inputs, positions, segments)), axis=-1)

    return jax.jit(logprobs)


def _teacher_top_k(loaded, rows: dict, k: int = K) -> dict:
    """Stored targets laid out as `packing.assemble` lays them: at each trained position the
    teacher's top-k ids and log-probabilities (its own forward pass over the packed rows), id -1
    and logprob NEG_INF elsewhere."""
    from imitation_jax.data.teacher_logprobs import NEG_INF

    lp = _forward(loaded.graphdef)(loaded.params, rows["inputs"], rows["positions"], rows["segment_ids"])
    logprobs, ids = jax.lax.top_k(lp, k)
    trained = rows["loss_mask"][..., None] > 0
    return {"teacher_ids": np.where(trained, np.asarray(ids), -1).astype(np.int32),
            "teacher_logprobs": np.where(trained, np.asarray(logprobs), NEG_INF).astype(np.float32)}


def _teacher_layers_like_student(frozen, student):
    from imitation_jax.model.params import model_graph

    if student.scan_unroll >= student.num_layers:
        return frozen
    config = dataclasses.replace(frozen.config, scan_unroll=student.scan_unroll)
    return dataclasses.replace(frozen, config=config, graphdef=model_graph(config)[0])


def kd_step(overrides: list[str], rows: dict, params: dict) -> tuple[dict, dict]:
    """One kd train step as `train` builds it, on the ROWS rows of `rows`, from the student
    parameters `params` ({path: array}): (metrics, {path: gradient}), as numpy."""
    from unittest import mock

    from imitation_jax.commands.train import teacher_source
    from imitation_jax.sharding import make_mesh
    from imitation_jax.train import builder
    from imitation_jax.train.config import load_config
    from imitation_jax.train.state import init_opt_state, step_scalar

    cfg = load_config(TINY, overrides)
    mesh = make_mesh(cfg.mesh)
    model = builder.resolve_model(cfg.model, mesh, int(rows["vocab_size"]))
    capture = _capture_gradient()
    with jax.set_mesh(mesh), mock.patch.object(builder, "make_optimizer", lambda optim, steps: (capture, None)):
        frozen = None
        if cfg.kd.source == "teacher":
            frozen = _teacher_layers_like_student(teacher_source(cfg)(mesh), model)
            builder.check_teacher(frozen, model)
        program = builder.build_program(cfg, mesh, model, 1, frozen)
        placed = jax.tree_util.tree_map_with_path(
            lambda path, a: jax.device_put(params[jax.tree_util.keystr(path)], a.sharding), program.abstract["params"])
        state = {"params": placed, "opt_state": init_opt_state(capture, placed, mesh), "step": step_scalar(0, mesh)}
        accum = cfg.train.grad_accum
        keys = FIELDS + (TEACHER_FIELDS if cfg.kd.source == "stored" else ())
        batch = {k: jax.device_put(rows[k].reshape(accum, ROWS // accum, *rows[k].shape[1:]), program.batch_sharding)
                 for k in keys}
        state, metrics = program.train_step(state, batch, *(() if frozen is None else (frozen.params,)))
    return {k: float(v) for k, v in jax.device_get(metrics).items()}, _flat(state["opt_state"])


def _assert_same_gradient(g: dict, g_ref: dict, what: str) -> None:
    assert g.keys() == g_ref.keys(), what
    for path, ref_leaf in g_ref.items():
        scale = float(np.abs(ref_leaf).max())
        assert scale > 0, (what, path)
        np.testing.assert_allclose(g[path], ref_leaf, rtol=0, atol=GRAD_RTOL * scale, err_msg=f"{what}: {path}")


def _assert_same_step(got, ref, what: str) -> None:
    (m, g), (m_ref, g_ref) = got, ref
    assert m["loss_tokens"] == m_ref["loss_tokens"], what
    for key in ("loss", "kd", "ce", "accuracy", "grad_norm"):
        np.testing.assert_allclose(m[key], m_ref[key], rtol=LOSS_RTOL, err_msg=f"{what}: {key}")
    _assert_same_gradient(g, g_ref, what)


@pytest.fixture(scope="module")
def setup(demo_dir, kd_teacher):
    """Overrides of both sources, ROWS training rows of the small demo set (half packed with two or
    more examples) with the teacher's top-K, and the student's first parameters."""
    from imitation_jax.convert.loading import load_model
    from imitation_jax.data.training import load_training_data
    from imitation_jax.model.params import init_params
    from imitation_jax.sharding import MeshConfig, make_mesh
    from imitation_jax.train.builder import resolve_model
    from imitation_jax.train.config import load_config

    base = small_run_overrides(demo_dir, "unused")
    overrides = {name: base + extra + ([f"kd.teacher={kd_teacher}"] if name == "teacher" else [])
                 for name, extra in SOURCES.items()}
    cfg = load_config(TINY, overrides["stored"])
    data = load_training_data(cfg.data, log=None)
    every = data.train.take(np.arange(len(data.train)))
    segments = every["segment_ids"].max(axis=1)
    pick = np.concatenate([np.flatnonzero(segments >= 2)[:ROWS // 2], np.flatnonzero(segments == 1)[:ROWS // 2]])
    assert len(pick) == ROWS, segments
    rows = {k: v[pick] for k, v in every.items()}
    rows.update(_teacher_top_k(load_model(kd_teacher), rows))
    rows["vocab_size"] = np.asarray(data.vocab_size)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    model = resolve_model(cfg.model, mesh, data.vocab_size)
    params = _flat(init_params(model, mesh, cfg.train.seed))
    return {"overrides": overrides, "rows": rows, "params": params, "teacher": kd_teacher, "model": model}


def test_kd_step_is_the_same_with_remat_scan_accumulation_chunks_and_on_8_devices(setup, tmp_path):
    """Each source's reference step against MODES in this process and against MESH on 8 simulated
    devices (a subprocess, as the device count is fixed when JAX starts; it runs meanwhile)."""
    rows, params = setup["rows"], setup["params"]
    np.savez(tmp_path / "rows.npz", **rows)
    np.savez(tmp_path / "params.npz", **params)
    (tmp_path / "cases.json").write_text(json.dumps({s: o + MESH for s, o in setup["overrides"].items()}))
    with open(tmp_path / "stderr.txt", "w") as err:
        sharded = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(tmp_path)], cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=err,
                                   env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    try:
        refs = {}
        for source, base in setup["overrides"].items():
            refs[source] = kd_step(base, rows, params)
            m = refs[source][0]
            assert m["kd"] > 1e-3 and m["ce"] > 0.1 and m["grad_norm"] > 1e-3, (source, m)
            for mode, extra in MODES.items():
                _assert_same_step(kd_step(base + extra, rows, params), refs[source], f"{source}, {mode}")
        assert sharded.wait(timeout=600) == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
    finally:
        if sharded.poll() is None:
            sharded.kill()
            sharded.wait()
    for source in SOURCES:
        with np.load(tmp_path / f"{source}.npz") as f:
            got = json.loads(str(f["metrics"])), {k[2:]: f[k] for k in f.files if k.startswith("g:")}
        _assert_same_step(got, refs[source], f"{source}, 8 devices: {' '.join(MESH)}")


def _sharded_main(work: str) -> None:
    """The 8-device subprocess: each case's step, saved as WORK/<case>.npz."""
    assert jax.device_count() == 8, jax.devices()
    load = lambda name: dict(np.load(os.path.join(work, name)))  # noqa: E731
    rows, params = load("rows.npz"), load("params.npz")
    for name, overrides in json.load(open(os.path.join(work, "cases.json"))).items():
        metrics, grads = kd_step(overrides, rows, params)
        np.savez(os.path.join(work, f"{name}.npz"), metrics=json.dumps(metrics),
                 **{f"g:{k}": v for k, v in grads.items()})


# ------------------------------------------------------------------------------------ packing


def _two_examples(loaded, demo_dir, seq_len: int):
    """Two conversations of the demo set, of different lengths, that fit one row together."""
    from imitation_jax.data.readers import read_conversations
    from imitation_jax.data.templates import encode_conversation

    examples = []
    for conv in read_conversations([f"{demo_dir}/train.jsonl"]):
        e = encode_conversation(loaded.tokenizer, conv, loaded.template)
        if e.loss_mask[1:].sum() >= 8 and len(e) < seq_len // 2 and all(len(e) != len(x) for x in examples):
            examples.append(e)
        if len(examples) == 2:
            return examples
    raise AssertionError("no two short examples in the demo set")


def _example_targets(forward, params, example, k: int, seq_len: int):
    """teacher_targets.Targets of one example from a model's forward pass over it alone (right-padded
    to seq_len: causal attention keeps the padding out): the top-k at every trained id position c
    >= 1, the distribution predicting ids[c]."""
    from imitation_jax.data.teacher_targets import Targets

    n = len(example) - 1
    inputs = np.zeros((1, seq_len), np.int32)
    inputs[0, :n] = example.ids[:-1]
    lp = forward(params, inputs, np.arange(seq_len)[None], np.ones((1, seq_len), np.int32))[0, :n]
    logprobs, ids = jax.lax.top_k(lp, k)
    at = np.flatnonzero(example.loss_mask[1:]) + 1
    return Targets(at.astype(np.int32), np.asarray(ids)[at - 1].astype(np.int32),
                   np.asarray(logprobs)[at - 1].astype(np.float32))


def test_a_packed_row_gives_each_example_its_own_kd_sums(setup, demo_dir):
    """Two examples packed into one row (segment ids 1 and 2, positions restarting) against each alone
    in its row: per example (the loss mask kept to its segment) the same loss, kd and ce sums and
    the same gradient, for both sources. So attention does not cross the segment boundary (the
    student's nor the in-mesh teacher's) and the stored targets of the second example sit at its own
    positions (`assemble` shifts each example by its own start). The first example stores K = 5
    alternatives, the second 3 (padded to 5 in the row). Stored targets from the student itself give
    a zero divergence on the packed row, which targets shifted by a position would not."""
    from imitation_jax.convert.loading import load_model
    from imitation_jax.data.packing import assemble, packed_rows
    from imitation_jax.model.params import model_graph
    from imitation_jax.train.config import load_config
    from imitation_jax.train.objectives import make_loss_fn

    seq_len = 128
    teacher = load_model(setup["teacher"])
    examples = _two_examples(teacher, demo_dir, seq_len)
    pad = teacher.tokenizer.pad_id
    graphdef = model_graph(setup["model"])[0]
    params = jax.tree_util.tree_map_with_path(lambda p, _: jnp.asarray(setup["params"][jax.tree_util.keystr(p)]),
                                              model_graph(setup["model"])[1])
    student_forward, teacher_forward = _forward(graphdef), _forward(teacher.graphdef)
    n1 = len(examples[0]) - 1

    def rows_of(assignment, forward=None, signal_params=None):
        if forward is None:
            return assemble(list(packed_rows(examples, assignment)), seq_len, pad)
        targets = [_example_targets(forward, signal_params, e, k, seq_len) for e, k in zip(examples, (K, 3))]
        return assemble(list(packed_rows(examples, assignment, targets, K)), seq_len, pad, teacher_k=K)

    for source in SOURCES:
        cfg = load_config(TINY, setup["overrides"][source] + ["train.loss_chunk=32"])
        loss_fn = make_loss_fn(graphdef, "kd", cfg.kd, cfg.train.loss_chunk, cfg.train.fuse_last_layer,
                               teacher.graphdef)
        step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        t_params = (teacher.params,) if source == "teacher" else ()

        def sums(rows, row, segment):
            batch = {k: jnp.asarray(v[row:row + 1]) for k, v in rows.items()}
            batch["loss_mask"] = batch["loss_mask"] * (batch["segment_ids"] == segment)
            (loss, parts), grads = step(params, batch, *t_params)
            return np.asarray([loss, parts["kd"], parts["ce"]]), _flat(grads)

        signal = (teacher_forward, teacher.params) if source == "stored" else ()
        packed, alone = rows_of([[0, 1]], *signal), rows_of([[0], [1]], *signal)
        assert packed["segment_ids"][0, n1 - 1:n1 + 1].tolist() == [1, 2] and packed["positions"][0, n1] == 0
        if source == "stored":  # the second example's targets start where its positions do
            np.testing.assert_array_equal(packed["teacher_ids"][0, n1:], alone["teacher_ids"][1, :seq_len - n1])
            assert (alone["teacher_ids"][1, :, 3:] == -1).all() and (alone["teacher_ids"][1, :, :3] >= 0).any()
        for i in range(2):
            (got, g), (ref, g_ref) = sums(packed, 0, i + 1), sums(alone, i, 1)
            assert ref[1] > 1e-3, ref
            np.testing.assert_allclose(got, ref, rtol=LOSS_RTOL, err_msg=f"{source}, example {i + 1}: loss, kd, ce")
            _assert_same_gradient(g, g_ref, f"{source}, example {i + 1}")
        if source == "stored":  # the student's own top-K as the stored teacher: nothing to learn
            own = rows_of([[0, 1]], student_forward, params)
            for segment in (1, 2):
                kd = sums(own, 0, segment)[0][1]
                assert abs(kd) < 1e-6 * own["loss_mask"].sum(), (segment, kd)


if __name__ == "__main__":
    import conftest  # noqa: F401  (fp32 matmul precision, as in the test process)

    _sharded_main(sys.argv[1])
