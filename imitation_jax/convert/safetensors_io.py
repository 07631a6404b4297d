"""Reading and writing HF weight files one tensor at a time.

Reading: `model.safetensors`, or shards listed by `model.safetensors.index.json`, or any
`*.safetensors`; each read opens its file, takes one tensor (or a slice of it) and closes the file
again, so the memory map never keeps more than that tensor's pages resident. Legacy
`pytorch_model*.bin` files are pickles: refused unless the caller allows running pickled code.

Writing: `ShardedWriter` streams planned tensors into `model-0000k-of-0000n.safetensors` files up
to a size limit and writes `model.safetensors.index.json`; it holds no more than the tensor, or
the row block of a tensor (`add_blocks`), being added.
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
from typing import Optional

import numpy as np

from imitation_jax.errors import CheckpointError

INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
PICKLE_REFUSAL = ("loading pytorch_model*.bin runs pickled code from the file; convert it to safetensors "
                  "or pass --allow-pickle if you trust where it came from")


def parse_size(text: str | int) -> int:
    """'5GB' (10^9), '500MB', '2GiB' (2^30), or a plain byte count."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)")
    unit = m.group(2).rstrip("B") or ""
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def _to_numpy(tensor) -> np.ndarray:
    import ml_dtypes
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class WeightFiles:
    """Name -> file map of an HF weights directory, with per-tensor shape, dtype and reads."""

    def __init__(self, directory: str, allow_pickle: bool = False):
        self.directory = directory
        self.pickled = False
        self.file_of: dict[str, str] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        self._bin_cache: dict[str, dict] = {}
        files = self._safetensors_files()
        if files is None:
            files = self._bin_files(allow_pickle)
        if not self.file_of:
            raise CheckpointError(f"{directory}: the weight files hold no tensors")

    def _safetensors_files(self) -> Optional[list[str]]:
        from safetensors import safe_open

        index = os.path.join(self.directory, INDEX)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a readable index ({str(exc)[:200]})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.directory, "*.safetensors")))
            if not files:
                return None
            weight_map = None
        for name in files:
            path = os.path.join(self.directory, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"{index}: lists {name}, which is missing")
            try:
                with safe_open(path, framework="numpy") as f:
                    for key in f.keys():
                        piece = f.get_slice(key)
                        self._meta[key] = (tuple(piece.get_shape()), piece.get_dtype())
                        if weight_map is None or weight_map.get(key) == name:
                            self.file_of[key] = path
            except Exception as exc:  # safetensors raises its own types for a bad header
                raise CheckpointError(f"{path}: not a readable safetensors file ({str(exc)[:200]})") from None
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.file_of))
            if missing:
                raise CheckpointError(f"{index}: tensor '{missing[0]}' is listed but not in {weight_map[missing[0]]}")
        return files

    def _bin_files(self, allow_pickle: bool) -> list[str]:
        files = sorted(glob.glob(os.path.join(self.directory, "pytorch_model*.bin")))
        if not files:
            raise CheckpointError(f"{self.directory}: no *.safetensors (or pytorch_model*.bin) weight files")
        if not allow_pickle:
            raise CheckpointError(f"{self.directory}: only pytorch_model*.bin weights; {PICKLE_REFUSAL}")
        self.pickled = True
        for path in files:
            for key, tensor in self._load_bin(path).items():
                self.file_of[key] = path
                self._meta[key] = (tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""))
        return files

    def _load_bin(self, path: str) -> dict:
        import torch

        if path not in self._bin_cache:
            # mmap: tensors stay on disk until read. weights_only narrows what the unpickler may
            # build, but it is still unpickling (hence the explicit flag).
            self._bin_cache = {path: torch.load(path, map_location="cpu", mmap=True, weights_only=True)}
        return self._bin_cache[path]

    def names(self) -> set[str]:
        return set(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def get(self, name: str, index: Optional[tuple[slice, ...]] = None) -> np.ndarray:
        """The tensor (or `tensor[index]`) as a numpy array in its stored dtype."""
        path = self.file_of[name]
        if self.pickled:
            tensor = self._load_bin(path)[name]
            return _to_numpy(tensor[index] if index is not None else tensor)
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            if index is None:
                return f.get_tensor(name)
            return np.asarray(f.get_slice(name)[index])


SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


class ShardedWriter:
    """Writes planned tensors, in plan order, straight into model-0000k-of-0000n.safetensors files:
    the plan (name, shape, dtype per tensor) fixes every shard's header before its first tensor
    arrives, so each tensor goes to disk as it is added and no shard is held in memory
    (safetensors' own save_file needs the whole shard, and copies it). `close` writes the index."""

    def __init__(self, directory: str, max_shard_bytes: int, plan: list[tuple[str, tuple[int, ...], np.dtype]]):
        self.directory = directory
        self.shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = []
        size = 0
        for name, shape, dtype in plan:  # a new shard when the next tensor would overflow this one
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if not self.shards or (self.shards[-1] and size + nbytes > max_shard_bytes):
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, tuple(shape), np.dtype(dtype)))
            size += nbytes
        self.total_bytes = sum(int(np.prod(s)) * d.itemsize for shard in self.shards for _, s, d in shard)
        self._shard, self._pos, self._file = 0, 0, None
        self.peak_block_bytes = 0  # the largest block written (what the writer held at once)
        os.makedirs(directory, exist_ok=True)

    def _tmp(self, k: int) -> str:
        return os.path.join(self.directory, f".shard-{k}.tmp")

    def add(self, name: str, array: np.ndarray) -> None:
        """The next planned tensor, whole."""
        want, shape, _ = self.shards[self._shard][self._pos]
        if (name, tuple(array.shape)) != (want, shape):
            raise ValueError(f"ShardedWriter: got {name} {tuple(array.shape)}, planned {want} {shape}")
        self.add_blocks(name, [array])

    def add_blocks(self, name: str, blocks) -> None:
        """The next planned tensor as consecutive row blocks (axis 0), each written as it arrives,
        so only one block is held: the header already fixed the tensor's byte range."""
        want, shape, dtype = self.shards[self._shard][self._pos]
        if name != want:
            raise ValueError(f"ShardedWriter: got {name}, planned {want} {shape}")
        if self._pos == 0:
            self._file = open(self._tmp(self._shard), "wb")
            self._file.write(_header(self.shards[self._shard]))
        rows = 0
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=dtype)
            if block.shape[1:] != shape[1:] or rows + (block.shape[0] if shape else 1) > (shape[0] if shape else 1):
                raise ValueError(f"ShardedWriter: {name} block {block.shape} at row {rows} does not fit {shape}")
            self.peak_block_bytes = max(self.peak_block_bytes, block.nbytes)
            # Raw bytes (the host's little-endian order is safetensors'); a uint8 view, as bf16 has
            # no buffer-protocol format.
            self._file.write(block.reshape(-1).view(np.uint8).data)
            rows += block.shape[0] if shape else 1
            del block
        if rows != (shape[0] if shape else 1):
            raise ValueError(f"ShardedWriter: {name} got {rows} rows, planned {shape}")
        self._pos += 1
        if self._pos == len(self.shards[self._shard]):
            self._file.close()
            self._shard, self._pos, self._file = self._shard + 1, 0, None

    def close(self) -> list[str]:
        if self._shard != len(self.shards):
            raise ValueError(f"ShardedWriter: closed before {self.shards[self._shard][self._pos][0]} was added")
        n = len(self.shards)
        weight_map, files = {}, []
        for k, shard in enumerate(self.shards, start=1):
            name = f"model-{k:05d}-of-{n:05d}.safetensors"
            os.replace(self._tmp(k - 1), os.path.join(self.directory, name))
            files.append(name)
            weight_map.update({t: name for t, _, _ in shard})
        with open(os.path.join(self.directory, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, f, indent=2)
        return files


def _header(entries) -> bytes:
    """The safetensors header: u64 little-endian length, then JSON (name -> dtype, shape, data
    offsets in order), space-padded to 8 bytes so the data that follows stays aligned."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        end = offset + int(np.prod(shape)) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype.name], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
