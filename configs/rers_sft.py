"""SFT on the RERS trajectories (stage 3 of RareDxR1): `python -m raredx_jax.train --config=configs/rers_sft.py`.

Starts from the knowledge-SFT checkpoint (`model.init_from`) and trains on `raredx_rers_trajectories` found
in `train.data_dir` = the RERS run's `rers.out_dir` (default `runs/rers/trajectories`), splits train +
validation. The prompt (the original diagnosis prompt) is never a target; only the verified completion is.
Run knowledge SFT, then `python -m raredx_jax.train --config=configs/rers.py`, then this.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ml_collections import config_dict  # noqa: E402

from configs.base import make_config  # noqa: E402


def _stage(c):
    c.stage = "sft"
    c.run_dir = "runs/rers_sft"
    c.model.init_from = "runs/knowledge_sft"
    t = c.train
    t.dataset = "rers_trajectories"
    t.data_dir = "runs/rers/trajectories"  # TFDS data_dir the RERS stage wrote (its rers.out_dir)
    t.build_data = False
    t.train_split = "train"
    t.eval_split = "validation"
    t.eval_holdout_fraction = 0.05  # used only when the trajectory set has no validation split
    t.eval_at_start = True
    t.async_checkpointing = True
    t.debug_nan_at_step = -1
    # Diagnosis prompts reach ~400 tokens and RERS completions up to its sampling.max_new_tokens (256).
    t.seq_len = 768
    t.batch_size = 8
    t.steps = 150
    t.lr = 1e-3
    t.warmup_steps = 10
    t.schedule = "cosine"
    t.eval_every = 50
    t.eval_batches = 0
    t.log_every = 10
    t.checkpoint_every = 50
    t.keep_checkpoints = 2
    c.probe = config_dict.ConfigDict()
    c.probe.n = 0  # the knowledge probe is a knowledge-SFT measurement
    c.probe.seed = 1234
    c.probe.num_candidates = 0
    c.probe.batch_size = 64
    c.probe.always = False


def get_config(hardware=None):
    return make_config(hardware, _stage)
