"""HF import/export against transformers' LlamaForCausalLM (torch, CPU) on tiny random models of
every supported config style."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from imitation_jax.cli import main as cli  # noqa: E402
from imitation_jax.convert.loading import load_model  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
STYLES = {
    "llama1-mha": dict(num_key_value_heads=4, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 10000.0}),
    "llama2-gqa": dict(num_key_value_heads=2, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 10000.0}),
    "llama3.1": dict(num_key_value_heads=2, rms_norm_eps=1e-5, rope_parameters={**LLAMA3_ROPE,
                                                                                 "rope_theta": 500000.0}),
    "tied": dict(num_key_value_heads=1, tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                    "rope_theta": 10000.0}),
}
VOCAB = 600  # the bpe_tokenizer fixture's


def save(model, directory, tokenizer, **kwargs) -> None:
    """save_pretrained plus the tokenizer files (an HF model dir as published)."""
    import shutil

    model.save_pretrained(directory, **kwargs)
    for name in os.listdir(tokenizer.path):
        shutil.copy(os.path.join(tokenizer.path, name), os.path.join(directory, name))


def hf_model(style: str, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                      **{"tie_word_embeddings": False, **STYLES[style]})
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def our_logits(loaded, tokens: np.ndarray) -> np.ndarray:
    import jax.numpy as jnp

    model = loaded.model()
    return np.asarray(model.logits(model(jnp.asarray(tokens))))


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 48))


@pytest.mark.parametrize("style", list(STYLES))
def test_import_export_round_trip(style, tmp_path, bpe_tokenizer):
    model = hf_model(style)
    src = tmp_path / "hf"
    save(model, src, bpe_tokenizer, max_shard_size="200KB")  # sharded, with an index
    assert os.path.isfile(src / "model.safetensors.index.json")
    ref = hf_logits(model, TOKENS)

    # HF dir straight into load_model, and through import-hf's checkpoint dir.
    direct = load_model(str(src))
    assert cli(["import-hf", str(src), "--out", str(tmp_path / "ckpt")]) == 0
    imported = load_model(str(tmp_path / "ckpt"))
    for loaded in (direct, imported):
        diff = float(np.abs(our_logits(loaded, TOKENS) - ref).max())
        print(f"{style}: import max abs diff vs transformers {diff:.2e}")
        assert diff <= 1e-4
    assert imported.config.rope_theta == model.config.rope_parameters["rope_theta"]
    assert imported.config.tie_word_embeddings == model.config.tie_word_embeddings

    # Export (fp32): transformers loads it with no missing/unexpected keys and matches ours.
    out = tmp_path / "out"
    assert cli(["export-hf", str(tmp_path / "ckpt"), "--out", str(out), "--dtype", "float32",
                "--max-shard-size", "200KB"]) == 0
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    back, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    diff = float(np.abs(hf_logits(back.eval(), TOKENS) - our_logits(imported, TOKENS)).max())
    print(f"{style}: export max abs diff vs ours {diff:.2e}")
    assert diff <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == model.config.num_key_value_heads
    assert config["rope_theta"] == model.config.rope_parameters["rope_theta"]

    # HF -> ours -> HF is bit-identical tensor by tensor.
    ours_sd, ref_sd = back.state_dict(), model.state_dict()
    for name, tensor in ref_sd.items():
        assert torch.equal(ours_sd[name], tensor), name


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_inputs_round_trip_bitwise(dtype, tmp_path, bpe_tokenizer):
    model = hf_model("llama2-gqa").to(getattr(torch, dtype))
    save(model, tmp_path / "hf", bpe_tokenizer)
    assert cli(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"), "--dtype", dtype]) == 0
    assert cli(["export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--dtype", dtype]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=getattr(torch, dtype))
    for name, tensor in model.state_dict().items():
        assert back.state_dict()[name].dtype == tensor.dtype
        assert torch.equal(back.state_dict()[name], tensor), name


def test_conversion_holds_one_layer_at_a_time(tmp_path, bpe_tokenizer, monkeypatch):
    """import-hf reads and writes stacked parameters one layer at a time into per-layer chunks (the
    embedding in blocks); export-hf reads them back one layer at a time; a checkpoint saved without
    per-layer chunks (older saves) still exports bit-identically."""
    import orbax.checkpoint as ocp

    from imitation_jax import checkpoint
    from imitation_jax.convert import hf_import, layered_io

    model = hf_model("llama2-gqa")
    save(model, tmp_path / "hf", bpe_tokenizer)
    num_layers = model.config.num_hidden_layers
    reads: dict[tuple, list] = {}
    make_reader = hf_import._reader

    def recording_reader(files, entry, *args):
        read = make_reader(files, entry, *args)

        def wrapped(index):
            out = read(index)
            reads.setdefault(entry.path, []).append(out.shape)
            return out
        return wrapped

    monkeypatch.setattr(hf_import, "_reader", recording_reader)
    monkeypatch.setattr(layered_io, "CHUNK_BYTES", 1 << 14)  # the embedding in 16 KiB blocks
    assert cli(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    monkeypatch.undo()
    item = str(tmp_path / "ckpt" / "params")
    saved = checkpoint.saved_param_shapes(item)
    for path, shapes in reads.items():
        if path[0] == "layers":
            assert len(shapes) == num_layers and all(s[0] == 1 for s in shapes), (path, shapes)
            meta = saved["/".join(path)]
            assert meta.storage.chunk_shape == (1, *meta.shape[1:]), (path, meta.storage)
    embed = reads[("embed",)]
    assert len(embed) > 1 and all(np.prod(s) * 4 <= 1 << 14 for s in embed), embed

    layer_reads = []
    get = layered_io.LayerReader.get

    def recording_get(self, path, layer=None):
        out = get(self, path, layer)
        layer_reads.append((path, layer, out.shape, self._whole[0]))
        return out

    monkeypatch.setattr(layered_io.LayerReader, "get", recording_get)

    def export_matches(out):
        assert cli(["export-hf", str(tmp_path / "ckpt"), "--out", str(out), "--dtype", "float32"]) == 0
        back = AutoModelForCausalLM.from_pretrained(out).state_dict()
        for name, tensor in model.state_dict().items():
            assert torch.equal(back[name], tensor), name

    export_matches(tmp_path / "out")
    stacked = [r for r in layer_reads if r[1] is not None]
    assert len(stacked) == 9 * num_layers
    assert all(whole is None for *_, whole in stacked)  # no whole stacked parameter read

    # The same params saved as one chunk per parameter (what saves wrote before): still exact.
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(item)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(item, params, force=True)
    assert checkpoint.saved_param_shapes(item)["layers/mlp/gate"].storage.chunk_shape[0] == num_layers
    layer_reads.clear()
    export_matches(tmp_path / "out_old")
    assert any(whole is not None for *_, whole in layer_reads)

    # Training-side saves chunk per layer too.
    checkpoint.save_params(str(tmp_path / "saved"), params)
    meta = checkpoint.saved_param_shapes(str(tmp_path / "saved"))["layers/attn/q"]
    assert meta.storage.chunk_shape == (1, *meta.shape[1:])


SHARDED_CHECK = """
import sys, numpy as np, jax
from jax.sharding import Mesh, PartitionSpec
from imitation_jax.convert.hf_import import load_hf_params, read_hf_config
from imitation_jax.convert.loading import load_model
from imitation_jax.sharding import AxisType
hf = sys.argv[1]
cfg = read_hf_config(hf)
mesh = Mesh(np.array(jax.devices()[:4]).reshape(1, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
sharded = load_hf_params(hf, cfg, mesh)
assert sharded["layers"]["attn"]["q"].sharding.spec != PartitionSpec(), sharded["layers"]["attn"]["q"].sharding
assert len(sharded["embed"].addressable_shards) == 4
single = load_model(hf).params
for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
print("SHARDED_OK")
"""


def test_sharded_streaming_load_equals_single_device(tmp_path, bpe_tokenizer):
    """init.hf's path on a 2x2 (fsdp x tensor) mesh of simulated devices: every device shard read
    as HF slices gives the same arrays as a one-device load."""
    import subprocess
    import sys

    save(hf_model("llama2-gqa"), tmp_path / "hf", bpe_tokenizer)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SHARDED_CHECK, str(tmp_path / "hf")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert "SHARDED_OK" in proc.stdout, proc.stderr[-3000:]


def _cli_error(capsys, argv) -> str:
    capsys.readouterr()
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_errors_are_one_line(tmp_path, capsys, bpe_tokenizer):
    model = hf_model("llama2-gqa")
    # Legacy .bin: refused by default, read with --allow-pickle.
    save(model, tmp_path / "bin", bpe_tokenizer)
    os.remove(tmp_path / "bin" / "model.safetensors")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert "pickled code" in _cli_error(capsys, ["import-hf", str(tmp_path / "bin"), "--out", str(tmp_path / "x")])
    assert cli(["import-hf", str(tmp_path / "bin"), "--out", str(tmp_path / "x"), "--allow-pickle"]) == 0
    model.save_pretrained(tmp_path / "ok")
    # Mixtral: mixture of experts, which no family here computes (the field is named).
    mixtral = tmp_path / "mixtral"
    mixtral.mkdir()
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    (mixtral / "config.json").write_text(json.dumps({**cfg, "architectures": ["MixtralForCausalLM"],
                                                      "model_type": "mixtral", "num_local_experts": 8}))
    err = _cli_error(capsys, ["import-hf", str(mixtral), "--out", str(tmp_path / "y")])
    assert "num_local_experts" in err and "MixtralForCausalLM" in err and err.count("config.json") == 1, err
    # Missing tensor, wrong shape, unexpected tensor.
    from safetensors.numpy import load_file, save_file

    weights = load_file(tmp_path / "ok" / "model.safetensors")
    for case, change, words in [
        ("missing", lambda w: w.pop("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight"),
        ("shape", lambda w: w.update({"model.norm.weight": np.ones(65, np.float32)}), "model.norm.weight"),
        ("extra", lambda w: w.update({"model.layers.2.mlp.up_proj.weight": np.ones(2, np.float32)}), "unexpected"),
    ]:
        d = tmp_path / case
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        w = dict(weights)
        change(w)
        save_file(w, str(d / "model.safetensors"))
        assert words in _cli_error(capsys, ["import-hf", str(d), "--out", str(tmp_path / "z")])


def test_student_export_matches_our_greedy_continuation(demo_dir, small_overrides, tmp_path):
    """A trained student (koala + turn tokens added by prepare) exported: transformers' greedy
    continuation equals ours, AutoTokenizer has the added tokens, and the chat_template's text
    tokenizes to our prompt's ids."""
    import jax
    import jax.numpy as jnp

    from imitation_jax.train.config import load_config
    from imitation_jax.data.templates import encode_prompt
    from imitation_jax.commands.train import run_training as train

    cfg = load_config("configs/tiny.yaml", small_overrides + ["data.turn_tokens=true", "train.steps=3",
                                                             "logging.tensorboard=false"])
    run = train(cfg)["run_dir"]
    out = tmp_path / "student"
    assert cli(["export-hf", run, "--out", str(out), "--dtype", "float32"]) == 0
    loaded = load_model(run)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == loaded.tokenizer.vocab_size
    for token, i in loaded.tokenizer.added_tokens.items():
        assert tok.convert_tokens_to_ids(token) == i

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    from imitation_jax.data.formats import Message

    msgs = [Message(**m) for m in messages]
    prompt = encode_prompt(loaded.tokenizer, msgs, loaded.template)
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok(rendered, add_special_tokens=False)["input_ids"] == prompt.tolist()
    model = loaded.model()
    ids, total = list(prompt), len(prompt) + 8

    @jax.jit
    def next_logits(tokens, last):  # one compiled length: the pad after `last` is never attended to
        return model.logits(model(tokens))[0, last]

    for _ in range(8):
        padded = jnp.asarray([ids + [0] * (total - len(ids))])
        ids.append(int(jnp.argmax(next_logits(padded, len(ids) - 1))))
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        hf_ids = hf.generate(torch.tensor([prompt.tolist()]), max_new_tokens=8, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0].tolist()
    assert hf_ids == ids
    # load_model reads the export back with the same template and the same logits.
    again = load_model(str(out))
    assert getattr(again.template, "name", None) == loaded.template.name
    np.testing.assert_allclose(our_logits(again, np.asarray([ids])), our_logits(loaded, np.asarray([ids])),
                               atol=1e-5)


def test_train_from_init_hf_grows_vocab_for_turn_tokens(demo_dir, small_overrides, tmp_path):
    """init.hf takes the architecture and weights from the HF dir; the turn tokens prepare adds
    grow the vocab: old rows are the checkpoint's, new rows are small random ones."""
    from imitation_jax.train.config import load_config
    from imitation_jax.commands.train import run_training as train

    torch.manual_seed(1)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
    base.save_pretrained(tmp_path / "base")
    overrides = [o for o in small_overrides if not o.startswith("model.")]
    cfg = load_config("configs/tiny.yaml", overrides + [f"init.hf={tmp_path / 'base'}", "data.turn_tokens=true",
                                                        "train.steps=1", "optim.lr=0", "logging.tensorboard=false"])
    summary = train(cfg)
    params = summary["params"]
    assert cfg.model.intermediate_size == 128 and cfg.model.vocab_size == 514
    embed = np.asarray(params["embed"])
    np.testing.assert_array_equal(embed[:512], base.model.embed_tokens.weight.detach().numpy())
    new = embed[512:]
    assert new.shape == (2, 64) and 0 < np.abs(new).max() < 0.2  # normal(0, initializer_range)
    head = np.asarray(params["lm_head"])
    np.testing.assert_array_equal(head[:, :512], base.lm_head.weight.detach().numpy().T)

    # init.checkpoint of the imported base grows the same way (same seed: the same new rows).
    assert cli(["import-hf", str(tmp_path / "base"), "--out", str(tmp_path / "ckpt")]) == 0
    arch = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2", "model.num_heads=4",
            "model.num_kv_heads=2", "model.rms_norm_eps=1e-6", f"run_dir={tmp_path / 'run2'}"]
    cfg2 = load_config("configs/tiny.yaml", overrides + arch + [
        f"init.checkpoint={tmp_path / 'ckpt'}", "data.turn_tokens=true", "train.steps=1", "optim.lr=0",
        "logging.tensorboard=false"])
    again = train(cfg2)["params"]
    np.testing.assert_array_equal(np.asarray(again["embed"]), embed)
    np.testing.assert_array_equal(np.asarray(again["lm_head"]), head)
