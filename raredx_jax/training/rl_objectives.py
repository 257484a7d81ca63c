"""GRPO-family objectives in pure JAX: advantage estimators and policy losses, registered by name.

Adding one is one function::

    @register_advantage("my_adv")
    def my_adv(rewards, group_size, eps=1e-6): ...           # [P*G] -> [P*G]

    @register_loss("my_loss")                                # aggregation="token" for a batch token mean
    def my_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs=None, *, cfg: LossConfig): ...
        # -> (scalar loss, dict of scalar metrics)

and ``--config.grpo.loss=my_loss`` trains with it (the learner reads the aggregation from the registry).

Conventions
-----------
* Rewards are ``[num_prompts * G]`` with each prompt's G samples **contiguous** (``reshape(P, G)``).
* ``logprobs`` ``[B, T]``: log pi_theta of each completion token under the current policy (differentiable);
  ``old_logprobs``: the same under the sampling policy (treated as constants); ``ref_logprobs``: under the
  frozen reference (constants; only read when ``cfg.beta > 0``); ``mask`` ``[B, T]``: 1 on completion tokens.
* Per token: ``ratio = exp(lp - old)``, ``pg = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)``,
  ``kl = exp(ref - lp) - (ref - lp) - 1`` (the k3 estimator, >= 0), ``l = pg + beta * kl``.
* Aggregation ("loss"): ``grpo`` = per-sequence token mean, then mean over the B sequences (symmetric clip
  ``clip_eps``); ``dr_grpo`` = token sum / (B * max_len) with a constant ``max_len`` (``cfg.max_len``, 0 = T)
  so no length bias (symmetric clip); ``dapo`` = token mean over every completion token of the batch, with
  the asymmetric clip ``[1 - clip_eps, 1 + clip_eps_high]``.
* Padded positions never produce NaN: differences are zeroed under the mask before ``exp``.

All functions are jit-able (``LossConfig`` is a frozen, hashable dataclass: close over it or mark it static).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

Array = jax.Array

ADVANTAGES: dict[str, Callable[..., Array]] = {}
LOSSES: dict[str, Callable[..., tuple[Array, dict[str, Array]]]] = {}
#: How each registered loss averages: "row" (a mean over the batch's sequences: grpo, dr_grpo) or "token" (a mean
#: over every completion token of the batch: dapo). The learner weights its micro-batches by row or token share
#: accordingly, so gradient accumulation and padding give exactly the full-mini-batch loss.
LOSS_AGGREGATION: dict[str, str] = {}
AGGREGATIONS = ("row", "token")


def register_advantage(name: str):
    """Decorator registering ``fn(rewards [P*G], group_size, eps=1e-6) -> advantages [P*G]`` as ``name``."""

    def deco(fn):
        if name in ADVANTAGES:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGES[name] = fn
        return fn

    return deco


def register_loss(name: str, aggregation: str = "row"):
    """Decorator registering ``fn(logprobs, old_logprobs, advantages, mask, ref_logprobs=None, *, cfg)`` as
    ``name``; ``aggregation`` says how it averages (``LOSS_AGGREGATION``)."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"loss {name!r}: aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")

    def deco(fn):
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = fn
        LOSS_AGGREGATION[name] = aggregation
        return fn

    return deco


def get_advantage(name: str) -> Callable[..., Array]:
    if name not in ADVANTAGES:
        raise ValueError(f"config.grpo.advantage={name!r}: unknown (registered: {sorted(ADVANTAGES)})")
    return ADVANTAGES[name]


def loss_aggregation(name: str) -> str:
    """"row" or "token": how the registered loss ``name`` averages (see ``LOSS_AGGREGATION``)."""
    get_loss(name)
    return LOSS_AGGREGATION[name]


