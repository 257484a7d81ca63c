"""Dual-level curriculum GRPO (stage 4 of RareDxR1): `python -m raredx_jax.train --config=configs/rl_curriculum.py`.

Starts from the SFT-on-RERS-trajectories run (`model.init_from`, default runs/rers_sft = configs/rers_sft.py; a
missing checkpoint fails with the command to run first) and trains on the simulated train split with a
verifiable reward that follows top-1 (rewards: gold first or nothing; shaping only among right answers) and a
dual-level curriculum: cases by their measured pass rate (seeded from the RERS journal, `curriculum.prior_from`),
open-domain lessons noisy -> imprecise -> sparse -> hard, promoted on a within-lesson gain. Greedy held-out
pass@1 on a fixed subset of the validation split at step 0, every `grpo.eval_every` steps and at the end
(`summary.json` holds before/after). Every `grpo.*` field is documented in raredx_jax/training/grpo/settings.py
(GRPOSettings).

The embedded default is sized for a 2-core CPU (the tiny model, 32 steps of 8 prompts x 4 samples). On an
accelerator target (`configs/rl_curriculum.py:gpu1`, `:h100x8`, ...) raise prompts_per_step / group_size /
minibatch_size with the hardware's batch scale, e.g. `--config.grpo.prompts_per_step=64 --config.grpo.group_size=8`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs.base import make_config  # noqa: E402


def _stage(c):
    c.stage = "grpo"
    c.run_dir = "runs/grpo"
    c.model.init_from = "runs/rers_sft"  # the RERS-SFT run (configs/rers_sft.py)

    g = c.grpo
    # one global step = prompts_per_step prompts x group_size samples from the current policy
    g.steps = 32
    g.prompts_per_step = 8
    g.group_size = 4
    # objective (training/rl_objectives.py registries)
    # Dr. GRPO (mean-centred advantages, constant normaliser): with the std-normalised `grpo` advantage, groups
    # whose samples all miss the diagnosis turn tiny format / length differences into +-1 advantages and the tiny
    # policy learned "short and well formed" instead of "right" (held-out pass@1 collapsed; README, GRPO)
    g.loss = "dr_grpo"  # grpo (sequence mean) | dr_grpo (constant normaliser) | dapo (token mean, asymmetric clip)
    # Positive half of the Dr. GRPO advantage (max(r - group mean, 0)): on the near-deterministic tiny policy,
    # pushing down wrong samples lowered greedy accuracy, keeping only the positive half did not (README, GRPO)
    g.advantage = "dr_grpo_positive"  # grpo | dr_grpo | dr_grpo_positive | rloo
    g.beta = 0.05  # k3 KL to the frozen RERS-SFT reference (loaded only when > 0): keeps the tiny policy close
    g.clip_eps = 0.2
    g.clip_eps_high = 0.28
    g.max_len = 0  # dr_grpo normaliser; 0 = sampling.max_new_tokens
    g.old_logprobs = "auto"  # auto: the sampler's in float32, recomputed (teacher-forced) otherwise
    g.prompt_padding = "max"  # pad prompts to sampling.max_prompt_len: one compiled program for the run
    # optimisation: epochs over the rollout, mini-batches (optimiser steps), micro-batches (accumulation)
    g.epochs_per_step = 1
    g.minibatch_size = 0  # 0 = one optimiser step per rollout batch (on-policy: the kept groups of the step)
    g.micro_batch_size = 0  # 0 = whole mini-batch per forward/backward
    o = c.optim  # the optimiser section (training/optim.py), shared with SFT; GRPO's own values
    o.lr = 5e-5
    o.warmup_steps = 4  # optimiser steps
    o.schedule = "constant"
    o.min_lr_ratio = 1.0
    o.weight_decay = 0.0
    o.grad_clip = 1.0
    o.b1 = 0.9
    o.b2 = 0.99
    # task
    # splits of raredx_simulated_cases to train on (comma-separated; validation / test are refused). "train,rl"
    # adds fresh notes RERS-SFT never saw (build them with --config.data.rl_notes_per_disease=N); measured no
    # better on the embedded default (README, GRPO side runs), so the default stays on the RERS training notes
    g.train_split = "train"
    g.max_train_cases = 0
    # DAPO dynamic sampling: groups whose samples are all right or all wrong are dropped before the update (no
    # policy-gradient signal); the kept share is logged as groups_kept_fraction
    g.filter_groups = "pass"
    g.closed_set_candidates = 5  # gold + 4 distractors from the run's disease subset
    g.open_top_k = 5
    g.curriculum_reward = "diagnosis"  # the component the promotion rule reads
    # held-out evaluation (greedy pass@1 = top-1 on a fixed subset of the validation split)
    g.eval_every = 16
    g.eval_split = "validation"
    g.eval_cases = 0  # the whole validation split (the pipeline's has 208 notes): 40 cases had a +-14-point CI
    g.eval_top_k = 10
    g.eval_at_start = True
    # bookkeeping
    g.log_every = 1
    g.checkpoint_every = 10
    g.keep_checkpoints = 2
    g.async_checkpointing = True
    g.release_kv_cache = False

    # dual-level curriculum (training/curriculum.py documents every rule)
    cur = c.curriculum
    # Task level: only the task the model was taught (open ranked differentials; no closed-set lesson, a prompt
    # that appears in no SFT data or evaluation), ordered by the held-out top-1 RERS-SFT starts from per level
    # (README, GRPO), ending on the hardest. Typical notes are left out: the
    # model already solves them, so their groups carry no signal
    cur.lessons = ("open:noisy", "open:imprecise", "open:sparse", "open:hard")
    # Promotion on what the policy learned at the lesson: a later window's pass rate beats the lesson's first
    # window by promote_margin (a fixed reward threshold sat below the starting reward and promoted every 4 steps
    # whatever happened); a lesson whose cases are all solved moves on at once; max_steps bounds a plateau so a
    # 32-step CPU run reaches the hard lesson
    cur.promote_metric = "pass"
    cur.promote_rule = "gain"
    cur.promote_margin = 0.05
    cur.window = 3
    cur.min_steps = 6
    cur.max_steps = 8
    cur.replay = 0.2
    # Case level: every training case starts with the pass rate RERS measured (its direct round, 4 samples each,
    # in the RERS journal), re-measured from every step's rollouts (counts, older ones discounted by half);
    # cases always or never solved over >= 4 attempts (one group) are skipped, 5% of slots revisit them; the
    # medium bucket (mixed outcomes, the groups that carry signal) gets most slots throughout
    cur.prior_from = "runs/rers"
    cur.remeasure_every = 1
    cur.estimator = "counts"
    cur.count_decay = 0.5
    cur.min_attempts = 4
    cur.skip_hi = 0.95
    cur.skip_lo = 0.05
    cur.revisit = 0.05
    cur.bucket_weights_start = (0.2, 0.6, 0.2)
    cur.bucket_weights_end = (0.1, 0.6, 0.3)

    # sampling for rollouts (temperature > 0); evaluation decodes greedily with the same limits. At T=1 the tiny
    # policy's samples are far worse than its greedy answers (pass 0.07 vs 0.33): 0.5 keeps the rollouts close to
    # the policy that is evaluated and gives groups with both right and wrong answers
    c.sampling.temperature = 0.5
    c.sampling.top_k = 0
    c.sampling.top_p = 1.0
    c.sampling.max_new_tokens = 160  # as RERS sampled the trajectories the policy was fine-tuned on
    c.sampling.max_prompt_len = 512  # diagnosis prompts of the embedded default reach ~400 tokens (+ candidates)


def get_config(hardware=None):
    return make_config(hardware, _stage)
