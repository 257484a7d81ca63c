"""GRPO's jitted pieces: the policy update (one optimiser step over a mini-batch, micro-batches scanned inside)
and the teacher-forced logprob forward (old-policy and reference logprobs), with the batch shardings they take.

The update re-weights each micro-batch's loss by its row or token share, as the loss's registered aggregation
says (`rl_objectives.LOSS_AGGREGATION`), so padding rows and gradient accumulation give exactly the loss of the
whole mini-batch.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from raredx_jax import lora
from raredx_jax.parallel.sharding import logical_to_spec
from raredx_jax.training import rl_objectives as rlo
from raredx_jax.training.grpo.settings import MiniBatchLayout
from raredx_jax.training.optim import accumulate_gradients, split_micro_batches
from raredx_jax.training.state import TrainState, replicated

SEQ_KEYS = ("tokens", "positions", "segment_ids")
COMP_KEYS = ("mask", "old_logprobs", "ref_logprobs")


def batch_shardings(mesh: jax.sharding.Mesh, rows: int, seq: int, comp: int, keys: Sequence[str]
                    ) -> dict[str, NamedSharding]:
    """Per batch key: prompt+completion arrays [rows, seq], completion arrays [rows, comp], row scalars [rows]."""
    out = {}
    for k in keys:
        if k in SEQ_KEYS:
            out[k] = NamedSharding(mesh, logical_to_spec(("batch", "length"), (rows, seq), mesh))
        elif k in COMP_KEYS:
            out[k] = NamedSharding(mesh, logical_to_spec(("batch", "length"), (rows, comp), mesh))
        else:
            out[k] = NamedSharding(mesh, logical_to_spec(("batch",), (rows,), mesh))
    return out


def policy_logprobs(graphdef: nnx.GraphDef, params: Any, mb: dict[str, jax.Array], prompt_len: int,
                     comp_len: int, temperature: float) -> tuple[jax.Array, jax.Array]:
    """(logprobs [b, C] of the completion tokens under softmax(logits / T), the scaled logits [b, C, V])."""
    model = nnx.merge(graphdef, params)
    logits, _ = model(mb["tokens"], mb["positions"], mb["segment_ids"])
    lg = jax.lax.dynamic_slice_in_dim(logits, prompt_len - 1, comp_len, axis=1) / jnp.float32(temperature)
    targets = jax.lax.dynamic_slice_in_dim(mb["tokens"], prompt_len, comp_len, axis=1)
    return rlo.token_logprobs(lg, targets), lg


def make_update_fn(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, state_sh: TrainState,
                   mesh: jax.sharding.Mesh, layout: MiniBatchLayout, prompt_len: int, comp_len: int, *,
                   loss_name: str, loss_cfg: rlo.LossConfig, temperature: float, with_ref: bool,
                   entropy: bool = True, frozen_sh: Any = None, lora_dropout: float = 0.0) -> Callable:
    """Jitted ``(state, minibatch, inc) -> (state, metrics)``: one optimiser step; the state is donated.

    ``inc`` (int32 scalar) is added to ``state.step`` (1 on the last mini-batch of a global step, else 0), so
    ``state.step`` counts global RL steps (= checkpoint numbers) while optax counts optimiser steps.
    LoRA (``frozen_sh``): ``(state, minibatch, inc, base)``, the state holding the adapters only.
    """
    seq = prompt_len + comp_len
    keys = (*SEQ_KEYS, "mask", "old_logprobs", "advantages") + (("ref_logprobs",) if with_ref else ())
    b_sh = batch_shardings(mesh, layout.padded, seq, comp_len, keys)
    micro_sh = {k: NamedSharding(mesh, PartitionSpec(None, *s.spec)) for k, s in b_sh.items()}
    rep = replicated(mesh)
    token_mean = rlo.loss_aggregation(loss_name) == "token"
    weighted = ("clip_fraction", "clip_high_fraction", "clip_low_fraction", "approx_kl", "ratio_mean", "kl")

    def loss_fn(params, mb, rows_total, tokens_total, base=None, rng=None):
        if base is not None:
            params = lora.combine(base, params, rng, lora_dropout)
        lp, lg = policy_logprobs(graphdef, params, mb, prompt_len, comp_len, temperature)
        loss, m = rlo.policy_loss(loss_name, lp, mb["old_logprobs"], mb["advantages"], mb["mask"],
                                  mb.get("ref_logprobs"), cfg=loss_cfg)
        mask = mb["mask"].astype(jnp.float32)
        tok = mask.sum()
        # exact re-weighting: per-row-mean losses by row share (padding rows count in the micro-batch's mean
        # but not in rows_total), token-mean losses by token share
        scale = tok / tokens_total if token_mean else mask.shape[0] / rows_total
        w = tok / tokens_total
        # a registered loss may report fewer metrics than the built-in ones (only the loss itself is required)
        aux = {"pg_loss": m.get("pg_loss", loss) * scale,
               "kl_loss": m.get("kl_loss", jnp.zeros((), jnp.float32)) * scale}
        aux.update({k: m[k] * w for k in weighted if k in m})
        if entropy:
            ent = rlo.token_entropy(jax.lax.stop_gradient(lg))
            aux["entropy"] = (ent * mask).sum() / jnp.maximum(tok, 1.0) * w
        return loss * scale, aux

    def step(state: TrainState, mb: dict[str, jax.Array], inc: jax.Array, base: Any = None):
        mask = mb["mask"].astype(jnp.float32)
        tokens_total = jnp.maximum(mask.sum(), 1.0)
        rows_total = jnp.maximum((mask.sum(axis=1) > 0).sum().astype(jnp.float32), 1.0)
        constrain = lambda x: jax.lax.with_sharding_constraint(x, {k: micro_sh[k] for k in x})  # noqa: E731
        loss, aux, grads = accumulate_gradients(
            functools.partial(loss_fn, rows_total=rows_total, tokens_total=tokens_total, base=base,
                              rng=None if base is None else lora.update_key(state)),
            state.params, mb, layout.accum, constrain)
        gnorm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        new_state = state.replace(step=state.step + inc, params=keep(params, state.params),
                                  opt_state=keep(opt_state, state.opt_state))
        metrics = {"loss": loss, "grad_norm": gnorm, "ok": ok, "tokens": mask.sum(), "rows": rows_total, **aux}
        return new_state, metrics

    if frozen_sh is not None:
        return jax.jit(step, in_shardings=(state_sh, b_sh, rep, frozen_sh), out_shardings=(state_sh, rep),
                       donate_argnums=(0,))
    return jax.jit(step, in_shardings=(state_sh, b_sh, rep), out_shardings=(state_sh, rep), donate_argnums=(0,))


def make_logprob_fn(graphdef: nnx.GraphDef, param_sh: Any, mesh: jax.sharding.Mesh, layout: MiniBatchLayout,
                    prompt_len: int, comp_len: int, temperature: float) -> Callable:
    """Jitted ``(params, minibatch) -> [rows, C]`` completion logprobs (teacher-forced, no gradient), in
    ``layout.accum`` micro-batches (the update's activation memory)."""
    seq = prompt_len + comp_len
    b_sh = batch_shardings(mesh, layout.padded, seq, comp_len, SEQ_KEYS)
    out_sh = batch_shardings(mesh, layout.padded, seq, comp_len, ("mask",))["mask"]

    def fn(params, mb):
        one = lambda m: policy_logprobs(graphdef, params, m, prompt_len, comp_len, temperature)[0]  # noqa: E731
        if layout.accum == 1:
            return one(mb)
        out = jax.lax.map(one, split_micro_batches(mb, layout.accum))  # [k, rows/k, C], micro i = rows i, i+k..
        return jnp.swapaxes(out, 0, 1).reshape(layout.padded, comp_len)

    return jax.jit(fn, in_shardings=(param_sh, b_sh), out_shardings=out_sh)


def put_batch(arrays: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """Host arrays (the same on every process) -> global arrays with the given shardings."""
    return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx])
            for k, v in arrays.items() if k in shardings}
