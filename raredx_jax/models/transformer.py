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

from raredx_jax.models.attention import attend
from raredx_jax.models.config import ModelConfig
from raredx_jax.parallel.sharding import constrain

_INIT_STD = 0.02


@flax.struct.dataclass
class KVCache:
    """Preallocated per-layer keys/values. New tokens go to slots [index, index+T)."""

    k: jax.Array  # [L, B, S, K, D]
    v: jax.Array  # [L, B, S, K, D]
    valid: jax.Array  # [B, S] bool: slot holds a real (non-pad) token
    index: jax.Array  # [] int32: next slot to write

    @classmethod
    def init(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> "KVCache":
        dtype = jnp.dtype(dtype or cfg.dtype)
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


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


def _weight(v: Any, dt: Any) -> jax.Array:
    """A layer's weight in the compute dtype. QLoRA's quantised base projections (qwix QArrays, raredx_jax/lora.py)
    are dequantised here, one layer at a time; integer arrays (the LoRA dropout key) pass unchanged."""
    if hasattr(v, "qvalue"):
        import qwix
        return qwix.dequantize(v).astype(dt)
    return v if jnp.issubdtype(v.dtype, jnp.integer) else v.astype(dt)


def _proj(eq: str, x: jax.Array, p: dict[str, jax.Array], name: str) -> jax.Array:
    """einsum(x, p[name]), plus the LoRA path when the layer carries an adapter for `name` (raredx_jax/lora.py)."""
    y = jnp.einsum(eq, x, p[name])
    if name + "_lora_a" in p:
        from raredx_jax.lora import lora_delta
        y = y + lora_delta(eq, x, p, name).astype(y.dtype)
    return y


def _block(cfg: ModelConfig, x: jax.Array, p: dict[str, jax.Array], positions: jax.Array, mask: jax.Array,
           segment_ids: jax.Array | None, inv_freq: jax.Array, kv: tuple[jax.Array, jax.Array, Any] | None,
           index: jax.Array | None) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One decoder layer on activations x [B, T, E]; with a cache, writes this step's k/v into it."""
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
    if kv is not None:
        # kv = (k_all, v_all, layer): the stacked cache travels as loop state and only this step's T slots
        # of this layer are written, in place (no per-layer cache copies in and out of the layer loop).
        k_all, v_all, layer = kv
        start = (layer, 0, index, 0, 0)
        k_all = jax.lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], start)
        v_all = jax.lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], start)
        new_kv = (k_all, v_all)
        k = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False).astype(dt)
        v = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False).astype(dt)
    attn = attend(cfg.attention, q, k, v, mask, segment_ids)
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
                 cache: KVCache | None = None, last_only: bool = False) -> tuple[jax.Array, KVCache | None]:
        """Logits [B, T, V] in fp32 (or [B, 1, V] for the last position only: a prefill needs no more)."""
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        b, t = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        x = jnp.take(self.embed_tokens[...], tokens, axis=0).astype(dt)
        x = constrain(x, ("batch", "length", "act_embed"))
        inv_freq = rope_frequencies(cfg)
        if cache is None:
            idx = jnp.arange(t)
            mask = ((segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] != 0)
                    & (idx[None, :, None] >= idx[None, None, :]))
            index, valid = None, None
        else:
            index = cache.index
            valid = jax.lax.dynamic_update_slice(cache.valid, segment_ids != 0, (0, index))
            slots = jnp.arange(cache.max_len)
            q_slots = index + jnp.arange(t)
            mask = valid[:, None, :] & (slots[None, None, :] <= q_slots[None, :, None])
        params = self.layers.stacked()
        seg_for_kernel = segment_ids if cache is None else None

        def body(carry, layer):
            x, kvs = carry
            p, i = layer
            x, kvs = _block(cfg, x, p, positions, mask, seg_for_kernel, inv_freq,
                            None if kvs is None else (*kvs, i), index)
            return (x, kvs), None

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
        kvs = None if cache is None else (cache.k, cache.v)
        if cfg.scan_layers:
            (x, kvs), _ = jax.lax.scan(body, (x, kvs), (params, jnp.arange(cfg.num_layers)))
        else:
            for i in range(cfg.num_layers):
                (x, kvs), _ = body((x, kvs), (jax.tree.map(lambda a: a[i], params), i))
        if last_only:
            x = x[:, -1:]
        x = rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)
        head = self.embed_tokens[...].T if cfg.tie_word_embeddings else self.lm_head[...]
        logits = jnp.einsum("bte,ev->btv", x, head.astype(dt), preferred_element_type=jnp.float32)
        logits = constrain(logits, ("batch", "length", "vocab"))
        new_cache = None
        if cache is not None:
            new_cache = KVCache(k=kvs[0], v=kvs[1], valid=valid, index=index + t)
        return logits, new_cache


def positions_from_mask(segment_ids: jax.Array) -> jax.Array:
    """Per-row positions for a left/right-padded batch: count of real tokens before each token."""
    real = (segment_ids != 0).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0)
