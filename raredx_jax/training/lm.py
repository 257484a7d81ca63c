"""Next-token language-model loss and its jitted steps over a device mesh: what SFT trains with and what the
knowledge probe and the planner reuse.

* Loss: next-token cross-entropy on completion tokens only (the batch's `loss_mask`; prompt tokens are never
  targets) and never across the boundary of two packed sequences (segment ids), averaged over the target
  tokens of the whole global batch; logits and loss in fp32.
* One `jax.jit` train step with explicit in/out shardings over the mesh: parameters and optimiser state
  sharded by the logical-axis rules, the batch over ('data', 'fsdp'); the train state is donated. Gradient
  accumulation is a micro-batch scan inside that step (see training/optim.py for why). A step whose loss or
  gradient norm is not finite is not applied (`ok` is False in its metrics).

Why apart from `sft.py`: these are pure functions of a model, a batch and a mesh; the SFT driver, the knowledge
probe (evaluation/), the planner and the benchmarks use them without the stage around them.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from raredx_jax import lora
from raredx_jax.parallel.sharding import logical_to_spec
from raredx_jax.training.optim import accumulate_gradients
from raredx_jax.training.state import TrainState, replicated

BATCH_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")


# --- loss --------------------------------------------------------------------------------------------------------
def target_weights(batch: dict[str, jax.Array]) -> jax.Array:
    """[B, T-1] fp32: 1 where tokens[:, t+1] is a completion token predicted from t within the same sequence."""
    seg = batch["segment_ids"]
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    return batch["loss_mask"][:, 1:].astype(jnp.float32) * same.astype(jnp.float32)


def token_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """[B, T-1] negative log-likelihood of tokens[:, 1:] under logits[:, :-1] (fp32, logsumexp - target)."""
    lg = logits[:, :-1].astype(jnp.float32)
    lse = jax.nn.logsumexp(lg, axis=-1)
    tgt = jnp.take_along_axis(lg, tokens[:, 1:, None], axis=-1)[..., 0]
    return lse - tgt


def lm_loss_sums(logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(sum of target-token NLL, number of target tokens) of one batch (INTERFACES.md loss contract)."""
    w = target_weights(batch)
    return jnp.sum(token_nll(logits, batch["tokens"]) * w), jnp.sum(w)


def forward(graphdef: nnx.GraphDef, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    model = nnx.merge(graphdef, params)
    logits, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    return logits


# --- steps -------------------------------------------------------------------------------------------------------
def batch_sharding(mesh: jax.sharding.Mesh, batch_size: int, seq_len: int) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), (batch_size, seq_len), mesh))


def batch_shards(mesh: jax.sharding.Mesh) -> int:
    """Devices the batch axis is split over (data x fsdp)."""
    return int(mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1))


