"""The decoder in Flax NNX, with its layers stacked and run by `nnx.scan`: LLaMA, and the families
of `model/families.py` through ModelConfig features (biases, q/k norm, sliding windows, Gemma's
norms and embedding scale).

Parameter layout mirrors Hugging Face's `LlamaForCausalLM` (rotate-half RoPE, q/k/v/o, gate/up/down)
so conversion is a transpose and reshape; projections keep heads as their own axis so tensor
parallelism shards heads, not an opaque fused dimension. Layers that differ (Gemma 3's sliding and
global layers, with their own RoPE bases) stay one stack: each layer's window and RoPE table are
arrays scanned alongside it (`layers.layer_plan`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from imitation_jax.model.attention import attention, cached_attention, within_window
from imitation_jax.model.config import ModelConfig, with_platform
from imitation_jax.model.kv_cache import KVCache, LayerCache
from imitation_jax.model.layers import (MLP, Adapted, Layer, RMSNorm, apply_rope, bias, kernel, layer_plan, param,
                                        pick_rope, projection, rope_inv_freq, rope_tables)
from imitation_jax.sharding import constrain

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Attention(Adapted, nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        projection(self, rngs, cfg, "q", (d, h, hd), ("embed", "heads", "head_dim"))
        projection(self, rngs, cfg, "k", (d, kv, hd), ("embed", "kv_heads", "head_dim"))
        projection(self, rngs, cfg, "v", (d, kv, hd), ("embed", "kv_heads", "head_dim"))
        projection(self, rngs, cfg, "o", (h, hd, d), ("heads", "head_dim", "embed"))
        if cfg.qkv_bias:
            bias(self, "q", (h, hd), ("heads", "head_dim"), cfg)
            bias(self, "k", (kv, hd), ("kv_heads", "head_dim"), cfg)
            bias(self, "v", (kv, hd), ("kv_heads", "head_dim"), cfg)
        if cfg.o_bias:
            bias(self, "o", (d,), ("norm",), cfg)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg, rngs, hd, ("head_dim",))
            self.k_norm = RMSNorm(cfg, rngs, hd, ("head_dim",))
        self.has_qkv_bias, self.has_o_bias, self.has_qk_norm = cfg.qkv_bias, cfg.o_bias, cfg.qk_norm
        # The kernels scale scores by head_dim ** -0.5: queries carry the rest of another scale.
        scalar = cfg.query_pre_attn_scalar
        self.query_scale = 1.0 if scalar is None or scalar == hd else float((hd / scalar) ** 0.5)
        self.dtype = cfg.compute_dtype
        self.impl = cfg.attention
        self.platform = cfg.platform
        self.add_adapters(rngs, cfg, {"q": ((d,), (h, hd), ("embed",), ("heads", "head_dim")),
                                      "k": ((d,), (kv, hd), ("embed",), ("kv_heads", "head_dim")),
                                      "v": ((d,), (kv, hd), ("embed",), ("kv_heads", "head_dim")),
                                      "o": ((h, hd), (d,), ("heads", "head_dim"), ("embed",))})

    def __call__(self, x, cos, sin, segment_ids, cache: LayerCache | None = None, window=None):
        """Returns (output, cache). With a cache, this call's keys and values are written into it;
        the queries then attend over the whole cache under its mask, or, for a prefill (a cache
        without a mask), over the new tokens only, as in training. `window`: a sliding layer's."""
        out, cache = self.core(x, cos, sin, segment_ids, cache, window)
        return self.project_out(out), cache

    def core(self, x, cos, sin, segment_ids, cache: LayerCache | None = None, window=None):
        """Attention before the output projection: ((..., heads * head_dim), cache)."""
        dt = self.dtype

        def project(name):  # one (tokens, d) x (d, heads * head_dim) matmul: the backward pass of a
            w = kernel(self, name, dt)  # 3-D einsum costs transposing copies on CPU
            d, heads, hd = w.shape
            y = (x.reshape(-1, d) @ w.reshape(d, heads * hd)).reshape(*x.shape[:-1], heads, hd)
            if self.has_qkv_bias:
                y = y + getattr(self, name + "_bias")[...].astype(dt)
            y = self.adapted(name, x, y)
            return getattr(self, name + "_norm")(y) if self.has_qk_norm and name != "v" else y

        q, k, v = project("q"), project("k"), project("v")
        q = apply_rope(q, cos, sin)
        if self.query_scale != 1.0:
            q = q * jnp.asarray(self.query_scale, q.dtype)
        q = constrain(q, ("batch", "seq", "act_heads", None))
        k = constrain(apply_rope(k, cos, sin), ("batch", "seq", "act_kv_heads", None))
        v = constrain(v, ("batch", "seq", "act_kv_heads", None))
        if cache is not None:
            cache = cache.write(k, v)
        if cache is None or cache.mask is None:
            out = attention(q, k, v, segment_ids, self.impl, self.platform, window)
        else:
            mask = cache.mask
            if window is not None:  # slots are contiguous per row: slot distance = token distance
                mask = mask & within_window(cache.index + jnp.arange(q.shape[1]), cache.k.shape[1], window)
            out = cached_attention(q, cache.k, cache.v, mask)
        return out.reshape(*out.shape[:-2], -1), cache

    def project_out(self, out):
        """(..., heads * head_dim) -> (..., hidden), as one 2-D matmul."""
        wo = kernel(self, "o", self.dtype)
        flat = out.reshape(-1, wo.shape[0] * wo.shape[1]) @ wo.reshape(-1, wo.shape[2])
        y = flat.reshape(*out.shape[:-1], wo.shape[2])
        if self.has_o_bias:
            y = y + self.o_bias[...].astype(y.dtype)
        if not self.lora.targets_("o"):
            return y
        heads = out.reshape(*out.shape[:-1], wo.shape[0], wo.shape[1])  # the adapter's input is (heads, head_dim)
        return self.adapted("o", heads, y)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)
        self.post_norms = cfg.post_norms
        if cfg.post_norms:  # Gemma: each sublayer's output normed before its residual add
            self.post_attn_norm = RMSNorm(cfg, rngs)
            self.post_mlp_norm = RMSNorm(cfg, rngs)

    def __call__(self, x, ropes, segment_ids, cache: LayerCache | None = None, layer: Layer | None = None):
        a, cache = self.attend(x, ropes, segment_ids, cache, layer)
        return constrain(self.finish(x, a), ("batch", "seq", "act_embed")), cache

    def attend(self, x, ropes, segment_ids, cache: LayerCache | None = None, layer: Layer | None = None):
        """The part that mixes positions: attention up to (not including) its output projection."""
        cos, sin = pick_rope(ropes, layer)
        window = None if layer is None else layer.window
        return self.attn.core(self.attn_norm(x), cos, sin, segment_ids, cache, window)

    def finish(self, x, a):
        """The position-wise rest: output projection, residual, MLP, residual."""
        a = self.attn.project_out(a)
        x = x + (self.post_attn_norm(a) if self.post_norms else a)
        m = self.mlp(self.mlp_norm(x))
        return x + (self.post_mlp_norm(m) if self.post_norms else m)