def get_loss(name: str) -> Callable[..., tuple[Array, dict[str, Array]]]:
    if name not in LOSSES:
        raise ValueError(f"config.grpo.loss={name!r}: unknown (registered: {sorted(LOSSES)})")
    return LOSSES[name]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of the policy losses (hashable: usable as a jit static argument).

    clip_eps: lower clip (and upper, for the symmetric losses). clip_eps_high: upper clip of ``dapo``.
    beta: k3 KL coefficient to the reference (0 = no KL term, ``ref_logprobs`` ignored).
    max_len: ``dr_grpo``'s constant normaliser (0 = the padded length T of the batch).
    """

    clip_eps: float = 0.2
    clip_eps_high: float = 0.28
    beta: float = 0.0
    max_len: int = 0

    @classmethod
    def from_config(cls, grpo: Any, max_len: int = 0) -> "LossConfig":
        """From ``config.grpo`` (clip_eps, clip_eps_high, beta; optional max_len, else the argument)."""
        get = (lambda k, d: grpo[k] if k in grpo else d) if hasattr(grpo, "__contains__") else (
            lambda k, d: getattr(grpo, k, d))
        return cls(
            clip_eps=float(get("clip_eps", 0.2)),
            clip_eps_high=float(get("clip_eps_high", 0.28)),
            beta=float(get("beta", 0.0)),
            max_len=int(get("max_len", 0) or max_len),
        )


# ---------------------------------------------------------------------------------------------------------
# advantages
# ---------------------------------------------------------------------------------------------------------


def _groups(rewards: Array, group_size: int) -> Array:
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards of shape {rewards.shape}: expected [num_prompts * {group_size}]")
    return rewards.reshape(-1, group_size)


@register_advantage("grpo")
def grpo_advantages(rewards: Array, group_size: int, eps: float = 1e-6) -> Array:
    """(r - mean_group) / (std_group + eps), std with Bessel's correction (ddof=1, as TRL); G=1 gives 0."""
    r = _groups(rewards, group_size)
    if group_size == 1:
        return jnp.zeros(r.size, jnp.float32)
    mean = r.mean(axis=1, keepdims=True)
    std = jnp.sqrt(((r - mean) ** 2).sum(axis=1, keepdims=True) / (group_size - 1))
    return ((r - mean) / (std + eps)).reshape(-1)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: Array, group_size: int, eps: float = 1e-6) -> Array:
    """r - mean_group (Dr. GRPO: no std normalisation, which would up-weight near-uniform groups)."""
    del eps
    r = _groups(rewards, group_size)
    return (r - r.mean(axis=1, keepdims=True)).reshape(-1)


@register_advantage("dr_grpo_positive")
def dr_grpo_positive_advantages(rewards: Array, group_size: int, eps: float = 1e-6) -> Array:
    """max(r - mean_group, 0): only samples better than their group are reinforced (positive-sample
    reinforcement). Why: on a near-deterministic tiny policy, pushing down wrong samples measurably lowered
    greedy accuracy (README, GRPO); this isolates the positive half of the Dr. GRPO signal."""
    return jnp.maximum(dr_grpo_advantages(rewards, group_size, eps), 0.0)


@register_advantage("rloo")
def rloo_advantages(rewards: Array, group_size: int, eps: float = 1e-6) -> Array:
    """Leave-one-out baseline: r_i - mean_{j != i} r_j  (= G/(G-1) * (r_i - mean)); G=1 gives 0."""
    del eps
    r = _groups(rewards, group_size)
    if group_size == 1:
        return jnp.zeros(r.size, jnp.float32)
    loo = (r.sum(axis=1, keepdims=True) - r) / (group_size - 1)
    return (r - loo).reshape(-1)


def compute_advantages(name: str, rewards: Array, group_size: int, eps: float = 1e-6) -> Array:
    return get_advantage(name)(rewards, group_size, eps)


# ---------------------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------------------


def _masked_mean(x: Array, mask: Array) -> Array:
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _per_token(
    logprobs: Array, old_logprobs: Array, advantages: Array, mask: Array, ref_logprobs: Array | None,
    lo: float, hi: float, beta: float,
) -> tuple[Array, Array, dict[str, Array]]:
    """(per-token loss, per-token pg loss, metrics) -- shared by every aggregation."""
    mask = mask.astype(jnp.float32)
    lp = logprobs.astype(jnp.float32)
    old = jax.lax.stop_gradient(old_logprobs.astype(jnp.float32))
    adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))[:, None]
    on = mask > 0
    log_ratio = jnp.where(on, lp - old, 0.0)
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - lo, 1.0 + hi)
    pg = -jnp.minimum(ratio * adv, clipped * adv)
    per_tok = pg
    sg_ratio = jax.lax.stop_gradient(ratio)
    sg_lr = jax.lax.stop_gradient(log_ratio)
    clip_high = (sg_ratio > 1.0 + hi) & (adv > 0)
    clip_low = (sg_ratio < 1.0 - lo) & (adv < 0)
    metrics = {
        "clip_fraction": _masked_mean((clip_high | clip_low).astype(jnp.float32), mask),
        "clip_high_fraction": _masked_mean(clip_high.astype(jnp.float32), mask),
        "clip_low_fraction": _masked_mean(clip_low.astype(jnp.float32), mask),
        # k3 estimate of KL(pi_old || pi_theta) from tokens sampled by pi_old: (r - 1) - log r
        "approx_kl": _masked_mean(jnp.expm1(sg_lr) - sg_lr, mask),
        "ratio_mean": _masked_mean(sg_ratio, mask),
        "ratio_max": jnp.where(on, sg_ratio, -jnp.inf).max(initial=-jnp.inf),
        "ratio_min": jnp.where(on, sg_ratio, jnp.inf).min(initial=jnp.inf),
        "advantage_mean": advantages.astype(jnp.float32).mean(),
        "tokens": mask.sum(),
    }
    if beta > 0.0 and ref_logprobs is not None:
        ref = jax.lax.stop_gradient(ref_logprobs.astype(jnp.float32))
        d = jnp.where(on, ref - lp, 0.0)
        kl = jnp.exp(d) - d - 1.0
        per_tok = per_tok + beta * kl
        metrics["kl"] = _masked_mean(jax.lax.stop_gradient(kl), mask)
    else:
        metrics["kl"] = jnp.zeros((), jnp.float32)
    return per_tok * mask, pg * mask, metrics


