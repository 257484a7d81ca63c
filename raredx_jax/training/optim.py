"""Optimiser for every trainer: AdamW + warmup + cosine/linear decay + global-norm clipping, and gradient
accumulation as an explicit micro-batch scan inside the one jitted train step.

Why a scan and not `optax.MultiSteps`:
* one `jax.jit` call is one optimiser step, so the step counter, the learning-rate schedule, logging, the
  NaN guard and the checkpoint cadence all count optimiser steps (with MultiSteps every call is a micro-step
  and half-accumulated gradients would have to be checkpointed and resumed);
* a checkpoint always falls on an optimiser-step boundary, so exact resume needs nothing extra;
* the micro-batches of one step are fed as one global batch `[k * m, T]`, so the host feeds one array per step
  and XLA sees the whole loop (no host round trip per micro-batch); memory holds one micro-batch's activations
  plus one fp32 gradient accumulator, the same as MultiSteps' accumulator;
* the loss is normalised by the target-token count of the *whole* batch before the backward pass, so k
  micro-batches give the same update as one batch k times larger (a test checks this), which per-micro-batch
  means averaged by MultiSteps do not when micro-batches hold different numbers of target tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """`config.optim`: the one optimiser section every trainer reads (SFT stages and GRPO alike; each stage's
    config file sets its own values). Steps are optimiser steps."""

    lr: float = 3e-3
    warmup_steps: int = 20  # linear warmup to lr
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.1  # cosine / linear decay to lr * min_lr_ratio at the last step
    weight_decay: float = 0.01  # AdamW, not on norms and biases
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0  # global-norm clip; 0 = none

    def validate(self) -> None:
        check_schedule(self.lr, self.warmup_steps, self.schedule, self.min_lr_ratio)


def check_schedule(lr: float, warmup_steps: int, schedule: str, min_lr_ratio: float) -> None:
    """The one check of the schedule's settings (at config read time and again when a schedule is built)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if lr <= 0:
        raise ValueError(f"optim.lr must be positive, got {lr}")
    if warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")


# Parameters that get no weight decay (matched against the path of each leaf): norms and biases.
NO_DECAY_KEYS = ("norm", "bias")


def _field(train_cfg: Any, name: str, default: Any) -> Any:
    """A field of a ConfigDict / dict (item access) or a settings dataclass (attribute access)."""
    try:
        value = train_cfg[name]
    except (KeyError, AttributeError, TypeError):
        value = getattr(train_cfg, name, default)
    return default if value is None else value


def make_schedule(train_cfg: Any, total_steps: int | None = None, lr: float | None = None) -> optax.Schedule:
    """lr(step): linear warmup to `lr` over `warmup_steps` (step 0 already trains at lr/warmup), then
    cosine / linear decay to `lr * min_lr_ratio` at `total_steps` (default `train.steps`), or constant."""
    lr = float(train_cfg.lr if lr is None else lr)
    warmup = int(_field(train_cfg, "warmup_steps", 0))
    total = int(total_steps if total_steps is not None else train_cfg.steps)
    kind = str(_field(train_cfg, "schedule", "cosine"))
    min_ratio = float(_field(train_cfg, "min_lr_ratio", 0.0))
    check_schedule(lr, warmup, kind, min_ratio)
    if total <= 0:
        raise ValueError(f"the schedule's total steps must be positive, got {total}")
    decay_steps = max(total - warmup, 1)
    min_lr = lr * min_ratio

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = lr * jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
        frac = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if kind == "cosine":
            decayed = min_lr + (lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        elif kind == "linear":
            decayed = lr + (min_lr - lr) * frac
        else:
            decayed = jnp.asarray(lr, jnp.float32)
        return jnp.where(step < warmup, warm, decayed)

    return schedule


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: everything but norms and biases (by path name)."""
    def keep(path, _):
        name = jax.tree_util.keystr(path).lower()
        return not any(k in name for k in NO_DECAY_KEYS)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(train_cfg: Any, total_steps: int | None = None,
                   lr: float | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(clip_by_global_norm -> AdamW(schedule, decoupled weight decay on matrices only), schedule).

    `lr` overrides the settings' lr. Moments are kept in the parameters' dtype (fp32 master
    weights -> fp32 moments).
    """
    schedule = make_schedule(train_cfg, total_steps, lr=lr)
    clip = float(_field(train_cfg, "grad_clip", 0.0))
    parts = []
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(optax.adamw(schedule, b1=float(_field(train_cfg, "b1", 0.9)), b2=float(_field(train_cfg, "b2", 0.999)),
                             eps=float(_field(train_cfg, "eps", 1e-8)),
                             weight_decay=float(_field(train_cfg, "weight_decay", 0.0)), mask=decay_mask))
    return optax.chain(*parts), schedule


def split_micro_batches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """[B, T] -> [k, B/k, T], micro-batch i = rows i, i+k, i+2k, ...

    Rows are taken strided so that with the batch sharded over its first axis every device keeps exactly its
    own rows (no data movement): a device holding rows [r0, r0 + B/n) holds B/(n k) rows of each micro-batch
    when k divides B/n.
    """
    def one(x):
        b = x.shape[0]
        if b % k:
            raise ValueError(f"batch of {b} rows does not split into train.grad_accum={k} micro-batches")
        return jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(one, batch)


def accumulate_gradients(loss_fn: Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, Any]], params: Any,
                         batch: dict[str, jax.Array], k: int,
                         micro_constraint: Callable[[dict[str, jax.Array]], dict[str, jax.Array]] | None = None
                         ) -> tuple[jax.Array, Any, Any]:
    """Sum of (loss, aux, grads) of `loss_fn(params, micro_batch) -> (loss, aux)` over k micro-batches.

    `loss_fn` must already be normalised for the whole batch (e.g. divide the summed token losses by the
    whole batch's target count): then the sums equal one pass over the whole batch. Gradients accumulate in
    fp32 in the scan carry; `aux` must be a pytree of scalars (summed).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if k == 1:
        (loss, aux), grads = grad_fn(params, batch)
        return loss, aux, grads
    micro = split_micro_batches(batch, k)
    if micro_constraint is not None:
        micro = micro_constraint(micro)

    def body(carry, mb):
        loss_acc, aux_acc, g_acc = carry
        (loss, aux), g = grad_fn(params, mb)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        aux_acc = jax.tree.map(jnp.add, aux_acc, aux)
        return (loss_acc + loss, aux_acc, g_acc), None

    first = jax.tree.map(lambda x: x[0], micro)
    aux_shape = jax.eval_shape(lambda p, b: loss_fn(p, b)[1], params, first)
    zeros_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
    zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss, aux, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros_aux, zeros_g), micro)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss, aux, grads
