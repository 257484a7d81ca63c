"""Settings of the RERS stage (`config.rers`), apart from the stage so `configs/base.py` can build the section from
them without importing the sampler, the model code and the TFDS writer."""
from __future__ import annotations

import dataclasses
from typing import Any

from raredx_jax.training.settings import from_section

KEEP_RULES = ("shortest", "first")
PHASES = ("all", "sample", "merge")


@dataclasses.dataclass(frozen=True)
class RersSettings:
    """The `rers` config section: every field the stage reads, with its one default (configs/base.py builds the
    section from this class; `rers_settings(config)` reads it back and rejects unknown fields)."""

    num_samples: int = 4  # direct-round samples per case
    reflection_tries: int = 4  # reflection-round samples per unsolved case (0 = no reflection round)
    keep_rule: str = "shortest"  # shortest (fewest tokens, ties -> lowest try) | first (lowest try index)
    answer_top_k: int = 5  # the differential size asked for in diagnosis_messages
    split: str = "train"  # raredx_simulated_cases split sampled
    max_cases: int = 0  # 0 = every case of the split (sorted by id), else the first max_cases
    chunk_size: int = 32  # cases per journal commit (the unit of resume and of sharding)
    validation_fraction: float = 0.05  # kept trajectories held out by case-id hash -> split "validation"
    reflection_max_prompt_len: int = 0  # 0 = sampling.max_prompt_len + max_new_tokens + 256
    out_dir: str = ""  # TFDS data_dir of the trajectories; "" = <run_dir>/trajectories
    sampler: str = ""  # "" = the policy (model.init_from); "module:function" = factory(config) -> sample_fn
    phase: str = "all"  # all (sample this shard, then shard 0 merges) | sample | merge
    shard_index: int = -1  # with shard_count > 0: this process's shard (separately launched processes)
    shard_count: int = 0  # 0 = shard over the JAX processes

    def __post_init__(self) -> None:
        self.validate()  # also when built directly (tests, plugins), not only by from_section

    def validate(self) -> None:
        """ValueError naming the first field out of range."""
        if self.keep_rule not in KEEP_RULES:
            raise ValueError(f"rers.keep_rule must be one of {KEEP_RULES}, got {self.keep_rule!r}")
        if self.num_samples < 1:
            raise ValueError(f"rers.num_samples must be >= 1, got {self.num_samples}")
        if self.reflection_tries < 0:
            raise ValueError(f"rers.reflection_tries must be >= 0 (0 = no reflection round), got "
                             f"{self.reflection_tries}")
        if self.answer_top_k < 1:
            raise ValueError(f"rers.answer_top_k must be >= 1, got {self.answer_top_k}")
        if self.phase not in PHASES:
            raise ValueError(f"rers.phase must be one of {PHASES}, got {self.phase!r}")
        if self.chunk_size < 1:
            raise ValueError(f"rers.chunk_size must be >= 1, got {self.chunk_size}")
        if self.shard_count > 0 and not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"rers.shard_index must be in [0, rers.shard_count={self.shard_count}), got "
                             f"{self.shard_index}")


def rers_settings(config: Any) -> RersSettings:
    """`config.rers` as RersSettings (ValueError naming an unknown or mistyped field)."""
    return from_section(RersSettings, config.rers, "rers")
