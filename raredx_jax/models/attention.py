"""Attention behind one interface: an XLA reference, jax.nn.dot_product_attention (cuDNN on GPU), TPU splash.

q: [B, T, H, D]; k, v: [B, S, K, D] with K dividing H (GQA); mask: [B, T, S] bool (True = may attend).
The kernel choice is the only place the code differs by platform.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)
_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        logging.warning(msg)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference: grouped einsum with fp32 softmax. Fully masked rows (padding) give finite garbage."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """jax.nn.dot_product_attention: cuDNN flash attention on GPU for bf16/fp16, XLA elsewhere."""
    impl = None
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        impl = "cudnn"
    try:
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=impl)
    except Exception as e:  # cuDNN rejects some shapes (head_dim, masks); say so once and fall back.
        if impl is None:
            raise
        _warn_once(f"attention=dot_product: cuDNN path unavailable ({e}); falling back to XLA")
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="xla")


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     segment_ids: jax.Array | None) -> jax.Array:
    """Pallas splash attention on TPU (causal + segment ids); XLA reference elsewhere, with a message."""
    if jax.default_backend() != "tpu" or segment_ids is None or q.shape[1] != k.shape[1]:
        _warn_once("attention=splash needs a TPU and a training-shaped call (no KV cache); "
                   "using the XLA reference attention instead")
        return xla_attention(q, k, v, mask)
    # TPU only: the Pallas TPU kernels load when splash attention runs on a TPU.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk  # noqa: PLC0415 - TPU
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm  # noqa: PLC0415 - TPU

    b, t, h, d = q.shape
    kv = k.shape[2]
    causal = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(h)])
    kernel = sk.make_splash_mqa_single_device(causal) if kv == 1 else sk.make_splash_mha_single_device(causal)
    seg = sk.SegmentIds(q=segment_ids, kv=segment_ids)
    qt = jnp.swapaxes(q, 1, 2) * (d ** -0.5)  # [B, H, T, D]
    kt = jnp.repeat(jnp.swapaxes(k, 1, 2), h // kv, axis=1)
    vt = jnp.repeat(jnp.swapaxes(v, 1, 2), h // kv, axis=1)
    out = jax.vmap(kernel)(qt, kt, vt, segment_ids=seg)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def xla_attention_cached(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                         prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None) -> jax.Array:
    """The reference math on a cache laid out [B, K, S, D]: the dots read keys and values as stored.

    prefix: optional (keys [G, K, P, D], values [G, K, P, D], valid [G, P]) shared by the B / G consecutive rows
    of each group and visible to every query (a prompt before its samples' tokens). Its scores are joined with
    the rows' own before one softmax, so the result is the attention over [prefix slots, own slots]."""
    b, t, h, d = q.shape
    kv = k.shape[1]
    g = h // kv
    qg = q.reshape(b, t, kv, g, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
    if prefix is not None:
        pk, pv, pvalid = prefix
        groups = pk.shape[0]
        qp = qg.reshape(groups, b // groups, t, kv, g, d)
        ps = jnp.einsum("bntkgd,bkpd->bnkgtp", qp, pk, preferred_element_type=jnp.float32) * (d ** -0.5)
        ps = jnp.where(pvalid[:, None, None, None, None, :], ps, _NEG).reshape(b, kv, g, t, -1)
        probs = jax.nn.softmax(jnp.concatenate([ps, scores], axis=-1), axis=-1).astype(v.dtype)
        p_pre, probs = probs[..., :pk.shape[2]], probs[..., pk.shape[2]:]
        out_pre = jnp.einsum("bnkgtp,bkpd->bntkgd", p_pre.reshape(groups, b // groups, kv, g, t, -1), pv,
                             preferred_element_type=jnp.float32).reshape(b, t, kv, g, d)
    else:
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out_pre = 0.0
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v, preferred_element_type=jnp.float32) + out_pre
    return out.reshape(b, t, h, d).astype(q.dtype)


def attend_cache(impl: str, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                 prefix: tuple[jax.Array, jax.Array, jax.Array] | None = None) -> jax.Array:
    """Attention over a KV cache (k, v: [B, K, S, D]; mask [B, T, S]; optional shared prefix, see above).

    One-token decode steps and shared-prefix calls use the einsum form: it reads the cache in place, and a
    fused kernel gains nothing at T = 1. A prefill (T > 1, no prefix) with a kernel implementation hands it the
    [B, S, K, D] view it expects (one transpose per prefill, not per step)."""
    if impl == "xla" or q.shape[1] == 1 or prefix is not None:
        return xla_attention_cached(q, k, v, mask, prefix)
    return attend(impl, q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask, None)


def attend(impl: str, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
           segment_ids: jax.Array | None = None) -> jax.Array:
    if impl == "xla":
        return xla_attention(q, k, v, mask)
    if impl == "dot_product":
        return dot_product_attention(q, k, v, mask)
    if impl == "splash":
        return splash_attention(q, k, v, mask, segment_ids)
    raise ValueError(f"model.attention: unknown implementation {impl!r}")
