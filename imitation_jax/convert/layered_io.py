"""Stacked parameters (layers/..., shape (num_layers, ...)) read and written one layer at a time,
inside Orbax params checkpoints, so conversion never holds a whole stacked matrix (2.9 GB for a
LLaMA-7B MLP weight in bf16).

Saves chunk stacked parameters by layer (checkpoint.layer_save_args, Orbax
`SaveArgs(shard_axes=(0,))`: one zarr chunk, or one per device shard, per layer), so reading a
layer through tensorstore reads just its chunks. Checkpoints written before that (one chunk per
parameter) still read correctly: the whole parameter once, then sliced (more memory, as before).

Writing: `save_layered` saves a tree whose leaves are `Lazy` sources through Orbax's PyTree
handler with a NumpyHandler that asks each source for one chunk (a layer, or a 64 MiB block of an
unstacked parameter) at a time; the result is an ordinary Orbax checkpoint (leaves restore as
arrays).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from typing import Any, Callable, Optional

import numpy as np

class LayerReader:
    """`get(path, layer)`: one parameter (or one layer of a stacked one) of an Orbax params item as
    numpy, read with tensorstore. A parameter stored as a single chunk is read whole once and kept
    while export walks its layers."""

    def __init__(self, item_dir: str):
        import orbax.checkpoint as ocp

        self.item_dir = item_dir
        with open(os.path.join(item_dir, "_METADATA")) as f:
            self._zarr3 = bool(json.load(f).get("use_zarr3", False))
        self._ocdbt = os.path.isfile(os.path.join(item_dir, "manifest.ocdbt"))
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._ocdbt)
        self._open: dict[tuple, Any] = {}
        self._whole: tuple[Optional[tuple], Optional[np.ndarray]] = (None, None)

    def _store(self, path: tuple[str, ...]):
        import orbax.checkpoint as ocp
        import tensorstore as ts
        from etils import epath

        if path not in self._open:
            self._open.clear()  # parameter-major walk: one open array at a time
            info = ocp.type_handlers.ParamInfo(name=".".join(path), parent_dir=epath.Path(self.item_dir),
                                               is_ocdbt_checkpoint=self._ocdbt, use_zarr3=self._zarr3,
                                               ts_context=self._context)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=self._ocdbt)
            self._open[path] = ts.open(spec, open=True, read=True, context=self._context).result()
        return self._open[path]

    def get(self, path: tuple[str, ...], layer: Optional[int] = None) -> np.ndarray:
        store = self._store(path)
        if layer is None:
            return store.read().result()
        if store.chunk_layout.read_chunk.shape[0] == 1:
            return store[layer].read().result()
        if self._whole[0] != path:  # an older checkpoint: the parameter is one chunk
            self._whole = (None, None)
            self._whole = (path, store.read().result())
        return self._whole[1][layer]

    def dtype(self, path: tuple[str, ...]) -> np.dtype:
        return np.dtype(self._store(path).dtype.numpy_dtype)

    def get_block(self, path: tuple[str, ...], index: tuple[slice, ...]) -> np.ndarray:
        """`parameter[index]` (a block of an unstacked parameter: export streams the embedding and
        lm_head by rows), reading only the chunks it touches. A parameter stored as one chunk is
        read whole once and kept while its blocks are taken."""
        store = self._store(path)
        if tuple(store.chunk_layout.read_chunk.shape) != tuple(store.shape):
            return store[index].read().result()
        if self._whole[0] != path:
            self._whole = (None, None)
            self._whole = (path, store.read().result())
        return self._whole[1][index]


class Lazy:
    """A parameter to save, produced on demand: `read(index)` gives `value[index]` (a tuple of
    slices, one chunk of the saved array) as numpy. `stacked`: chunked one layer per chunk,
    otherwise in chunks of at most CHUNK_BYTES."""

    def __init__(self, shape: tuple[int, ...], dtype, read: Callable[[tuple[slice, ...]], np.ndarray],
                 stacked: bool = False):
        self.shape, self.dtype, self.read, self.stacked = tuple(shape), np.dtype(dtype), read, stacked
        self.ndim, self.size = len(self.shape), int(np.prod(self.shape))


CHUNK_BYTES = 64 << 20  # an unstacked parameter (the embedding: 1 GB in LLaMA-3's bf16) in pieces


def _chunks(shape: tuple[int, ...], chunk: tuple[int, ...]):
    """The chunk grid's blocks, as index tuples."""
    ranges = [[slice(lo, min(lo + c, n)) for lo in range(0, n, c)] for n, c in zip(shape, chunk)]
    return itertools.product(*ranges)


def _handler():
    """A TypeHandler for `Lazy` leaves built on Orbax's public interface only (TypeHandler,
    get_json_tspec_write, ParamInfo): saved as np.ndarray (so they restore through Orbax's own
    NumpyHandler), data pulled from the source one chunk at a time, one chunk in flight across all
    parameters."""
    import jax
    import orbax.checkpoint as ocp
    import tensorstore as ts

    class LazyHandler(ocp.type_handlers.TypeHandler):
        def __init__(self):
            self._numpy = ocp.type_handlers.NumpyHandler()
            self._lock = None

        def typestr(self) -> str:
            return self._numpy.typestr()

        async def metadata(self, infos):
            return await self._numpy.metadata(infos)

        async def deserialize(self, infos, args=None):
            return await self._numpy.deserialize(infos, args)

        async def serialize(self, values, infos, args=None):
            args = args or [ocp.SaveArgs()] * len(values)
            self._lock = self._lock or asyncio.Lock()
            for value, info, arg in zip(values, infos, args):
                await info.await_path_creation()
                ocdbt = bool(info.is_ocdbt_checkpoint)
                tspec = ocp.type_handlers.get_json_tspec_write(
                    info, use_ocdbt=ocdbt, global_shape=value.shape, local_shape=value.shape, dtype=value.dtype,
                    process_index=jax.process_index() if ocdbt else None, arg=arg)
                if jax.process_index() == 0:
                    await self._write(value, tspec, info.ts_context)
            return []  # written before returning: nothing left to commit in the background

        async def _write(self, value, tspec, ts_context):
            store = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
            for index in _chunks(value.shape, store.chunk_layout.write_chunk.shape):
                async with self._lock:  # whole chunks: no read-modify-write of stored data
                    data = np.ascontiguousarray(value.read(index), dtype=value.dtype)
                    await store[index].write(data)
                    del data

    return LazyHandler()


def save_layered(item_dir: str, tree: dict) -> None:
    """An Orbax params item from a tree of `Lazy` leaves."""
    import orbax.checkpoint as ocp

    registry = ocp.type_handlers.create_type_handler_registry((Lazy, _handler()))
    save_args: dict = {}
    for path, leaf in _leaves(tree):
        node = save_args
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = (ocp.SaveArgs(shard_axes=(0,)) if leaf.stacked else
                          ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(item_dir, args=ocp.args.PyTreeSave(tree, save_args=save_args), force=True)


def _leaves(tree: dict, prefix: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value