class Tail(nnx.Module):
    """The last layer's position-wise part and the final norm, applied to (residual stream, attention
    output) of some positions: what `Llama.trunk` leaves for the loss to run on trained positions."""

    def __init__(self, block: Block, norm: RMSNorm):
        self.block, self.norm = block, norm

    def __call__(self, x, a):
        return self.norm(self.block.finish(x, a))


class Llama(nnx.Module):
    """`__call__` returns final hidden states; `logits` applies the output layer. Training computes
    the loss from hidden states in chunks so the full fp32 logits tensor is never materialised."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        """`cfg.platform` is normally decided from the mesh (`model.config.with_platform(cfg, mesh)`);
        a config that leaves it open gets the default backend's here, for good."""
        cfg.validate()
        cfg = with_platform(cfg)
        self.cfg = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                           cfg.weight_dtype, cfg.initializer_range)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(cfg, rngs)  # Gemma style in Gemma: every norm of a model has one style
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                 cfg.weight_dtype, cfg.initializer_range)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens, positions, segment_ids: (batch, seq) int; returns (batch, seq, hidden)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        return self._run(tokens, positions, segment_ids, None)[0]

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: KVCache,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
        """Run new tokens (batch, new) at `positions` against the keys and values in `cache`, which
        are extended by theirs (written at cache.index); returns (hidden, updated cache).

        With `segment_ids` (a prefill into an empty cache; 0 marks padding) the new tokens attend to
        each other only, through the training attention (flash/cuDNN where it is), not the cache."""
        return self._run(tokens, positions, segment_ids, cache)

    def trunk(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array
              ) -> tuple[tuple[jax.Array, jax.Array], Tail]:
        """All but the last layer's position-wise part: returns ((x, a), tail), x the residual stream
        entering the last layer (batch, seq, hidden) and a its attention output before the output
        projection (batch, seq, heads * head_dim); `tail(x, a)` equals `__call__`. Nothing after the
        last attention mixes positions, so training runs the tail inside the chunked loss, on trained
        positions only."""
        return self._run(tokens, positions, segment_ids, None, split_last=True)

    def _run(self, tokens, positions, segment_ids, cache: KVCache | None, split_last: bool = False):
        cfg = self.cfg
        # Gather from a replicated table: a row lookup from a table sharded on both axes makes
        # the partitioner replicate it anyway, with a warning and a worse schedule.
        table = constrain(self.embed[...], (None, None))
        x = jnp.take(table, tokens, axis=0).astype(cfg.compute_dtype)
        if cfg.scale_embeddings:  # sqrt(hidden) rounded to the compute dtype first, as HF Gemma does
            x = x * jnp.asarray(cfg.hidden_size ** 0.5, cfg.compute_dtype)
        x = constrain(x, ("batch", "seq", "act_embed"))
        # Trace-time constants, not state variables (so checkpoints hold parameters only).
        ropes = [rope_tables(positions, rope_inv_freq(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling),
                             cfg.platform)]
        if cfg.rope_local_theta is not None:  # sliding layers' own base, unscaled (Gemma 3)
            ropes.append(rope_tables(positions, rope_inv_freq(cfg.dim_per_head, cfg.rope_local_theta, None),
                                     cfg.platform))
        plan = layer_plan(cfg)

        mask = None if cache is None or segment_ids is not None else cache.mask(tokens.shape[1])

        def run_block(block: Block, x, kv, layer):
            layer_cache = None if kv is None else LayerCache(*kv, cache.index, mask)
            x, layer_cache = block(x, ropes, segment_ids, layer_cache, layer)
            return x, (None if layer_cache is None else (layer_cache.k, layer_cache.v))

        def attend(block: Block, x, layer):
            return block.attend(x, ropes, segment_ids, None, layer)[0]

        if cfg.remat != "none":
            run_block = nnx.remat(run_block, policy=_REMAT[cfg.remat], prevent_cse=False)
            attend = nnx.remat(attend, policy=_REMAT[cfg.remat], prevent_cse=False)

        loop = cfg.scan_unroll >= cfg.num_layers
        layers = self._unstacked_layers() if loop else self.layers
        plans = None if plan is None else Layer(*(jnp.asarray(a) for a in plan))
        last_plan = None
        if split_last:  # run the last layer's attention only; the caller runs the rest (`Tail`)
            layers, last = (layers[:-1], layers[-1]) if loop else (self._stack_slice(slice(None, -1)),
                                                                    self._stack_slice(-1))
            if plans is not None:
                plans, last_plan = Layer(*(a[:-1] for a in plans)), Layer(*(a[-1] for a in plans))
        kv = None if cache is None else (cache.k, cache.v)
        x, kv = (self._loop if loop else self._scan)(run_block, x, layers, kv, plans)
        if split_last:
            return (x, attend(last, x, last_plan)), Tail(last, self.norm)
        if cache is not None:
            cache = cache._replace(k=kv[0], v=kv[1], index=cache.index + tokens.shape[1])
        return self.norm(x), cache

    def _unstacked_layers(self) -> list[Block]:
        """One Block per layer over `unstack`ed slices of the stacked parameters (not `a[i]`, so the
        gradients are stacked once instead of each layer's being padded to the full stack and summed)."""
        graphdef, state = nnx.split(self.layers)
        leaves, treedef = jax.tree.flatten(state)
        per_layer = zip(*(jnp.unstack(leaf, axis=0) for leaf in leaves))
        return [nnx.merge(graphdef, jax.tree.unflatten(treedef, list(layer))) for layer in per_layer]

    def _stack_slice(self, index) -> Block:
        """The stacked layers indexed along the layer axis (a slice: still stacked; an int: one layer)."""
        graphdef, state = nnx.split(self.layers)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[index], state))

    @staticmethod
    def _loop(run_block, x, blocks: list[Block], kv, plans: Layer | None):
        """The layers as straight-line code (`model.scan_unroll >= num_layers`): no while loop, so no
        zero-filled residual stacks and no per-iteration dynamic slices (faster on CPU: docs/benchmarks.md)."""
        caches = None if kv is None else (jnp.unstack(kv[0], axis=0), jnp.unstack(kv[1], axis=0))
        outs = []
        for i, block in enumerate(blocks):
            layer = None if plans is None else Layer(*(a[i] for a in plans))
            x, out = run_block(block, x, None if caches is None else (caches[0][i], caches[1][i]), layer)
            outs.append(out)
        return x, (None if kv is None else (jnp.stack([o[0] for o in outs]), jnp.stack([o[1] for o in outs])))

    def _scan(self, run_block, x, layers: Block, kv, plans: Layer | None):
        cfg = self.cfg

        # The cache's per-layer keys and values, and each layer's window and RoPE table, are
        # scanned alongside the layers.
        @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0),
                  unroll=min(cfg.scan_unroll, cfg.num_layers), transform_metadata={nnx.PARTITION_NAME: "layers"})
        def scan_layers(x, block, kv, layer):
            return run_block(block, x, kv, layer)

        return scan_layers(x, layers, kv, plans)

    def output_kernel(self) -> jax.Array:
        """(hidden, vocab) output projection, the transposed embedding when tied."""
        return self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """fp32 logits for hidden states (..., hidden)."""
        return jnp.einsum("...d,dv->...v", hidden, self.output_kernel().astype(hidden.dtype),
                          preferred_element_type=jnp.float32)