def check_batch(mesh: jax.sharding.Mesh, batch_size: int, grad_accum: int) -> None:
    shards = batch_shards(mesh)
    if grad_accum < 1:
        raise ValueError(f"train.grad_accum must be >= 1, got {grad_accum}")
    if batch_size % grad_accum:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by train.grad_accum={grad_accum}")
    micro = batch_size // grad_accum
    if micro % shards:
        raise ValueError(f"train.batch_size / train.grad_accum = {micro} rows per micro-batch do not split over "
                         f"data x fsdp = {shards} devices; use a multiple of {shards * grad_accum} for "
                         "train.batch_size")
    if batch_size % jax.process_count():
        raise ValueError(f"train.batch_size={batch_size} must be divisible by the {jax.process_count()} processes")


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    shardings: TrainState, mesh: jax.sharding.Mesh, batch_shape: tuple[int, int], *,
                    grad_accum: int = 1, nan_at_step: int = -1, frozen_sh: Any = None, lora_dropout: float = 0.0
                    ) -> Callable[..., tuple[TrainState, dict]]:
    """The jitted SFT train step `(state, batch) -> (state, metrics)`; the state is donated.

    metrics (replicated scalars): loss (mean NLL over target tokens), targets, tokens (non-padding),
    grad_norm (before clipping), lr, ok (loss and grad norm finite; when False the update was not applied).
    `nan_at_step` (>= 0) poisons that step's loss, to exercise the guard in tests.
    LoRA (`frozen_sh` = the frozen base's shardings): the step is `(state, batch, base)`, `state.params` holds the
    adapters only and the model is `lora.combine(base, adapters)`; only the adapters get gradients.
    """
    b_sh = batch_sharding(mesh, *batch_shape)
    micro_sh = NamedSharding(mesh, PartitionSpec(None, *b_sh.spec))
    rep = replicated(mesh)

    def loss_fn(params, mb, denom, base=None, rng=None):
        if base is not None:
            params = lora.combine(base, params, rng, lora_dropout)
        logits = forward(graphdef, params, mb)
        s, n = lm_loss_sums(logits, mb)
        return s / denom, {"targets": n}

    def step(state: TrainState, batch: dict[str, jax.Array], base: Any = None):
        denom = jnp.maximum(jnp.sum(target_weights(batch)), 1.0)
        constrain = lambda mb: jax.lax.with_sharding_constraint(mb, micro_sh)  # noqa: E731
        rng = None if base is None else jax.random.fold_in(state.key(), state.step)
        loss, aux, grads = accumulate_gradients(functools.partial(loss_fn, denom=denom, base=base, rng=rng),
                                                state.params, batch, grad_accum, constrain)
        if nan_at_step >= 0:
            loss = jnp.where(state.step == nan_at_step, jnp.nan, loss)
        gnorm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                                  opt_state=keep(opt_state, state.opt_state))
        metrics = {"loss": loss, "targets": aux["targets"], "tokens": jnp.sum(batch["segment_ids"] != 0),
                   "grad_norm": gnorm, "lr": schedule(state.step), "ok": ok}
        return new_state, metrics

    if frozen_sh is not None:
        return jax.jit(step, in_shardings=(shardings, b_sh, frozen_sh), out_shardings=(shardings, rep),
                       donate_argnums=(0,))
    return jax.jit(step, in_shardings=(shardings, b_sh), out_shardings=(shardings, rep), donate_argnums=(0,))


def make_eval_step(graphdef: nnx.GraphDef, param_shardings: Any, mesh: jax.sharding.Mesh,
                   batch_shape: tuple[int, int]) -> Callable[[Any, dict], tuple[jax.Array, jax.Array]]:
    """Jitted `(params, batch) -> (sum NLL, target count)`."""
    def ev(params, batch):
        return lm_loss_sums(forward(graphdef, params, batch), batch)

    return jax.jit(ev, in_shardings=(param_shardings, batch_sharding(mesh, *batch_shape)),
                   out_shardings=replicated(mesh))


def make_row_logprob(graphdef: nnx.GraphDef, param_shardings: Any, mesh: jax.sharding.Mesh,
                     batch_shape: tuple[int, int]) -> Callable[[Any, dict], jax.Array]:
    """Jitted `(params, batch) -> [B]` summed log-likelihood of each row's target tokens (loss_mask)."""
    def rows(params, batch):
        w = target_weights(batch)
        return -jnp.sum(token_nll(forward(graphdef, params, batch), batch["tokens"]) * w, axis=1)

    return jax.jit(rows, in_shardings=(param_shardings, batch_sharding(mesh, *batch_shape)),
                   out_shardings=replicated(mesh))


def to_global(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over the batch axis (rows of all processes stacked)."""
    out = {}
    for k in BATCH_KEYS:
        x = np.asarray(local[k], np.int32)
        shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        out[k] = jax.make_array_from_process_local_data(sharding, x, shape)
    return out


def replicated_batch(arrays: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """The same full host batch on every process -> a global array sharded by `sharding`."""
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in arrays.items()}

