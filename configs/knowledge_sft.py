"""Knowledge internalization (stage 1 of RareDxR1): SFT on the rare-disease knowledge corpus.

`python -m raredx_jax.train --config=configs/knowledge_sft.py` trains the tiny preset on the embedded corpus
(built in-process on first use, like `python -m raredx_jax.data.build --config=configs/data.py`) and ends with
the knowledge probe (held-out phrasings, closed choice over the trained diseases, beside chance).
A real base: `--config.model.hf_path=DIR --config.tokenizer.kind=hf` (and a hardware target, e.g.
`--config=configs/knowledge_sft.py:gpu1`).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.base import get_config as base_config  # noqa: E402


def get_config(hardware=None):
    c = base_config(hardware)
    c.stage = "knowledge_sft"
    c.run_dir = "runs/knowledge_sft"
    t = c.train
    t.dataset = "knowledge"
    t.build_data = True  # build (or check up to date) the embedded data in-process, as data.build would
    t.data_dir = ""  # "" = data.dir
    t.train_split = "train"
    t.eval_split = "validation"
    t.eval_holdout_fraction = 0.05  # used only when the dataset has no eval split
    t.eval_at_start = True
    t.async_checkpointing = True
    t.debug_nan_at_step = -1  # tests: poison this step's loss to exercise the NaN guard
    # The worked exemplars of the corpus are ~380 tokens (up to 512: system prompt + note + reasoning + answer)
    # and the worked RERS reflections ~610 (up to 751: + a failed attempt and the reflection instructions): at
    # 256 every one of them loses its <answer>. Raise seq_len to 768 where the hardware target set less (cpu:
    # 16 x 256 -> 6 x 768).
    if t.seq_len < 768:
        t.batch_size = max(1, -(-t.batch_size * t.seq_len // 768))
        t.seq_len = 768
    # Embedded default (16 diseases x 12 core findings; 400 items, ~103k tokens a pass, ~37k of them targets):
    # enough passes that the tiny model learns the diseases (README, Results, for what it reaches and how fast).
    t.steps = 300  # ~13 passes over the corpus at 4.6k tokens per step
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 10
    c.optim.schedule = "cosine"
    t.eval_every = 50
    t.eval_batches = 0  # 0 = the whole held-out split (single process)
    t.log_every = 10
    t.checkpoint_every = 100
    t.keep_checkpoints = 2
    # Knowledge probe after training (evaluation/knowledge_probe.py, ProbeSettings; items from data/knowledge.py
    # knowledge_probe): held-out phrasings, every trained disease as a candidate (num_candidates 0 = all), ranked
    # by the log-likelihood of the name.
    c.probe.n = 120
    return c
