"""The Flax NNX decoder shared by Llama, Qwen2/2.5 and Qwen3.

Layer parameters are stacked along a leading `layers` axis, so one layout serves both `lax.scan` over layers
(fast compile at depth) and an unrolled loop, and HF import/export has a single mapping. Each parameter carries
logical axis names (`axes` metadata) that the rules in `parallel/sharding.py` map to mesh axes.
"""
from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from raredx_jax.models.attention import attend, attend_cache
from raredx_jax.models.config import ModelConfig
from raredx_jax.parallel.sharding import constrain, logical_to_spec

_INIT_STD = 0.02


CACHE_AXES = ("batch", "kv_heads", "cache_len", "head_dim")  # one layer's keys or values
VALID_AXES = ("batch", "cache_len")


@flax.struct.dataclass
class KVCache:
    """Preallocated keys/values, one [B, K, S, D] array per layer. Row b's new tokens go to slots
    [index[b], index[b] + T). Optionally a shared read-only prefix: G prompts' keys/values ([G, K, P, D] per
    layer, `prefix_valid` [G, P]) that every row of group g = b // (B / G) attends to before its own slots.

    Why this layout: a decode step is bound by reading the cache, so (1) keys/values are stored as the attention
    dot reads them (kv heads before slots: no transposing copy); (2) one buffer per layer (written in place and
    read where it lies; a stacked [L, ...] array would be sliced, i.e. copied, per layer and step); (3) the n
    samples of one prompt share its prompt's keys/values instead of each reading a copy (n times fewer bytes for
    the prompt part of every step); (4) `index` is per row, so continuous batching can refill some rows while
    the others decode on.
    """

    k: tuple[jax.Array, ...]  # L x [B, K, S, D]
    v: tuple[jax.Array, ...]  # L x [B, K, S, D]
    valid: jax.Array  # [B, S] bool: slot holds a real (non-pad) token
    index: jax.Array  # [B] int32: next slot to write, per row
    prefix_k: tuple[jax.Array, ...] | None = None  # L x [G, K, P, D], G divides B
    prefix_v: tuple[jax.Array, ...] | None = None
    prefix_valid: jax.Array | None = None  # [G, P] bool

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> "KVCache":
        dtype = jnp.dtype(dtype or cfg.dtype)
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((batch,), jnp.int32))

    @classmethod
    def shardings(cls, cfg: ModelConfig, batch: int, max_len: int, mesh: jax.sharding.Mesh) -> "KVCache":
        """NamedShardings of a cache of this shape on `mesh` (rows over data*fsdp, kv heads over tensor)."""

        def named(axes: tuple, shape: tuple) -> jax.sharding.NamedSharding:
            return jax.sharding.NamedSharding(mesh, logical_to_spec(axes, shape, mesh))

        kv = named(CACHE_AXES, (batch, cfg.num_kv_heads, max_len, cfg.head_dim))
        return cls(k=(kv,) * cfg.num_layers, v=(kv,) * cfg.num_layers,
                   valid=named(VALID_AXES, (batch, max_len)), index=named(("batch",), (batch,)))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def write_rows(buf: jax.Array, update: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    """buf with `update` written at per-row offsets `index` [B] along `axis` (rows = axis 0), in place.

    A scalar-offset dynamic_update_slice when every row shares one offset would be cheaper, but rows of a
    continuously batched decode sit at different offsets; vmapped dynamic_update_slice lowers to one scatter."""
    def one(b: jax.Array, u: jax.Array, i: jax.Array) -> jax.Array:
        start = [0] * b.ndim
        start[axis - 1] = i
        return jax.lax.dynamic_update_slice(b, u, tuple(start))
    return jax.vmap(one)(buf, update.astype(buf.dtype), index)


def embed_lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """Rows of the [V, E] table for tokens [B, T], sharded as activations (batch over data*fsdp).

    The table's embed axis is fsdp-sharded like every weight; gathering from it directly asks SPMD to turn an
    embed-sharded result into a batch-sharded one, which it can only do by replicating the whole table
    ("involuntary full rematerialization"). Gathering the fsdp shards of the table first (what FSDP does for
    every weight before use) makes the lookup a local gather on each vocab shard."""
    table = constrain(table, ("vocab", None))
    return jnp.take(table, tokens, axis=0)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies [D/2], with Llama-3 long-context scaling when configured (as transformers does)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    sc = cfg.rope_scaling_dict
    if sc and sc.get("rope_type") == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        low_wl, high_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate-half RoPE on [B, T, N, D] (the HF convention: first and second halves pair up)."""
    ang = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    cos = jnp.cos(ang)[:, :, None, :]
    sin = jnp.sin(ang)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return xf.astype(x.dtype) * weight.astype(x.dtype)


def _param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str, ...], dtype: Any,
           init: str = "normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (_INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=axes)


class DecoderLayers(nnx.Module):
    """All decoder layers' parameters, stacked on a leading layers axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, E, H, K, D, M = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                            cfg.intermediate_size)
        dt = jnp.dtype(cfg.param_dtype)
        self.input_norm = _param(rngs, (L, E), ("layers", "norm"), dt, "ones")
        self.q_proj = _param(rngs, (L, E, H, D), ("layers", "embed", "heads", "head_dim"), dt)
        self.k_proj = _param(rngs, (L, E, K, D), ("layers", "embed", "kv_heads", "head_dim"), dt)
        self.v_proj = _param(rngs, (L, E, K, D), ("layers", "embed", "kv_heads", "head_dim"), dt)
        self.o_proj = _param(rngs, (L, H, D, E), ("layers", "heads", "head_dim", "embed"), dt)
        if cfg.attention_bias:
            self.q_bias = _param(rngs, (L, H, D), ("layers", "heads", "head_dim"), dt, "zeros")
            self.k_bias = _param(rngs, (L, K, D), ("layers", "kv_heads", "head_dim"), dt, "zeros")
            self.v_bias = _param(rngs, (L, K, D), ("layers", "kv_heads", "head_dim"), dt, "zeros")
        if cfg.qk_norm:
            self.q_norm = _param(rngs, (L, D), ("layers", "head_dim"), dt, "ones")
            self.k_norm = _param(rngs, (L, D), ("layers", "head_dim"), dt, "ones")
        self.post_norm = _param(rngs, (L, E), ("layers", "norm"), dt, "ones")
        self.gate_proj = _param(rngs, (L, E, M), ("layers", "embed", "mlp"), dt)
        self.up_proj = _param(rngs, (L, E, M), ("layers", "embed", "mlp"), dt)
        self.down_proj = _param(rngs, (L, M, E), ("layers", "mlp", "embed"), dt)

    def stacked(self) -> dict[str, jax.Array]:
        return {name: var[...] for name, var in vars(self).items() if isinstance(var, nnx.Param)}

    def per_layer(self) -> tuple[dict[str, jax.Array], ...]:
        """Each layer's weights as its own arrays. A decode loop takes these once, before it starts: slicing the
        stacked arrays inside the loop copies every weight on every step (XLA does not hoist those slices)."""
        stacked = self.stacked()
        return tuple({n: a[i] for n, a in stacked.items()} for i in range(next(iter(stacked.values())).shape[0]))


def _weight(v: Any, dt: Any) -> jax.Array:
    """A layer's weight in the compute dtype. QLoRA's quantised base projections (qwix QArrays, raredx_jax/lora.py)
    are dequantised here, one layer at a time; integer arrays (the LoRA dropout key) pass unchanged."""
    if hasattr(v, "qvalue"):
        import qwix  # noqa: PLC0415 - heavy: qwix (~1.9 s) only for a quantised (QLoRA) base
        return qwix.dequantize(v).astype(dt)
    return v if jnp.issubdtype(v.dtype, jnp.integer) else v.astype(dt)


def _proj(eq: str, x: jax.Array, p: dict[str, jax.Array], name: str) -> jax.Array:
    """einsum(x, p[name]), plus the LoRA path when the layer carries an adapter for `name` (raredx_jax/lora.py)."""
    y = jnp.einsum(eq, x, p[name])
    if name + "_lora_a" in p:
        from raredx_jax.lora import lora_delta  # noqa: PLC0415 - cycle: raredx_jax.lora imports this module
        y = y + lora_delta(eq, x, p, name).astype(y.dtype)
    return y


def _block(cfg: ModelConfig, x: jax.Array, p: dict[str, jax.Array], positions: jax.Array, mask: jax.Array,
           segment_ids: jax.Array | None, inv_freq: jax.Array, kv: tuple[jax.Array, ...] | None,
           index: jax.Array | None, prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None
           ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One decoder layer on activations x [B, T, E]; with a cache (this layer's [B, K, S, D] keys and values),
    writes this step's keys/values into it at each row's `index` and attends over it (after the shared
    `prefix` = (keys, values, valid) when given)."""
    dt = x.dtype
    p = {k: _weight(v, dt) for k, v in p.items()}
    h = rms_norm(x, p["input_norm"], cfg.rms_norm_eps)
    q = _proj("bte,ehd->bthd", h, p, "q_proj")
    k = _proj("bte,ekd->btkd", h, p, "k_proj")
    v = _proj("bte,ekd->btkd", h, p, "v_proj")
    if cfg.attention_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    q = constrain(q, ("batch", "length", "act_heads", None))
    new_kv = None
    if kv is None:
        attn = attend(cfg.attention, q, k, v, mask, segment_ids)
    else:
        k_cache = write_rows(kv[0], jnp.swapaxes(k, 1, 2), index, axis=2)
        v_cache = write_rows(kv[1], jnp.swapaxes(v, 1, 2), index, axis=2)
        new_kv = (constrain(k_cache, CACHE_AXES), constrain(v_cache, CACHE_AXES))
        if prefix is not None:
            prefix = (prefix[0].astype(dt), prefix[1].astype(dt), prefix[2])
        attn = attend_cache(cfg.attention, q, k_cache.astype(dt), v_cache.astype(dt), mask, prefix)
    x = x + _proj("bthd,hde->bte", attn, p, "o_proj")
    x = constrain(x, ("batch", "length", "act_embed"))
    h = rms_norm(x, p["post_norm"], cfg.rms_norm_eps)
    gate = _proj("bte,em->btm", h, p, "gate_proj")
    up = _proj("bte,em->btm", h, p, "up_proj")
    x = x + _proj("btm,me->bte", jax.nn.silu(gate) * up, p, "down_proj")
    return constrain(x, ("batch", "length", "act_embed")), new_kv


_REMAT = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}


class Transformer(nnx.Module):
    """Decoder-only LM: embed -> L x (attention + SwiGLU MLP) -> norm -> logits (fp32)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        dt = jnp.dtype(cfg.param_dtype)
        self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dt)
        self.layers = DecoderLayers(cfg, rngs)
        self.final_norm = _param(rngs, (cfg.hidden_size,), ("norm",), dt, "ones")
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dt)

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
                 cache: KVCache | None = None, last_only: bool = False,
                 layer_params: tuple[dict[str, jax.Array], ...] | None = None) -> tuple[jax.Array, KVCache | None]:
        """Logits [B, T, V] in fp32 (or [B, 1, V] for the last position only: a prefill needs no more).

        layer_params: `self.layers.per_layer()` taken once outside a decode loop (cache calls only)."""
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        x = embed_lookup(self.embed_tokens[...], tokens).astype(dt)
        x = constrain(x, ("batch", "length", "act_embed"))
        inv_freq = rope_frequencies(cfg)
        if cache is not None:
            # Decode / prefill into a cache: layers unrolled, so each reads and writes its own cache buffer in
            # place and its weight slices are static (hoisted out of a decode loop, not copied per step).
            index = cache.index
            valid = write_rows(cache.valid, segment_ids != 0, index, axis=1)
            q_slots = index[:, None] + jnp.arange(t)[None, :]  # [B, T]
            mask = valid[:, None, :] & (jnp.arange(cache.max_len)[None, None, :] <= q_slots[:, :, None])
            ks, vs = [], []
            per_layer = layer_params if layer_params is not None else self.layers.per_layer()
            for i, p_i in enumerate(per_layer):
                prefix = None if cache.prefix_k is None else (cache.prefix_k[i], cache.prefix_v[i], cache.prefix_valid)
                x, (k_i, v_i) = _block(cfg, x, p_i, positions, mask, None, inv_freq, (cache.k[i], cache.v[i]), index,
                                       prefix)
                ks.append(k_i)
                vs.append(v_i)
            new_cache = cache.replace(k=tuple(ks), v=tuple(vs), valid=valid, index=index + t)
        else:
            params = self.layers.stacked()
            idx = jnp.arange(t)
            mask = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)
                    & (idx[None, :, None] >= idx[None, None, :]))
            new_cache = None

            def body(x, layer):
                p, _ = layer
                return _block(cfg, x, p, positions, mask, segment_ids, inv_freq, None, None)[0], None

            if cfg.remat != "none":
                body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
            if cfg.scan_layers:
                x, _ = jax.lax.scan(body, x, (params, jnp.arange(cfg.num_layers)))
            else:
                for i in range(cfg.num_layers):
                    x, _ = body(x, (jax.tree.map(lambda a: a[i], params), i))
        if last_only:
            x = x[:, -1:]
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        head = self.embed_tokens[...].T if cfg.tie_word_embeddings else self.lm_head[...]
        logits = jnp.einsum("bte,ev->btv", x, head.astype(dt), preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "length", "vocab"))
        return logits, new_cache


def positions_from_mask(segment_ids: jax.Array) -> jax.Array:
    """Per-row positions for a left/right-padded batch: count of real tokens before each token."""
    real = (segment_ids != 0).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0)
