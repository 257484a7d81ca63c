"""GRPO's settings (`config.grpo`) and how a rollout becomes optimiser steps (`MiniBatchLayout`).

Why apart: `configs/base.py` builds the `grpo` section from `GRPOSettings`' defaults (one place a default lives)
and the planner sizes a step from `MiniBatchLayout` without the learner.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from raredx_jax.training import rl_objectives as rlo
from raredx_jax.training.settings import from_section

OLD_LOGPROBS = ("auto", "sampler", "recompute")
FILTER_GROUPS = ("none", "pass", "total")


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """Everything ``config.grpo`` may hold (missing fields take these defaults; unknown ones are an error)."""

    steps: int = 60
    prompts_per_step: int = 8
    group_size: int = 4
    loss: str = "grpo"  # grpo | dr_grpo | dapo, or any registered (rl_objectives.LOSSES)
    advantage: str = "grpo"  # grpo | dr_grpo | rloo (rl_objectives.ADVANTAGES)
    beta: float = 0.0  # k3 KL coefficient to the frozen reference; 0 = no reference model at all
    clip_eps: float = 0.2
    clip_eps_high: float = 0.28  # dapo's upper clip
    max_len: int = 0  # dr_grpo's constant normaliser; 0 = sampling.max_new_tokens
    epochs_per_step: int = 1
    minibatch_size: int = 16  # rows (sequences) per optimiser step; 0 = the whole rollout
    micro_batch_size: int = 0  # rows per forward/backward inside a mini-batch; 0 = the whole mini-batch
    old_logprobs: str = "auto"  # auto | sampler | recompute (package docstring)
    # DAPO's dynamic-sampling filter: groups whose `filter_groups` reward has no variance (all right or all wrong
    # when "pass") carry no policy-gradient signal and are dropped before the update; none = keep every group
    filter_groups: str = "pass"  # none | pass | total
    prompt_padding: str = "max"  # max: every prompt padded to sampling.max_prompt_len (one compiled program per
    #                              run) | bucket: power-of-two buckets (less padding, one compile per bucket)
    # the optimiser is config.optim (training/optim.py OptimizerSettings), shared with SFT
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
        """From the full config (``config.grpo``) or a ``grpo`` section / dict (unknown fields are an error)."""
        if isinstance(config, dict):
            sub = config.get("grpo", config)
        else:
            sub = config.grpo if "grpo" in config else config
        return from_section(cls, sub, "grpo")

    def validate(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ValueError(f"config.grpo.{field}: {why} (got {getattr(self, field)!r})")

        for f in ("steps", "prompts_per_step", "epochs_per_step", "closed_set_candidates", "open_top_k",
                  "eval_top_k", "log_every", "keep_checkpoints"):
            if getattr(self, f) < 1:
                bad(f, "must be >= 1")
        if self.group_size < 2:
            bad("group_size", "must be >= 2 (group-relative advantages of a single sample are 0)")
        for f in ("minibatch_size", "micro_batch_size", "max_len", "eval_every",
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

    def digest(self, *others: Any) -> str:
        """A short hash of these settings (and of other settings dataclasses, e.g. the optimiser's): a resume
        with different values warns."""
        payload = [dataclasses.asdict(x) for x in (self, *others)]
        return hashlib.sha256(json.dumps(payload if others else payload[0], sort_keys=True).encode()).hexdigest()[:16]


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
