"""SFT on RERS trajectories (stage 3 of RareDxR1): `python -m raredx_jax.train --config=configs/sft.py`.

Starts from the knowledge-SFT run (`model.init_from`, a run dir or checkpoint) and trains on the verified
trajectories the RERS stage wrote (`raredx_rers_trajectories` under `train.data_dir`, default `data.dir`).
Missing inputs fail with the command to run first (knowledge SFT, then RERS).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.base import make_config  # noqa: E402


def stage(c):
    """The SFT-on-trajectories settings; configs/rers_sft.py builds on them."""
    c.stage = "sft"
    c.run_dir = "runs/sft"
    c.model.init_from = "runs/knowledge_sft"
    t = c.train
    t.dataset = "rers_trajectories"
    t.build_data = False
    t.data_dir = ""  # "" = data.dir (where the RERS stage writes its trajectory dataset)
    t.train_split = "train"
    t.eval_split = "validation"
    t.eval_holdout_fraction = 0.05  # used only when the trajectory set has no validation split
    t.eval_at_start = True
    t.async_checkpointing = True
    t.debug_nan_at_step = -1
    t.steps = 150
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10
    c.optim.schedule = "cosine"
    t.eval_every = 50
    t.eval_batches = 0
    t.log_every = 10
    t.checkpoint_every = 50
    t.keep_checkpoints = 2
    c.probe.n = 0  # the knowledge probe is a knowledge-SFT measurement; set n > 0 and always=True to run it here

def get_config(hardware=None):
    return make_config(hardware, stage)
