"""The GRPO learner: rollout from the live policy, rewards, group advantages, mini-batch updates.

One global step (:meth:`GRPOLearner.step`, tunix style: global step -> mini-batch -> micro-batch); the package
docstring (`raredx_jax.training.grpo`) describes every part. The stage around it is `driver.py`.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from raredx_jax import lora
from raredx_jax.models.config import ModelConfig
from raredx_jax.models.transformer import Transformer
from raredx_jax.parallel.sharding import DEFAULT_RULES
from raredx_jax.sampling.sampler import Sampler, SamplingParams
from raredx_jax.training import metrics as metrics_lib
from raredx_jax.training import rl_objectives as rlo
from raredx_jax.training.common import NonFiniteLossError
from raredx_jax.training.grpo.settings import GRPOSettings, MiniBatchLayout
from raredx_jax.training.grpo.update import SEQ_KEYS, batch_shardings, make_logprob_fn, make_update_fn, put_batch
from raredx_jax.training.optim import OptimizerSettings, make_optimizer
from raredx_jax.training.rollout import (
    RewardFunction,
    RolloutBatch,
    decode_samples,
    encode_prompts,
    generate_groups,
    rollout,
    to_host,
)
from raredx_jax.training.state import (
    TrainState,
    abstract_params,
    abstract_train_state,
    cast_params,
    create_train_state,
    replicated,
    split_model,
    train_state_shardings,
)

SAMPLER_STREAM = 0x5EED5A  # fold-in constant: the sampler's key stream within TrainState.rng


class GRPOLearner:
    """GRPO learner: rollout from the live policy, rewards, advantages, mini-batch updates (module docstring).

    Construct with the model's config, then either :meth:`init_from_model` (a fresh run) or :meth:`set_state`
    (a restored TrainState); :meth:`from_model` does the former in one call. ``optimizer`` is ``config.optim``
    (None: OptimizerSettings' defaults); its steps are optimiser steps. ``reference`` (a callable returning
    the reference's pure parameter dict) is called only when ``settings.beta > 0``; without one a fresh run
    snapshots the starting parameters. ``self.ref_params`` is None when beta = 0 and ``self.counters`` counts
    the forward passes (``reference_forward``, ``old_logprob_forward``) and optimiser ``updates``.
    """

    def __init__(self, model_cfg: ModelConfig, tokenizer: Any, reward_fn: RewardFunction, settings: GRPOSettings,
                 sampling: SamplingParams, mesh: jax.sharding.Mesh, *, seed: int = 0, rules=DEFAULT_RULES,
                 lora_settings: lora.LoraSettings | None = None, optimizer: OptimizerSettings | None = None):
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
        self.optimizer = optimizer if optimizer is not None else OptimizerSettings()  # config.optim
        self.tx, self.schedule = make_optimizer(self.optimizer, total_steps=s.steps * self.updates_per_step)
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
                   reference: Callable[[], Any] | None = None, optimizer: OptimizerSettings | None = None
                   ) -> "GRPOLearner":
        learner = cls(model.config, tokenizer, reward_fn, settings, sampling, mesh, seed=seed, optimizer=optimizer)
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
                self._adopt(nnx.eval_shape(lambda: lora.apply_lora(make_transformer(self.cfg), self.lora)))
                return
            abstract = nnx.eval_shape(lambda: make_transformer(self.cfg))
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
        sh = batch_shardings(self.mesh, self.layout.padded, seq, batch.completion_len, SEQ_KEYS)
        out = np.zeros(batch.mask.shape, np.float32)
        p = self.layout.padded
        for chunk in [rows[i:i + p] for i in range(0, rows.size, p)]:
            lp = to_host(fn(params, put_batch(batch.train_arrays(chunk, self.layout.padded), sh)))
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
            keys = (*SEQ_KEYS, "mask", "old_logprobs", "advantages") + (("ref_logprobs",) if ref is not None else ())
            sh = batch_shardings(self.mesh, self.layout.padded, seq, batch.completion_len, keys)
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
                    self.state, m = update(self.state, put_batch(arr, sh), inc,
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
                raise NonFiniteLossError(f"non-finite loss or gradient at GRPO step {step} (update {i}: loss="
                                         f"{float(m['loss'])}, grad_norm={float(m['grad_norm'])})")
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


def make_transformer(cfg: ModelConfig) -> Any:
    """An nnx Transformer of `cfg` (for nnx.eval_shape: the policy model's structure on a resumed run)."""
    return Transformer(cfg, rngs=nnx.Rngs(0))
