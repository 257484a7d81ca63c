"""Verifiable rewards: answer parsing + linking (diagnosis), format/length shaping, the combined GRPO reward
and the RERS leak check."""
from raredx_jax.rewards.combined import (
    DEFAULT_LEAK_PHRASES,
    REWARD_BOUNDS,
    REWARDS,
    RewardContext,
    RewardFn,
    compute_rewards,
    gold_ids,
    leak_check,
    register_reward,
    rewards_config,
)
from raredx_jax.rewards.diagnosis import (
    ParsedAnswer,
    Verification,
    diagnosis_reward,
    normalize_id,
    parse_answer,
    rank_reward,
    verify,
)
from raredx_jax.rewards.format import FormatCheck, check_format, format_reward, length_penalty

__all__ = [
    "DEFAULT_LEAK_PHRASES", "REWARD_BOUNDS", "REWARDS", "RewardContext", "RewardFn", "compute_rewards", "gold_ids",
    "leak_check",
    "register_reward", "rewards_config", "ParsedAnswer", "Verification", "diagnosis_reward", "normalize_id",
    "parse_answer", "rank_reward", "verify", "FormatCheck", "check_format", "format_reward", "length_penalty",
]
