"""export-hf streams the embedding and lm_head by row blocks: with a tiny block limit forced, the
files are byte-identical to an unstreamed export, transformers loads them, and no block the writer
held exceeded the limit."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from imitation_jax.cli import main as cli  # noqa: E402
from imitation_jax.convert import hf_export, layered_io, safetensors_io  # noqa: E402

VOCAB = 600  # the bpe_tokenizer fixture's


@pytest.mark.parametrize("tied", [False, True])
def test_export_streams_vocab_tensors_bit_exact(tied, tmp_path, bpe_tokenizer, monkeypatch):
    import shutil

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=tied)).eval()
    src = tmp_path / "hf"
    model.save_pretrained(src)
    for name in os.listdir(bpe_tokenizer.path):
        shutil.copy(os.path.join(bpe_tokenizer.path, name), src / name)
    monkeypatch.setattr(layered_io, "CHUNK_BYTES", 64 * 4 * 40)  # the vocab tensors in many chunks
    assert cli(["import-hf", str(src), "--out", str(tmp_path / "ckpt")]) == 0
    monkeypatch.undo()

    blocks: list[tuple[str, int]] = []  # (tensor, bytes) of every block the writer was handed
    add_blocks = safetensors_io.ShardedWriter.add_blocks

    def recording(self, name, it):
        def seen():
            for block in it:
                blocks.append((name, np.asarray(block).nbytes))
                yield block
        add_blocks(self, name, seen())
        assert self.peak_block_bytes == max(b for _, b in blocks)

    monkeypatch.setattr(safetensors_io.ShardedWriter, "add_blocks", recording)
    block_reads = []
    get_block = layered_io.LayerReader.get_block

    def recording_get_block(self, path, index):
        out = get_block(self, path, index)
        block_reads.append((path, out.nbytes, self._whole[0]))
        return out

    monkeypatch.setattr(layered_io.LayerReader, "get_block", recording_get_block)

    def export(out):
        assert cli(["export-hf", str(tmp_path / "ckpt"), "--out", str(out), "--dtype", "float32",
                    "--max-shard-size", "300KB"]) == 0
        return {f: (out / f).read_bytes() for f in sorted(os.listdir(out)) if "safetensors" in f}

    monkeypatch.setattr(hf_export, "ROW_BLOCK_BYTES", 1 << 40)  # one block per tensor: unstreamed
    whole = export(tmp_path / "whole")
    assert len(whole) > 2  # several shards, and the index
    assert all(n == 1 for n in _counts(blocks).values())
    blocks.clear()
    block_reads.clear()

    limit = 64 * 4 * 50  # 50 rows of 64 float32
    monkeypatch.setattr(hf_export, "ROW_BLOCK_BYTES", limit)
    streamed = export(tmp_path / "streamed")
    assert streamed == whole  # byte-identical files

    counts = _counts(blocks)
    vocab_names = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
    for name in vocab_names:
        assert counts[name] == -(-VOCAB // 50), name
    assert max(b for n, b in blocks if n in vocab_names) <= limit
    # Read in blocks too, through tensorstore slices (never the whole parameter).
    assert block_reads and all(b <= limit and whole is None for _, b, whole in block_reads)

    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def _counts(blocks):
    counts: dict[str, int] = {}
    for name, _ in blocks:
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_writer_rejects_blocks_that_do_not_fit(tmp_path):
    writer = safetensors_io.ShardedWriter(str(tmp_path), 1 << 20, [("a", (4, 3), np.dtype("float32"))])
    with pytest.raises(ValueError, match="does not fit"):
        writer.add_blocks("a", [np.zeros((3, 3)), np.zeros((2, 3))])
    writer = safetensors_io.ShardedWriter(str(tmp_path / "b"), 1 << 20, [("a", (4, 3), np.dtype("float32"))])
    with pytest.raises(ValueError, match="got 3 rows"):
        writer.add_blocks("a", [np.zeros((3, 3))])
