"""SFT on the RERS trajectories (stage 3 of RareDxR1): `python -m raredx_jax.train --config=configs/rers_sft.py`.

Starts from the knowledge-SFT checkpoint (`model.init_from`) and trains on `raredx_rers_trajectories` found
in `train.data_dir` = the RERS run's `rers.out_dir` (default `runs/rers/trajectories`), splits train +
validation. The prompt (the original diagnosis prompt) is never a target; only the verified completion is.
Run knowledge SFT, then `python -m raredx_jax.train --config=configs/rers.py`, then this.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs.base import make_config  # noqa: E402
from configs.sft import stage as sft_stage  # noqa: E402


def _stage(c):
    sft_stage(c)  # everything else as configs/sft.py
    c.run_dir = "runs/rers_sft"
    t = c.train
    t.data_dir = "runs/rers/trajectories"  # TFDS data_dir the RERS stage wrote (its rers.out_dir)
    # Diagnosis prompts reach ~400 tokens and RERS completions up to its sampling.max_new_tokens (256).
    t.seq_len = 768
    t.batch_size = 8
    # The embedded default keeps ~100-200 trajectories (~60k tokens): a few passes at a gentle rate fit the
    # model to its own verified reasoning without wiping the knowledge stage (150 steps at 1e-3 overfit:
    # held-out loss 0.42 -> 1.73 in an earlier measurement).
    t.steps = 40
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 4
    t.eval_every = 20
    t.checkpoint_every = 20


def get_config(hardware=None):
    return make_config(hardware, _stage)
