"""Settings of the SFT stages (`config.train`), apart from the stage so `configs/base.py` can build the section
from them without importing the data pipeline."""
from __future__ import annotations

import dataclasses

#: train.dataset values (data/pipeline.py DATASETS maps them to TFDS names).
DATASETS = ("knowledge", "rers_trajectories")


@dataclasses.dataclass(frozen=True)
class SFTSettings:
    """`config.train`: what the SFT stages read besides the optimiser (`config.optim`, training/optim.py);
    configs/base.py builds the section from these defaults."""

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


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
    """`config.probe` (evaluation/knowledge_probe.py): n items (0 = no probe), their seed, candidates per item (0 =
    every trained disease), rows per forward pass, and whether a non-knowledge SFT run probes too."""

    n: int = 0
    seed: int = 1234
    num_candidates: int = 0
    batch_size: int = 64
    always: bool = False
