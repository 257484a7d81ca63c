"""GRPO with a dual-level curriculum and verifiable diagnosis rewards (stage 4 of RareDxR1).

Entry: ``python -m raredx_jax.train --config=configs/rl_curriculum.py`` (``config.stage = "grpo"``).

One global step (:meth:`RLLearner.step`, tunix style: global step -> mini-batch -> micro-batch):

1. **Prompts.** ``grpo.prompts_per_step`` (case, lesson) pairs from the :class:`DualCurriculum` (case level: pass-
   rate buckets; task level: ``closed_set`` -> ``open`` lessons over the simulator's difficulty levels). A
   ``closed_set`` lesson lists the gold and ``grpo.closed_set_candidates - 1`` distractors drawn from the run's
   disease subset with a generator seeded by (seed, step, slot); ``open`` asks for a top-``grpo.open_top_k``
   differential.
2. **Rollout** (``training/rollout.py``): ``grpo.group_size`` samples per prompt from the *current* policy -- the
   sampler runs on the learner's own nnx model object, whose parameters are the train state's arrays
   (``nnx.update`` after every update; no copy, no other format). Each row's sampling key is
   ``fold_in(fold_in(fold_in(TrainState.rng, SAMPLER_STREAM), step), prompt, sample)``.
3. **Rewards** (``rewards/combined.py`` ``RewardFn``): every component (diagnosis, format, length, rank, pass, ...)
   is logged separately; ``total`` drives the group-normalised advantages (``grpo.advantage``, registered by name
   in ``training/rl_objectives.py``).
4. **Optimisation.** ``grpo.epochs_per_step`` passes over the rollout in mini-batches of ``grpo.minibatch_size``
   rows (each one optimiser step; rows shuffled per epoch by (seed, step, epoch)), each split into micro-batches
   of ``grpo.micro_batch_size`` rows scanned inside the one jitted update (gradient accumulation, see
   ``training/optim.py``). Loss: ``grpo.loss`` (grpo | dr_grpo | dapo, registered by name): the clipped
   importance ratio against the sampling policy's logprobs plus, when ``grpo.beta > 0``, the k3 KL to a frozen
   reference model (loaded from ``model.init_from`` only then: with beta = 0 there is no reference and no
   reference forward). Mini-batches are padded to a multiple of the data x fsdp devices with empty rows; the
   micro-batch losses are re-weighted so padding and accumulation give exactly the full-mini-batch loss.
5. **Curriculum update** with the step's rewards (``grpo.curriculum_reward`` feeds the promotion rule, ``pass``
   the case pass-rate estimates); promotions are logged (``kind: "promotion"`` records).

Old logprobs (``grpo.old_logprobs``). The sampler reports ``log_softmax(logits / T)`` of each sampled token under
the untruncated distribution, i.e. exactly what the learner computes in its teacher-forced forward (it divides
its logits by the same temperature), with the same parameters and compute dtype. The two differ only by the
numerics of the KV-cache decode path vs the full forward: ~1e-6 in float32 (the tests check this), but ~1e-2 in
bfloat16, which would show up as spurious ratio drift and clipping. ``auto`` (default) therefore uses the
sampler's logprobs when ``model.dtype`` is float32 (saving one forward pass per step) and recomputes them with a
teacher-forced forward of the sampling-time parameters otherwise; ``recompute`` / ``sampler`` force either.
When recomputed, the mean |difference| over the rows the update trains on is logged as ``logprob_mismatch``.
(With top-k / top-p the tokens were drawn from the truncated distribution; like TRL and verl we take the
untruncated one as the behaviour policy.) The old-logprob and reference forwards run only on the rows the
group filter keeps.

Checkpoints (``checkpoints/manager.py``, the SFT trainer's manager): params, optimiser state, step, RNG key (the
sampler's stream derives from it) plus two JSON items, ``curriculum`` (the full curriculum state, its RNG
included) and ``rl_state`` (sampler key, settings digest); a rerun of the same command resumes exactly: the
metrics after a kill equal those of an uninterrupted run (tested).

Metrics (``<run_dir>/metrics.jsonl`` + TensorBoard under ``tb/``): per step ``reward/<component>_mean|_std``,
``reward/lesson/<lesson>/...``, loss, pg_loss, kl (to the reference), approx_kl (to the sampling policy),
entropy, clip fractions, grad_norm, lr, response length, truncation, zero-variance groups, curriculum lesson /
buckets / batch mix, timings and MFU of the update; every ``grpo.eval_every`` steps (and at 0 and the end)
``kind: "eval"``: greedy pass@1 (= top-1) and top-k on a fixed subset of the held-out split.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from raredx_jax import lora
from raredx_jax.models.config import ModelConfig
from raredx_jax.parallel.sharding import DEFAULT_RULES, logical_to_spec
from raredx_jax.sampling.sampler import Sampler, SamplingParams
from raredx_jax.training import rl_objectives as rlo
from raredx_jax.training.optim import accumulate_gradients, make_optimizer, split_micro_batches
from raredx_jax.training.rollout import (RewardFunction, RolloutBatch, decode_samples, encode_prompts,
                                         generate_groups, rollout, to_host)
from raredx_jax.training.state import (TrainState, abstract_params, abstract_train_state, cast_params,
                                       create_train_state, replicated, split_model, train_state_shardings)

log = logging.getLogger(__name__)

SAMPLER_STREAM = 0x5EED5A  # fold-in constant: the sampler's key stream within TrainState.rng
CURRICULUM_ITEM = "curriculum"
RL_ITEM = "rl_state"
#: Losses whose aggregation is a token mean over the whole batch: micro-batches are weighted by their token share.
#: Every other registered loss is treated as a per-row mean (grpo, dr_grpo): micro-batches weighted by row share.
TOKEN_MEAN_LOSSES = frozenset({"dapo"})
OLD_LOGPROBS = ("auto", "sampler", "recompute")
FILTER_GROUPS = ("none", "pass", "total")
SFT_COMMAND = "python -m raredx_jax.train --config=configs/rers_sft.py"


# ---------------------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """Everything ``config.grpo`` may hold (missing fields take these defaults; unknown ones are an error)."""

    steps: int = 60
    prompts_per_step: int = 8
    group_size: int = 4
    loss: str = "grpo"  # grpo | dr_grpo | dapo (rl_objectives.LOSSES)
    advantage: str = "grpo"  # grpo | dr_grpo | rloo (rl_objectives.ADVANTAGES)
    beta: float = 0.0  # k3 KL coefficient to the frozen reference; 0 = no reference model at all
    clip_eps: float = 0.2
    clip_eps_high: float = 0.28  # dapo's upper clip
    max_len: int = 0  # dr_grpo's constant normaliser; 0 = sampling.max_new_tokens
    epochs_per_step: int = 1
    minibatch_size: int = 16  # rows (sequences) per optimiser step; 0 = the whole rollout
    micro_batch_size: int = 0  # rows per forward/backward inside a mini-batch; 0 = the whole mini-batch
    old_logprobs: str = "auto"  # auto | sampler | recompute (module docstring)
    # DAPO's dynamic-sampling filter: groups whose `filter_groups` reward has no variance (all right or all wrong
    # when "pass") carry no policy-gradient signal and are dropped before the update; none = keep every group
    filter_groups: str = "pass"  # none | pass | total
    prompt_padding: str = "max"  # max: every prompt padded to sampling.max_prompt_len (one compiled program per
    #                              run) | bucket: power-of-two buckets (less padding, one compile per bucket)
    # optimiser (AdamW from training/optim.py)
    lr: float = 1e-4
    warmup_steps: int = 0  # in optimiser steps
    schedule: str = "constant"  # cosine | linear | constant
    min_lr_ratio: float = 1.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.99
    # task / curriculum
    train_split: str = "train"  # comma-separated splits of raredx_simulated_cases, e.g. "train,rl"
    max_train_cases: int = 0  # 0 = every case of the splits
    closed_set_candidates: int = 5  # gold included
    open_top_k: int = 5
    curriculum_reward: str = "diagnosis"  # reward component fed to the curriculum's promotion rule
    # evaluation
    eval_every: int = 10  # 0 = only at the start and the end
    eval_split: str = "validation"
    eval_cases: int = 32  # fixed subset (0 = the whole split, -1 = no held-out evaluation)
    eval_top_k: int = 10
    eval_at_start: bool = True
    # bookkeeping
    log_every: int = 1
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    async_checkpointing: bool = True
    release_kv_cache: bool = False  # free the sampler's decode cache after each rollout (accelerator memory)

    @classmethod
    def from_config(cls, config: Any) -> "GRPOSettings":
        """From the full config (``config.grpo``, ``sampling.max_new_tokens``) or a ``grpo`` section / dict."""
        if isinstance(config, dict):
            sub = config.get("grpo", config)
        else:
            sub = config.grpo if "grpo" in config else config
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {}
        for k in (sub.keys() if hasattr(sub, "keys") else []):
            if k not in fields:
                raise ValueError(f"config.grpo.{k}: unknown field (known: {sorted(fields)})")
            v = sub[k]
            default = fields[k].default
            try:
                kw[k] = type(default)(v) if not isinstance(default, bool) else bool(v)
            except (TypeError, ValueError):
                raise ValueError(f"config.grpo.{k}={v!r}: expected {type(default).__name__}") from None
        s = cls(**kw)
        s.validate()
        return s

    def validate(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ValueError(f"config.grpo.{field}: {why} (got {getattr(self, field)!r})")

        for f in ("steps", "prompts_per_step", "epochs_per_step", "closed_set_candidates", "open_top_k",
                  "eval_top_k", "log_every", "keep_checkpoints"):
            if getattr(self, f) < 1:
                bad(f, "must be >= 1")
        if self.group_size < 2:
            bad("group_size", "must be >= 2 (group-relative advantages of a single sample are 0)")
        for f in ("minibatch_size", "micro_batch_size", "max_len", "warmup_steps", "eval_every",
                  "checkpoint_every", "max_train_cases"):
            if getattr(self, f) < 0:
                bad(f, "must be >= 0")
        if self.eval_cases < -1:
            bad("eval_cases", "must be >= -1 (-1 = no held-out evaluation, 0 = the whole split)")
        if self.loss not in rlo.LOSSES:
            bad("loss", f"unknown loss; registered: {sorted(rlo.LOSSES)}")
        if self.advantage not in rlo.ADVANTAGES:
            bad("advantage", f"unknown estimator; registered: {sorted(rlo.ADVANTAGES)}")
        if self.beta < 0:
            bad("beta", "must be >= 0")
        if not 0 < self.clip_eps < 1 or self.clip_eps_high <= 0:
            bad("clip_eps", "need 0 < clip_eps < 1 and clip_eps_high > 0")
        if self.old_logprobs not in OLD_LOGPROBS:
            bad("old_logprobs", f"expected one of {OLD_LOGPROBS}")
        if self.filter_groups not in FILTER_GROUPS:
            bad("filter_groups", f"expected one of {FILTER_GROUPS}")
        if self.prompt_padding not in ("max", "bucket"):
            bad("prompt_padding", "expected 'max' or 'bucket'")
        if self.lr <= 0:
            bad("lr", "must be > 0")
        if not self.train_splits:
            bad("train_split", "names no split")
        held_out = {"test", self.eval_split} if self.eval_cases >= 0 else {"test"}
        if held_out & set(self.train_splits):
            bad("train_split", f"must not contain a held-out split ({', '.join(sorted(held_out))}): GRPO would "
                "train on the cases it is evaluated on")

    @property
    def train_splits(self) -> tuple[str, ...]:
        return tuple(x.strip() for x in self.train_split.split(",") if x.strip())

    @property
    def rows_per_step(self) -> int:
        return self.prompts_per_step * self.group_size

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class MiniBatchLayout:
    """How the N rollout rows become optimiser steps: mini-batches of ``rows`` real rows (``padded`` with empty
    rows so every device of data x fsdp holds the same number in every micro-batch), ``accum`` micro-batches each."""

    rows: int
    num: int
    accum: int
    padded: int

    @classmethod
    def make(cls, n_rows: int, minibatch_size: int, micro_batch_size: int, shards: int) -> "MiniBatchLayout":
        mb = minibatch_size if 0 < minibatch_size < n_rows else n_rows
        num = -(-n_rows // mb)
        micro = micro_batch_size if 0 < micro_batch_size < mb else mb
        accum = -(-mb // micro)
        micro_rows = -(-(-(-mb // accum)) // shards) * shards
        return cls(rows=mb, num=num, accum=accum, padded=accum * micro_rows)


# ---------------------------------------------------------------------------------------------------------------
# jitted pieces
# ---------------------------------------------------------------------------------------------------------------

_SEQ_KEYS = ("tokens", "positions", "segment_ids")
_COMP_KEYS = ("mask", "old_logprobs", "ref_logprobs")


def _batch_shardings(mesh: jax.sharding.Mesh, rows: int, seq: int, comp: int, keys: Sequence[str]
                     ) -> dict[str, NamedSharding]:
    out = {}
    for k in keys:
        if k in _SEQ_KEYS:
            out[k] = NamedSharding(mesh, logical_to_spec(("batch", "length"), (rows, seq), mesh))
        elif k in _COMP_KEYS:
            out[k] = NamedSharding(mesh, logical_to_spec(("batch", "length"), (rows, comp), mesh))
        else:
            out[k] = NamedSharding(mesh, logical_to_spec(("batch",), (rows,), mesh))
    return out


def _policy_logprobs(graphdef: nnx.GraphDef, params: Any, mb: dict[str, jax.Array], prompt_len: int,
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
    keys = (*_SEQ_KEYS, "mask", "old_logprobs", "advantages") + (("ref_logprobs",) if with_ref else ())
    b_sh = _batch_shardings(mesh, layout.padded, seq, comp_len, keys)
    micro_sh = {k: NamedSharding(mesh, PartitionSpec(None, *s.spec)) for k, s in b_sh.items()}
    rep = replicated(mesh)
    token_mean = loss_name in TOKEN_MEAN_LOSSES
    weighted = ("clip_fraction", "clip_high_fraction", "clip_low_fraction", "approx_kl", "ratio_mean", "kl")

    def loss_fn(params, mb, rows_total, tokens_total, base=None, rng=None):
        if base is not None:
            params = lora.combine(base, params, rng, lora_dropout)
        lp, lg = _policy_logprobs(graphdef, params, mb, prompt_len, comp_len, temperature)
        loss, m = rlo.policy_loss(loss_name, lp, mb["old_logprobs"], mb["advantages"], mb["mask"],
                                  mb.get("ref_logprobs"), cfg=loss_cfg)
        mask = mb["mask"].astype(jnp.float32)
        tok = mask.sum()
        # exact re-weighting: per-row-mean losses by row share (padding rows count in the micro-batch's mean
        # but not in rows_total), token-mean losses by token share
        scale = tok / tokens_total if token_mean else mask.shape[0] / rows_total
        w = tok / tokens_total
        aux = {"pg_loss": m["pg_loss"] * scale, "kl_loss": m["kl_loss"] * scale}
        aux.update({k: m[k] * w for k in weighted})
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
    b_sh = _batch_shardings(mesh, layout.padded, seq, comp_len, _SEQ_KEYS)
    out_sh = _batch_shardings(mesh, layout.padded, seq, comp_len, ("mask",))["mask"]

    def fn(params, mb):
        one = lambda m: _policy_logprobs(graphdef, params, m, prompt_len, comp_len, temperature)[0]  # noqa: E731
        if layout.accum == 1:
            return one(mb)
        out = jax.lax.map(one, split_micro_batches(mb, layout.accum))  # [k, rows/k, C], micro i = rows i, i+k..
        return jnp.swapaxes(out, 0, 1).reshape(layout.padded, comp_len)

    return jax.jit(fn, in_shardings=(param_sh, b_sh), out_shardings=out_sh)


def _put(arrays: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """Host arrays (the same on every process) -> global arrays with the given shardings."""
    return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx])
            for k, v in arrays.items() if k in shardings}


# ---------------------------------------------------------------------------------------------------------------
# the learner
# ---------------------------------------------------------------------------------------------------------------


class RLLearner:
    """GRPO learner: rollout from the live policy, rewards, advantages, mini-batch updates (module docstring).

    Construct with the model's config, then either :meth:`init_from_model` (a fresh run) or :meth:`set_state`
    (a restored TrainState); :meth:`from_model` does the former in one call. ``reference`` (a callable returning
    the reference's pure parameter dict) is called only when ``settings.beta > 0``; without one a fresh run
    snapshots the starting parameters. ``self.ref_params`` is None when beta = 0 and ``self.counters`` counts
    the forward passes (``reference_forward``, ``old_logprob_forward``) and optimiser ``updates``.
    """

    def __init__(self, model_cfg: ModelConfig, tokenizer: Any, reward_fn: RewardFunction, settings: GRPOSettings,
                 sampling: SamplingParams, mesh: jax.sharding.Mesh, *, seed: int = 0, rules=DEFAULT_RULES,
                 lora_settings: lora.LoraSettings | None = None):
        if sampling.temperature <= 0:
            raise ValueError("sampling.temperature must be > 0 for GRPO rollouts (greedy groups are identical)")
        self.cfg = model_cfg
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.settings = settings
        self.sampling = sampling
        self.mesh = mesh
        self.seed = int(seed)
        s = settings
        shards = int(mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1))
        self.layout = MiniBatchLayout.make(s.rows_per_step, s.minibatch_size, s.micro_batch_size, shards)
        self.updates_per_step = s.epochs_per_step * self.layout.num
        opt_cfg = {"lr": s.lr, "warmup_steps": s.warmup_steps, "schedule": s.schedule, "min_lr_ratio": s.min_lr_ratio,
                   "weight_decay": s.weight_decay, "grad_clip": s.grad_clip, "b1": s.b1, "b2": s.b2}
        self.tx, self.schedule = make_optimizer(opt_cfg, total_steps=s.steps * self.updates_per_step, lr=s.lr)
        # LoRA: the state holds the adapters; `self.base` (frozen) is also the reference model (adapters off)
        self.lora = lora_settings
        self.base: Any = None
        if lora_settings is None:
            self.graphdef, self.params_abs, self.param_sh = abstract_params(model_cfg, mesh, rules)
            train_sh = self.param_sh
        else:
            self.graphdef, full_abs, self.param_sh = lora.abstract_lora_model(model_cfg, lora_settings, mesh, rules)
            self.base_sh, train_sh = lora.split_params(self.param_sh)
            self.params_abs = lora.trainable_params(full_abs)
            self.plain_graphdef, _, _ = abstract_params(model_cfg, mesh, rules)  # the reference: adapters off
            self.ref_sh = lora.base_only(self.base_sh)
        self.state_sh = train_state_shardings(self.tx, self.params_abs, train_sh, mesh)
        self.loss_cfg = rlo.LossConfig.from_config(dataclasses.asdict(s), max_len=s.max_len or sampling.max_new_tokens)
        self.recompute_old = s.old_logprobs == "recompute" or (
            s.old_logprobs == "auto" and jnp.dtype(model_cfg.dtype) != jnp.float32)
        self.state: TrainState | None = None
        self.model: Any = None
        self.sampler: Sampler | None = None
        self.ref_params: Any = None
        self.counters = {"reference_forward": 0, "old_logprob_forward": 0, "updates": 0}
        self.optimizer_steps = 0  # optimiser steps taken (the lr schedule's count); set from the state on restore
        self._fns: dict[tuple[int, int], tuple[Callable, Callable]] = {}
        self._ref_fns: dict[tuple[int, int], Callable] = {}

    # --- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, reward_fn: RewardFunction, settings: GRPOSettings,
                   sampling: SamplingParams, mesh: jax.sharding.Mesh, *, seed: int = 0,
                   reference: Callable[[], Any] | None = None) -> "RLLearner":
        learner = cls(model.config, tokenizer, reward_fn, settings, sampling, mesh, seed=seed)
        learner.init_from_model(model, reference)
        return learner

    def abstract_state(self) -> TrainState:
        """The restore target (ShapeDtypeStructs with shardings)."""
        return abstract_train_state(self.tx, self.params_abs, self.state_sh)

    def _adopt(self, model: Any) -> None:
        nnx.update(model, self.policy_params())  # the model now holds the train state's arrays (no copy)
        self.model = model
        self.sampler = Sampler(model, None)

    def init_from_model(self, model: Any, reference: Callable[[], Any] | None = None) -> None:
        """Fresh state around ``model``'s parameters (which the state takes over: the model keeps working, on the
        state's arrays)."""
        with jax.set_mesh(self.mesh):
            if self.lora is not None:  # the base stays frozen and is the reference: no copy is made
                _, self.base, params, _ = lora.init_lora_model(model, self.lora, self.mesh, self.seed)
                self.state = create_train_state(params, self.tx, self.seed, self.state_sh)
                self._adopt(model)
                return
            _, params = split_model(model)
            params = jax.device_put(params, self.param_sh)  # no-op when already placed (e.g. orbax.load_model)
            params = cast_params(params, self.param_sh, self.cfg.param_dtype)
            if self.settings.beta > 0:
                self.ref_params = self._load_reference(reference) if reference is not None else jax.jit(
                    lambda p: jax.tree.map(jnp.copy, p), out_shardings=self.param_sh)(params)
            self.state = create_train_state(params, self.tx, self.seed, self.state_sh)
            self._adopt(model)

    def set_state(self, state: TrainState, reference: Callable[[], Any] | None = None, base: Any = None) -> None:
        """Continue from a restored TrainState (the policy model is rebuilt around its parameters); LoRA: `base`
        is the frozen base (`lora.resume_base`)."""
        with jax.set_mesh(self.mesh):
            if self.lora is not None:
                self.base, self.state = base, state
                self._adopt(nnx.eval_shape(lambda: lora.apply_lora(_make_transformer(self.cfg), self.lora)))
                return
            abstract = nnx.eval_shape(lambda: _make_transformer(self.cfg))
            self.state = state
            self._adopt(abstract)
            if self.settings.beta > 0:
                if reference is None:
                    raise ValueError("grpo.beta > 0 on a resumed run needs the reference checkpoint (model.init_from)")
                self.ref_params = self._load_reference(reference)

    def _load_reference(self, reference: Callable[[], Any]) -> Any:
        params = jax.device_put(reference(), self.param_sh)
        return cast_params(params, self.param_sh, self.cfg.param_dtype)

    def policy_params(self) -> Any:
        """The policy's whole parameter dict (LoRA: base + adapters; no copy)."""
        return self.state.params if self.lora is None else lora.combine(self.base, self.state.params)

    def reference_params(self) -> Any:
        """The reference model's parameters: the frozen snapshot, or with LoRA the base itself (adapters off)."""
        return self.ref_params if self.lora is None else lora.base_only(self.base)

    # --- keys / shapes -----------------------------------------------------------------------------------------
    def sampler_key(self, step: int) -> jax.Array:
        base = jax.random.fold_in(jax.random.wrap_key_data(jax.device_get(self.state.rng)), SAMPLER_STREAM)
        return jax.random.fold_in(base, int(step))

    def _functions(self, prompt_len: int, comp_len: int) -> tuple[Callable, Callable]:
        key = (prompt_len, comp_len)
        if key not in self._fns:
            s = self.settings
            upd = make_update_fn(self.graphdef, self.tx, self.state_sh, self.mesh, self.layout, prompt_len, comp_len,
                                 loss_name=s.loss, loss_cfg=self.loss_cfg, temperature=self.sampling.temperature,
                                 with_ref=s.beta > 0, **({} if self.lora is None else dict(
                                     frozen_sh=self.base_sh, lora_dropout=self.lora.dropout)))
            lpf = make_logprob_fn(self.graphdef, self.param_sh, self.mesh, self.layout, prompt_len, comp_len,
                                  self.sampling.temperature)
            if self.lora is not None:  # the reference forward: the plain model on the base (adapters off)
                ref_fn = make_logprob_fn(self.plain_graphdef, self.ref_sh, self.mesh, self.layout, prompt_len,
                                         comp_len, self.sampling.temperature)
                self._ref_fns[key] = ref_fn
            self._fns[key] = (upd, lpf)
        return self._fns[key]

    def _logprobs(self, params: Any, batch: RolloutBatch, fn: Callable, rows: np.ndarray) -> np.ndarray:
        """Teacher-forced logprobs of ``rows`` (the rows the update trains on), 0 elsewhere."""
        seq = batch.tokens.shape[1]
        sh = _batch_shardings(self.mesh, self.layout.padded, seq, batch.completion_len, _SEQ_KEYS)
        out = np.zeros(batch.mask.shape, np.float32)
        p = self.layout.padded
        for chunk in [rows[i:i + p] for i in range(0, rows.size, p)]:
            lp = to_host(fn(params, _put(batch.train_arrays(chunk, self.layout.padded), sh)))
            out[chunk] = lp[:chunk.size]
        return np.where(batch.mask > 0, out, 0.0).astype(np.float32)

    # --- one global step ---------------------------------------------------------------------------------------
    def step(self, messages_list: Sequence[list[dict]], payloads: Sequence[Any], step: int
             ) -> tuple[RolloutBatch, dict[str, Any]]:
        """Global step ``step`` (1-based): :meth:`rollout` then :meth:`learn`; returns the rollout and the step's
        metrics (host scalars). ``state.step`` becomes ``step``."""
        t0 = time.time()
        batch = self.rollout(messages_list, payloads, step)
        t_roll = time.time() - t0
        metrics = self.learn(batch, step)
        metrics["rollout_s"] = t_roll
        metrics["sample_tokens_per_s"] = float(batch.samples.lengths.sum()) / max(t_roll, 1e-9)
        metrics["step_time_s"] = time.time() - t0
        return batch, metrics

    def rollout(self, messages_list: Sequence[list[dict]], payloads: Sequence[Any], step: int) -> RolloutBatch:
        """``group_size`` samples per prompt from the current policy, rewards and advantages (host arrays)."""
        s = self.settings
        if len(messages_list) != s.prompts_per_step:
            raise ValueError(f"{len(messages_list)} prompts for grpo.prompts_per_step={s.prompts_per_step}")
        with jax.set_mesh(self.mesh):
            adv_fn = lambda r, g: np.asarray(rlo.compute_advantages(s.advantage, r, g))  # noqa: E731
            batch = rollout(self.sampler, self.tokenizer, messages_list, payloads, s.group_size, self.sampling,
                            self.sampler_key(step), self.reward_fn, adv_fn, pad_to_max=s.prompt_padding == "max")
            if s.release_kv_cache:
                self.sampler.release()
        return batch

    def learn(self, batch: RolloutBatch, step: int) -> dict[str, Any]:
        """``epochs_per_step`` passes of mini-batch updates on one rollout (global step ``step``, 1-based; on
        return ``state.step == step`` and the policy model holds the new parameters). Returns host metrics."""
        s = self.settings
        if batch.num_rows != s.rows_per_step:
            raise ValueError(f"rollout of {batch.num_rows} rows; grpo.prompts_per_step x group_size = "
                             f"{s.rows_per_step}")
        t1 = time.time()
        metrics: dict[str, Any] = {}
        with jax.set_mesh(self.mesh):
            update, lp_fn = self._functions(batch.prompt_len, batch.completion_len)
            # the forwards below serve only the update: rows of groups the filter dropped are not run through them
            kept = kept_rows(batch, s.filter_groups)
            if self.recompute_old and kept.size:
                old = self._logprobs(self.policy_params(), batch, lp_fn, kept)
                self.counters["old_logprob_forward"] += 1
                n_tok = max(float(batch.mask[kept].sum()), 1.0)
                metrics["logprob_mismatch"] = float(np.abs(old[kept] - batch.old_logprobs[kept]).sum() / n_tok)
                batch.old_logprobs[kept] = old[kept]
            ref = None
            if s.beta > 0 and kept.size:
                ref = self._logprobs(self.reference_params(), batch, self._ref_fns.get(
                    (batch.prompt_len, batch.completion_len), lp_fn), kept)
                self.counters["reference_forward"] += 1
            seq = batch.tokens.shape[1]
            keys = (*_SEQ_KEYS, "mask", "old_logprobs", "advantages") + (("ref_logprobs",) if ref is not None else ())
            sh = _batch_shardings(self.mesh, self.layout.padded, seq, batch.completion_len, keys)
            rep = replicated(self.mesh)
            num = -(-kept.size // self.layout.rows)  # mini-batches of the kept rows (all of them: num = layout.num)
            total_upd = s.epochs_per_step * num
            outs = []
            n_upd = 0
            for epoch in range(s.epochs_per_step):
                perm = kept[np.random.default_rng([self.seed, int(step), epoch]).permutation(kept.size)]
                for j in range(num):
                    rows = perm[j * self.layout.rows:(j + 1) * self.layout.rows]
                    arr = batch.train_arrays(rows, self.layout.padded)
                    if ref is not None:
                        arr["ref_logprobs"] = np.zeros_like(arr["old_logprobs"])
                        arr["ref_logprobs"][:rows.size] = ref[rows]
                    n_upd += 1
                    inc = jax.device_put(np.int32(1 if n_upd == total_upd else 0), rep)
                    self.state, m = update(self.state, _put(arr, sh), inc,
                                           *(() if self.lora is None else (self.base,)))
                    outs.append(m)
            if not n_upd:  # every group filtered out: no update, but the global step still counts
                self.state = self.state.replace(step=jax.device_put(self.state.step + 1, self.state_sh.step))
            host = jax.device_get(outs)
            nnx.update(self.model, self.state.params)
        t_upd = time.time() - t1
        self.counters["updates"] += n_upd
        for i, m in enumerate(host):
            if not bool(m["ok"]):
                raise NonFiniteLoss(step, i, float(m["loss"]), float(m["grad_norm"]))
        for k in (host[0] if host else ()):
            if k != "ok":
                metrics[k] = float(np.mean([float(m[k]) for m in host]))
        metrics.update(self._rollout_metrics(batch))
        metrics["groups_kept_fraction"] = kept.size / max(batch.num_rows, 1)
        self.optimizer_steps += n_upd
        metrics["lr"] = float(self.schedule(max(self.optimizer_steps - 1, 0)))
        metrics["updates"] = n_upd
        metrics["update_s"] = t_upd
        train_tokens = n_upd * self.layout.padded * seq
        metrics["train_tokens_per_s"] = train_tokens / max(t_upd, 1e-9)
        from raredx_jax.training import metrics as metrics_lib

        peak = metrics_lib.device_peak_flops(jax.devices()[0].device_kind, self.cfg.dtype)
        flops_per_token = metrics_lib.model_flops_per_token(self.cfg, seq)
        metrics["mfu"] = metrics_lib.mfu(metrics["train_tokens_per_s"], flops_per_token, jax.device_count(), peak)
        return metrics

    @staticmethod
    def _rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in batch.rewards.items():
            out[f"reward/{k}_mean"] = float(np.mean(v))
            out[f"reward/{k}_std"] = float(np.std(v))
        g = batch.group_size
        total = batch.rewards["total"].reshape(-1, g)
        out["zero_std_groups"] = float(np.mean(total.std(axis=1) == 0))
        out["advantage_abs_mean"] = float(np.mean(np.abs(batch.advantages)))
        if "pass" in batch.rewards:
            out["zero_std_pass_groups"] = float(np.mean(batch.rewards["pass"].reshape(-1, g).std(axis=1) == 0))
            # of the rows the update pushes up, the share whose first answer is wrong (0 = the reward follows top-1)
            pos = batch.advantages > 0
            out["positive_advantage_wrong_first"] = (float(np.mean(batch.rewards["pass"][pos] == 0)) if pos.any()
                                                     else 0.0)
        lengths = batch.samples.lengths
        out["response_length_mean"] = float(lengths.mean())
        out["response_length_max"] = float(lengths.max())
        out["truncated_fraction"] = float(np.mean(batch.samples.truncated))
        out["prompt_len"] = float(batch.prompt_len)
        return out

    # --- evaluation --------------------------------------------------------------------------------------------
    def generate_greedy(self, messages_list: Sequence[list[dict]], payloads: Sequence[Any]) -> Any:
        """One greedy completion per prompt from the current policy (RolloutSamples, G = 1)."""
        params = dataclasses.replace(self.sampling, temperature=0.0)
        with jax.set_mesh(self.mesh):
            ids = encode_prompts(self.tokenizer, messages_list, params.max_prompt_len)
            gen = generate_groups(self.sampler, self.tokenizer, ids, 1, params, jax.random.key(0),
                                  pad_to_max=self.settings.prompt_padding == "max")
            if self.settings.release_kv_cache:
                self.sampler.release()
        return decode_samples(self.tokenizer, gen, payloads, 1)


def kept_rows(batch: RolloutBatch, filter_groups: str) -> np.ndarray:
    """Row indices the update trains on: every row, or (DAPO's dynamic sampling) the rows of groups whose
    ``filter_groups`` reward varies inside the group; a group where every sample is right (or every one wrong)
    has no policy-gradient signal, only noise from the KL term and the shaping rewards."""
    if filter_groups == "none":
        return np.arange(batch.num_rows)
    if filter_groups not in batch.rewards:
        raise ValueError(f"config.grpo.filter_groups={filter_groups!r}: the reward function returns no "
                         f"{filter_groups!r} (it returns {sorted(batch.rewards)}); set it to none or total")
    r = np.asarray(batch.rewards[filter_groups], np.float64).reshape(-1, batch.group_size)
    varies = r.max(axis=1) > r.min(axis=1)
    return np.flatnonzero(np.repeat(varies, batch.group_size))


def _make_transformer(cfg: ModelConfig) -> Any:
    from raredx_jax.models.transformer import Transformer

    return Transformer(cfg, rngs=nnx.Rngs(0))


class NonFiniteLoss(FloatingPointError):
    def __init__(self, step: int, update: int, loss: float, gnorm: float):
        super().__init__(f"non-finite loss or gradient at GRPO step {step} (update {update}: loss={loss}, "
                         f"grad_norm={gnorm})")


# ---------------------------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------------------------


def _init_checkpoint(config: Any) -> str:
    """The RERS-SFT checkpoint GRPO starts from (``model.init_from``); MissingInputError naming the stage."""
    from raredx_jax.checkpoints import orbax as orbax_io
    from raredx_jax.training.sft import MissingInputError

    init = config.model.get("init_from", "")
    if not init:
        raise MissingInputError(
            "model.init_from is empty: GRPO starts from the SFT-on-RERS-trajectories checkpoint. Run "
            f"`{SFT_COMMAND}` first and set --config.model.init_from to its run_dir (default runs/rers_sft)")
    try:
        return orbax_io.resolve_model_checkpoint(init)
    except FileNotFoundError as e:
        raise MissingInputError(
            f"model.init_from={init!r}: {e}. GRPO starts from the SFT-on-RERS-trajectories run: run `{SFT_COMMAND}` "
            "first (after knowledge SFT and RERS), or point --config.model.init_from at its run_dir") from None


def _load_cases(config: Any, split: str) -> list[Any]:
    from raredx_jax.data.build import RL_SPLIT
    from raredx_jax.data.tfds_builders import data_source, decode_case
    from raredx_jax.training.sft import MissingInputError

    try:
        src = data_source("raredx_simulated_cases", split, config.data.dir)
    except FileNotFoundError as e:
        raise MissingInputError(str(e)) from None
    except ValueError as e:
        if split == RL_SPLIT:
            raise ValueError(f"{e}. The {RL_SPLIT!r} split holds GRPO-only training notes: build it with "
                             "--config.data.rl_notes_per_disease=N, or set config.grpo.train_split=train") from None
        raise
    return [decode_case(src[i]) for i in range(len(src))]


def eval_subset(cases: Sequence[Any], n: int, seed: int) -> list[Any]:
    """A fixed subset of ``n`` held-out cases (a seeded permutation; 0 = all), the same every evaluation."""
    if n <= 0 or n >= len(cases):
        return list(cases)
    idx = np.sort(np.random.default_rng([int(seed), 0xE7A1]).permutation(len(cases))[:n])
    return [cases[i] for i in idx]


def held_out_eval(learner: RLLearner, cases: Sequence[Any], linker: Any, settings: GRPOSettings) -> dict[str, Any]:
    """Greedy pass@1 (= top-1) and top-k on open-domain prompts of ``cases``, overall and per level."""
    from raredx_jax.data.prompts import diagnosis_messages
    from raredx_jax.rewards.diagnosis import verify

    t0 = time.time()
    msgs = [diagnosis_messages(c.text, top_k=settings.open_top_k) for c in cases]
    samples = learner.generate_greedy(msgs, cases)
    ranks, fmt = [], []
    for c, text in zip(cases, samples.texts):
        v = verify(text, c.diagnosis, linker, top_k=settings.eval_top_k)
        ranks.append(v.rank)
        fmt.append(v.format_ok)
    k = settings.eval_top_k
    out: dict[str, Any] = {
        "pass@1": float(np.mean([r == 1 for r in ranks])),
        f"top{k}": float(np.mean([r is not None and r <= k for r in ranks])),
        "format_ok": float(np.mean(fmt)),
        "response_length_mean": float(np.mean(samples.lengths)),
        "n": len(cases),
    }
    for level in sorted({c.level for c in cases}):
        sel = [r for c, r in zip(cases, ranks) if c.level == level]
        out[f"pass@1/{level}"] = float(np.mean([r == 1 for r in sel]))
    out["seconds"] = round(time.time() - t0, 2)
    return out


def seed_from_rers(curriculum: Any, train_cases: Sequence[Any], rers_dir: str) -> int:
    """First pass-rate estimate of every training case RERS sampled: its direct round (``rers.num_samples`` samples
    of the open prompt per case, from the model RERS-SFT started from) is in the RERS journal, free. It places a
    case in a bucket; skipping it needs the current policy's rollouts too (see below). Returns how many cases were
    seeded; "" = none. A missing journal is an error naming the flag."""
    if not rers_dir:
        return 0
    from raredx_jax.training.rers import JOURNAL_DIR, read_journals
    from raredx_jax.training.sft import MissingInputError

    journal_dir = os.path.join(rers_dir, JOURNAL_DIR)
    chunks = read_journals(journal_dir)
    if not chunks:
        raise MissingInputError(f"curriculum.prior_from={rers_dir!r}: no RERS journal in {journal_dir} (run RERS "
                                "first, or set --config.curriculum.prior_from='' for unmeasured cases)")
    by_id = {c["case_id"]: c.get("direct", {}) for ch in chunks.values() for c in ch["cases"]}
    # RERS sampled another policy (the model RERS-SFT started from, at RERS's temperature): its rate sets where a
    # case starts, but counts as at most min_attempts - 1 attempts, so no case is skipped as always or never
    # solved before the current policy's own rollouts confirm it
    cap = max(float(curriculum.cfg.min_attempts) - 1.0, 0.0)
    idx, att, suc = [], [], []
    for i, case in enumerate(train_cases):
        d = by_id.get(case.id)
        tries = float(d.get("tries", 0)) if d else 0.0
        if tries > 0 and cap > 0:
            w = min(tries, cap) / tries
            idx.append(i)
            att.append(tries * w)
            suc.append(float(d.get("correct", 0)) * w)
    return curriculum.seed_pass_rates("open", idx, att, suc)


def lesson_trends(train_recs: Sequence[dict], promo_recs: Sequence[dict], lessons: Sequence[str], total: int
                  ) -> dict[str, dict[str, Any]]:
    """Per lesson, over the steps it was the current lesson: the rollout pass rate and reward of its own samples
    at the start and at the end (means of up to 3 steps each). Rewards of different lessons are not comparable
    (different notes), so a trend is only read within a lesson."""
    bounds, start = {}, 1
    for i, name in enumerate(lessons):
        if i and not any(r.get("to") == name for r in promo_recs):
            break  # never reached
        end = next((int(r["step"]) for r in promo_recs if r.get("from") == name), total)
        bounds[name] = (start, end)
        start = end + 1
    out = {}
    for name, (a, b) in bounds.items():
        recs = [r for r in train_recs if a <= int(r.get("step", 0)) <= b]
        vals = {k: [r[f"reward/lesson/{name}/{k}"] for r in recs if f"reward/lesson/{name}/{k}" in r]
                for k in ("pass", "total")}
        k = max(1, min(3, len(vals["pass"]) // 2))
        out[name] = {"steps": [a, b], **{f"{m}_{w}": (float(np.mean(v[:k] if w == "first" else v[-k:])) if v else None)
                                         for m, v in vals.items() for w in ("first", "last")}}
    return out


def _lesson_reward_metrics(batch: RolloutBatch, lessons: Sequence[str]) -> dict[str, float]:
    g = batch.group_size
    per_row = np.repeat(np.asarray(lessons, dtype=object), g)
    out = {}
    for name in sorted(set(lessons)):
        m = per_row == name
        out[f"reward/lesson/{name}/total"] = float(batch.rewards["total"][m].mean())
        if "pass" in batch.rewards:
            out[f"reward/lesson/{name}/pass"] = float(batch.rewards["pass"][m].mean())
        out[f"lesson_share/{name}"] = float(m.mean())
    return out


def run_grpo(config: Any) -> dict[str, Any]:
    """Train per ``config`` (stage ``grpo``), resuming from ``<run_dir>/checkpoints`` when present."""
    from raredx_jax.checkpoints import orbax as orbax_io
    from raredx_jax.checkpoints.manager import TrainCheckpointManager
    from raredx_jax.data.linking import DiseaseLinker
    from raredx_jax.data.tokenizer import load_tokenizer
    from raredx_jax.parallel.mesh import make_mesh
    from raredx_jax.rewards.combined import RewardFn
    from raredx_jax.training import metrics as metrics_lib
    from raredx_jax.training.curriculum import DualCurriculum
    from raredx_jax.training.rollout import diagnosis_reward, lesson_case, lesson_messages
    from raredx_jax.training.sft import (MissingInputError, NonFiniteLossError, _numerics, _resume_model_config,
                                         _write_resolved_config)

    t_start = time.time()
    st = GRPOSettings.from_config(config)
    stage = config.stage
    run_dir = os.path.abspath(config.run_dir)
    primary = jax.process_index() == 0
    seed = int(config.seed)
    sampling = SamplingParams.from_config(config.sampling)
    mesh = make_mesh(config.mesh)

    resuming = orbax_io.latest_checkpoint(os.path.join(run_dir, "checkpoints")) is not None
    init_path = None
    if not resuming or st.beta > 0:
        init_path = _init_checkpoint(config)  # fails first (nothing written yet), naming the stage to run
    try:
        tokenizer = load_tokenizer(config)
    except FileNotFoundError as e:
        raise MissingInputError(str(e)) from None
    train_cases = [c for split in st.train_splits for c in _load_cases(config, split)]
    if st.max_train_cases:
        train_cases = train_cases[:st.max_train_cases]
    eval_cases = eval_subset(_load_cases(config, st.eval_split), st.eval_cases, seed) if st.eval_cases >= 0 else []
    if st.eval_cases >= 0 and not eval_cases:
        raise ValueError(f"config.grpo.eval_split={st.eval_split!r} has no cases (set grpo.eval_cases=-1 for no "
                         "held-out evaluation)")
    from raredx_jax.data.build import run_diseases

    diseases = run_diseases(config)[0]
    disease_names = [(d.id, d.name) for d in diseases]
    linker = DiseaseLinker(diseases)
    reward = RewardFn(linker, config)
    curriculum = DualCurriculum([c.level for c in train_cases], config)
    seeded = seed_from_rers(curriculum, train_cases, curriculum.cfg.prior_from)
    if st.curriculum_reward not in reward.weights and st.curriculum_reward not in ("total", "pass", "rank"):
        raise ValueError(f"config.grpo.curriculum_reward={st.curriculum_reward!r}: not a reward component "
                         f"({sorted(reward.weights)} or total | pass | rank)")
    _write_resolved_config(config, run_dir)
    ckpt = TrainCheckpointManager(run_dir, keep=st.keep_checkpoints, async_save=st.async_checkpointing,
                                  extra_items=(CURRICULUM_ITEM, RL_ITEM))
    resuming = bool(ckpt.steps())
    model_cfg = _resume_model_config(ckpt, config) if resuming else None
    if model_cfg is None:
        init_path = init_path or _init_checkpoint(config)
        model_cfg = orbax_io.read_model_config(init_path, **_numerics(config))
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{model_cfg.vocab_size} (tokenizer.path / model.init_from mismatch)")
    lora_cfg = lora.LoraSettings.from_config(config)
    lora.check_run_mode(ckpt.step_dir(ckpt.latest_step()) if resuming else None, lora_cfg)
    learner = RLLearner(model_cfg, tokenizer, diagnosis_reward(reward), st, sampling, mesh, seed=seed,
                        lora_settings=lora_cfg)

    def reference():
        print(f"[{stage}] loading the frozen reference (beta={st.beta}) from {init_path}", flush=True)
        return split_model(orbax_io.load_model(init_path, mesh, **_numerics(config)))[1]

    total = st.steps
    with jax.set_mesh(mesh):
        restored = ckpt.restore(learner.abstract_state()) if resuming else None
        if restored is not None:
            orbax_io.check_tokenizer(restored.path, tokenizer)
            if lora_cfg is None:
                learner.set_state(restored.state, reference if st.beta > 0 else None)
            else:
                learner.set_state(restored.state, base=lora.resume_base(config, restored.meta, restored.path, mesh,
                                                                        model_cfg, lora_cfg))
            start = restored.step
            if CURRICULUM_ITEM in restored.extras:
                curriculum.load_state_dict(restored.extras[CURRICULUM_ITEM])
            else:
                print(f"WARNING: checkpoint step {start} has no curriculum state; the curriculum restarts", flush=True)
            saved = restored.extras.get(RL_ITEM, {})
            learner.optimizer_steps = int(saved.get("optimizer_steps", start * learner.updates_per_step))
            if saved.get("settings") and saved["settings"] != st.digest():
                print(f"WARNING: resuming with different grpo settings than step {start} was trained with", flush=True)
            print(f"[{stage}] resumed from {restored.path} (step {start}/{total}, lesson {curriculum.lesson.name})",
                  flush=True)
        else:
            orbax_io.check_tokenizer(init_path, tokenizer)
            print(f"[{stage}] starting from checkpoint {init_path}", flush=True)
            model = orbax_io.load_model(init_path, mesh, **_numerics(config))
            learner.init_from_model(model, reference if st.beta > 0 and lora_cfg is None else None)
            start = 0

    summary_path = os.path.join(run_dir, "summary.json")
    done = metrics_lib.completed_summary(run_dir, start, total, stage)
    if done is not None:
        ckpt.close()
        return done

    logger = metrics_lib.MetricsLogger(run_dir, total, start, primary=primary, desc=stage)
    if primary:
        ref_note = ("reference loaded" if learner.ref_params is not None else
                    "LoRA: the frozen base is the reference" if lora_cfg is not None and st.beta > 0 else
                    "no reference model")
        print(f"[{stage}] model {model_cfg.family} {model_cfg.num_params() / 1e6:.2f}M params, dtype "
              f"{model_cfg.dtype}/{model_cfg.param_dtype}; mesh {dict(mesh.shape)}; {st.prompts_per_step} prompts x "
              f"{st.group_size} samples/step, {learner.layout.num} mini-batch(es) of {learner.layout.rows} rows "
              f"(padded {learner.layout.padded}, {learner.layout.accum} micro) x {st.epochs_per_step} epoch(s); "
              f"loss {st.loss}, advantage {st.advantage}, beta {st.beta} "
              f"({ref_note}); old logprobs: "
              f"{'recomputed' if learner.recompute_old else 'sampler'}; {len(train_cases)} train cases, "
              f"{len(eval_cases)} held-out ({seeded} case pass rates from the RERS journal); lessons "
              f"{[x.name for x in curriculum.lessons]}; filter {st.filter_groups}; steps {start}->{total}; "
              f"run_dir {run_dir}", flush=True)

    def do_eval(s: int) -> dict[str, Any] | None:
        if not eval_cases:
            return None
        ev = held_out_eval(learner, eval_cases, linker, st)
        logger.write(s, ev, kind="eval")
        logger.message(f"[{stage}] step {s}: held-out pass@1 {ev['pass@1']:.3f}, top{st.eval_top_k} "
                       f"{ev[f'top{st.eval_top_k}']:.3f}, format {ev['format_ok']:.2f} (n={ev['n']})")
        return ev

    if start == 0 and st.eval_at_start:
        do_eval(0)
    last_saved = ckpt.latest_step()
    try:
        for step in range(start, total):
            s = step + 1
            pairs = curriculum.sample_batch(st.prompts_per_step)
            cases = [train_cases[ci] for ci, _ in pairs]
            lessons = [les for _, les in pairs]
            messages = [lesson_messages(c, les, disease_names, np.random.default_rng([seed, s, slot, 0xC105]),
                                        n_candidates=st.closed_set_candidates, top_k=st.open_top_k)
                        for slot, (c, les) in enumerate(zip(cases, lessons))]
            payloads = [lesson_case(c, les, n_candidates=st.closed_set_candidates, top_k=st.open_top_k)
                        for c, les in zip(cases, lessons)]
            batch, m = learner.step(messages, payloads, s)
            g = st.group_size
            promos = curriculum.update(np.repeat([ci for ci, _ in pairs], g), [x for x in lessons for _ in range(g)],
                                       batch.rewards[st.curriculum_reward], batch.rewards.get("pass"), step=s)
            cm = curriculum.metrics()
            cm.pop("skipped_lessons", None)
            rec = {**m, **_lesson_reward_metrics(batch, lessons), **{f"curriculum/{k}": v for k, v in cm.items()}}
            logger.write(s, rec)
            for e in promos:
                logger.write(s, e, kind="promotion")
                logger.message(f"[{stage}] step {s}: curriculum promoted {e['from']} -> {e['to']} ({e['reason']}, "
                               f"window mean {e['window_mean']})")
            if s % st.log_every == 0 or s == total:
                logger.message(f"[{stage}] step {s}/{total} lesson {curriculum.lesson.name}: reward "
                               f"{m['reward/total_mean']:.3f} pass {m.get('reward/pass_mean', float('nan')):.3f} "
                               f"kept {m['groups_kept_fraction']:.2f} len {m['response_length_mean']:.0f} "
                               f"kl {m.get('kl', 0.0):.4f} clip "
                               f"{m.get('clip_fraction', 0.0):.3f} ({m['step_time_s']:.1f}s)")
            if (st.eval_every and s % st.eval_every == 0) or s == total:
                do_eval(s)
            logger.progress(s, {k: m[k2] for k, k2 in (("loss", "loss"), ("lr", "lr"), ("tokens_per_s",
                                "train_tokens_per_s"), ("mfu", "mfu")) if k2 in m})
            if (st.checkpoint_every and s % st.checkpoint_every == 0) or s == total:
                ckpt.save(s, learner.state, model_cfg, meta={"stage": stage, "tokenizer_digest": tokenizer.digest(),
                                                             **({} if lora_cfg is None else
                                                                {"lora": lora.checkpoint_meta(config, lora_cfg)})},
                          extras={CURRICULUM_ITEM: curriculum.state_dict(),
                                  RL_ITEM: {"step": s, "settings": st.digest(), "seed": seed,
                                            "optimizer_steps": learner.optimizer_steps,
                                            "sampler_key": [int(x) for x in np.asarray(jax.random.key_data(
                                                learner.sampler_key(s)))]}})
                last_saved = s
    except NonFiniteLoss as e:
        ckpt.wait()
        good = ckpt.latest_step()
        raise NonFiniteLossError(f"[{stage}] {e}: stopping without saving; the last good checkpoint is "
                                 f"{ckpt.step_dir(good) if good is not None else 'none'}. Lower grpo.lr, then rerun "
                                 "the same command to resume from it.") from None
    ckpt.wait()
    logger.close()
    ckpt.close()

    train_recs = metrics_lib.read_metrics(run_dir, "train") if primary else []
    eval_recs = metrics_lib.read_metrics(run_dir, "eval") if primary else []
    promo_recs = metrics_lib.read_metrics(run_dir, "promotion") if primary else []

    def mean_of(recs, key):
        vals = [r[key] for r in recs if isinstance(r.get(key), (int, float))]
        return float(np.mean(vals)) if vals else None

    k = max(1, min(5, len(train_recs) // 4 or 1))
    summary: dict[str, Any] = {
        "stage": stage, "run_dir": run_dir, "steps": total, "resumed_from": start or None,
        "reward_first": mean_of(train_recs[:k], "reward/total_mean"),
        "reward_last": mean_of(train_recs[-k:], "reward/total_mean"),
        "pass_first": mean_of(train_recs[:k], "reward/pass_mean"),
        "pass_last": mean_of(train_recs[-k:], "reward/pass_mean"),
        "eval": [{"step": r["step"], "pass@1": r.get("pass@1"), f"top{st.eval_top_k}": r.get(f"top{st.eval_top_k}"),
                  "format_ok": r.get("format_ok")} for r in eval_recs],
        "heldout_top1_before": eval_recs[0].get("pass@1") if eval_recs and eval_recs[0]["step"] == 0 else None,
        "heldout_top1_after": eval_recs[-1].get("pass@1") if eval_recs else None,
        "promotions": [{k2: r.get(k2) for k2 in ("step", "from", "to", "reason", "baseline", "window_mean")}
                       for r in promo_recs],
        "lesson_trends": lesson_trends(train_recs, promo_recs, [x.name for x in curriculum.lessons], total),
        # how many promotions the gain rule made vs the saturation and plateau (max_steps) guards
        "promotion_reasons": {why: sum(r.get("reason") == why for r in promo_recs)
                              for why in ("rule", "saturated", "max_steps")},
        "final_lesson": curriculum.lesson.name,
        "checkpoint": ckpt.step_dir(last_saved) if last_saved is not None else None,
        "init_from": init_path, "params": model_cfg.num_params(), "seconds": round(time.time() - t_start, 1),
    }
    if primary:
        with open(summary_path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        os.replace(summary_path + ".tmp", summary_path)
        with open(os.path.join(run_dir, "curriculum.json"), "w", encoding="utf-8") as f:
            json.dump({"metrics": curriculum.metrics(), "promotions": curriculum.promotions}, f, indent=2, default=str)
        print(f"[{stage}] done: reward {summary['reward_first']} -> {summary['reward_last']}; held-out top-1 "
              f"{summary['heldout_top1_before']} -> {summary['heldout_top1_after']}; lesson {summary['final_lesson']}; "
              f"{summary['seconds']}s; checkpoint {summary['checkpoint']}", flush=True)
    return summary


__all__ = ["GRPOSettings", "MiniBatchLayout", "RLLearner", "make_update_fn", "make_logprob_fn", "held_out_eval",
           "eval_subset", "run_grpo", "TOKEN_MEAN_LOSSES", "SAMPLER_STREAM"]
