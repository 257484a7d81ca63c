"""Settings of the SFT stages (`config.train`), apart from the stage so `configs/base.py` can build the section
from them without importing the data pipeline."""
from __future__ import annotations

import dataclasses

#: train.dataset values (data/pipeline.py DATASETS maps them to TFDS names).
DATASETS = ("knowledge", "rers_trajectories")


@dataclasses.dataclass(frozen=True)
class SFTSettings:
    """`config.train`: what the SFT stages read (configs/base.py builds the section from these defaults)."""

    dataset: str = "knowledge"  # knowledge | rers_trajectories
    data_dir: str = ""  # "" = data.dir
    build_data: bool = False  # build (or check up to date) the embedded knowledge corpus in-process first
    train_split: str = "train"
    eval_split: str = "validation"
    eval_holdout_fraction: float = 0.0  # > 0 and no eval split: hold out this share of the training records
    steps: int = 300
    batch_size: int = 16  # global, in sequences (packed rows)
    seq_len: int = 256
    grad_accum: int = 1
    pack: bool = True
    # optimiser (training/optim.py)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    # held-out loss, logging, checkpoints
    eval_every: int = 100  # 0 = no held-out loss
    eval_batches: int = 4  # 0 = the whole split (one process)
    eval_at_start: bool = True
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    async_checkpointing: bool = True
    debug_nan_at_step: int = -1  # >= 0: poison that step's loss (tests of the non-finite guard)

    def validate(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"train.steps must be positive, got {self.steps}")
        if self.dataset not in DATASETS:
            raise ValueError(f"train.dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if self.log_every < 1:
            raise ValueError(f"train.log_every must be >= 1, got {self.log_every}")
