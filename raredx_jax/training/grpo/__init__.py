"""GRPO with a dual-level curriculum and verifiable diagnosis rewards (stage 4 of RareDxR1).

Entry: ``python -m raredx_jax.train --config=configs/rl_curriculum.py`` (``config.stage = "grpo"``).

One global step (:meth:`GRPOLearner.step`, tunix style: global step -> mini-batch -> micro-batch):

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
   rows (each one optimiser step; rows shuffled per epoch by (seed, step, epoch)), each split into micro-batches of
   ``grpo.micro_batch_size`` rows scanned inside the one jitted update (gradient accumulation, see
   ``training/optim.py``). Loss: ``grpo.loss`` (grpo | dr_grpo | dapo, registered by name with how it averages): the
   clipped importance ratio against the sampling policy's logprobs plus, when ``grpo.beta > 0``, the k3 KL to a
   frozen reference model (loaded from ``model.init_from`` only then: with beta = 0 there is no reference and no
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

Checkpoints (``checkpoints/manager.py`` through training/loop.py's ``Trainer``, as SFT): params, optimiser
state, step, RNG key (the sampler's stream derives from it) plus two JSON items, ``curriculum`` (the full
curriculum state, its RNG included) and ``rl_state`` (sampler key, settings digest); a rerun of the same
command resumes exactly: the metrics after a kill equal those of an uninterrupted run (tested).

Metrics (``<run_dir>/metrics.jsonl`` + TensorBoard under ``tb/``): per step ``reward/<component>_mean|_std``,
``reward/lesson/<lesson>/...``, loss, pg_loss, kl (to the reference), approx_kl (to the sampling policy),
entropy, clip fractions, grad_norm, lr, response length, truncation, zero-variance groups, curriculum lesson /
buckets / batch mix, timings and MFU of the update; every ``grpo.eval_every`` steps (and at 0 and the end)
``kind: "eval"``: greedy pass@1 (= top-1) and top-k on a fixed subset of the held-out split.

Modules: ``settings`` (GRPOSettings, MiniBatchLayout), ``update`` (the jitted update and logprob forward),
``learner`` (GRPOLearner), ``evaluation`` (held-out pass@1, lesson trends), ``driver`` (the stage: run_grpo).
"""
from raredx_jax.training.grpo.driver import (
           CURRICULUM_ITEM,
           RL_ITEM,
           GRPOTask,
           init_checkpoint,
           run_grpo,
           seed_from_rers,
)
from raredx_jax.training.grpo.evaluation import eval_subset, held_out_eval, lesson_trends
from raredx_jax.training.grpo.learner import SAMPLER_STREAM, GRPOLearner, kept_rows
from raredx_jax.training.grpo.settings import FILTER_GROUPS, OLD_LOGPROBS, GRPOSettings, MiniBatchLayout
from raredx_jax.training.grpo.update import make_logprob_fn, make_update_fn

__all__ = ["CURRICULUM_ITEM", "FILTER_GROUPS", "OLD_LOGPROBS", "RL_ITEM", "SAMPLER_STREAM", "GRPOLearner",
           "GRPOSettings", "GRPOTask", "MiniBatchLayout", "eval_subset", "held_out_eval", "init_checkpoint",
           "kept_rows", "lesson_trends", "make_logprob_fn", "make_update_fn", "run_grpo", "seed_from_rers"]