def _check(logprobs, old_logprobs, advantages, mask, cfg, ref_logprobs):
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape or logprobs.ndim != 2:
        raise ValueError(
            f"logprobs {logprobs.shape}, old_logprobs {old_logprobs.shape}, mask {mask.shape}: expected equal [B, T]")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages {advantages.shape}: expected [{logprobs.shape[0]}]")
    if cfg.beta > 0.0 and ref_logprobs is None:
        raise ValueError("beta > 0 needs ref_logprobs (the frozen reference's token logprobs)")
    if ref_logprobs is not None and ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"ref_logprobs {ref_logprobs.shape}: expected {logprobs.shape}")


def _finish(loss, per_tok, pg_tok, mask, agg, metrics):
    metrics = dict(metrics)
    metrics["loss"] = jax.lax.stop_gradient(loss)
    metrics["pg_loss"] = jax.lax.stop_gradient(agg(pg_tok, mask))
    metrics["kl_loss"] = jax.lax.stop_gradient(agg(per_tok - pg_tok, mask))
    return loss, metrics


def _seq_mean_agg(x: Array, mask: Array) -> Array:
    mask = mask.astype(jnp.float32)
    return (x.sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)).mean()


@register_loss("grpo")
def grpo_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs=None, *, cfg: LossConfig = LossConfig()):
    """Sequence-level token mean, then batch mean; symmetric clip ``clip_eps``."""
    _check(logprobs, old_logprobs, advantages, mask, cfg, ref_logprobs)
    per_tok, pg_tok, m = _per_token(
        logprobs, old_logprobs, advantages, mask, ref_logprobs, cfg.clip_eps, cfg.clip_eps, cfg.beta)
    loss = _seq_mean_agg(per_tok, mask)
    return _finish(loss, per_tok, pg_tok, mask, _seq_mean_agg, m)


@register_loss("dr_grpo")
def dr_grpo_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs=None, *, cfg: LossConfig = LossConfig()):
    """Token sum / (B * max_len), a constant normaliser (Dr. GRPO); symmetric clip ``clip_eps``."""
    _check(logprobs, old_logprobs, advantages, mask, cfg, ref_logprobs)
    per_tok, pg_tok, m = _per_token(
        logprobs, old_logprobs, advantages, mask, ref_logprobs, cfg.clip_eps, cfg.clip_eps, cfg.beta)
    denom = float(logprobs.shape[0] * (cfg.max_len or logprobs.shape[1]))
    agg = lambda x, _m: x.sum() / denom  # noqa: E731
    return _finish(agg(per_tok, mask), per_tok, pg_tok, mask, agg, m)


@register_loss("dapo", aggregation="token")
def dapo_loss(logprobs, old_logprobs, advantages, mask, ref_logprobs=None, *, cfg: LossConfig = LossConfig()):
    """Token mean over all completion tokens of the batch; asymmetric clip [1 - clip_eps, 1 + clip_eps_high]."""
    _check(logprobs, old_logprobs, advantages, mask, cfg, ref_logprobs)
    per_tok, pg_tok, m = _per_token(
        logprobs, old_logprobs, advantages, mask, ref_logprobs, cfg.clip_eps, cfg.clip_eps_high, cfg.beta)
    agg = lambda x, mk: x.sum() / jnp.maximum(mk.astype(jnp.float32).sum(), 1.0)  # noqa: E731
    return _finish(agg(per_tok, mask), per_tok, pg_tok, mask, agg, m)


def policy_loss(name: str, logprobs, old_logprobs, advantages, mask, ref_logprobs=None, *, cfg: LossConfig):
    return get_loss(name)(logprobs, old_logprobs, advantages, mask, ref_logprobs, cfg=cfg)


# ---------------------------------------------------------------------------------------------------------
# helpers for the learner
# ---------------------------------------------------------------------------------------------------------


def token_logprobs(logits: Array, targets: Array) -> Array:
    """log softmax(logits)[..., target]: ``[B, T, V], [B, T] -> [B, T]`` in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def token_entropy(logits: Array) -> Array:
    """Entropy of the next-token distribution at each position: ``[B, T, V] -> [B, T]``."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -(jnp.exp(logp) * logp).sum(-1)


__all__ = [
    "ADVANTAGES", "LOSSES", "LOSS_AGGREGATION", "LossConfig", "register_advantage", "register_loss", "loss_aggregation",
    "get_advantage", "get_loss",
    "compute_advantages", "policy_loss", "grpo_advantages", "dr_grpo_advantages", "rloo_advantages",
    "grpo_loss", "dr_grpo_loss", "dapo_loss", "token_logprobs", "token_entropy",
]
