"""One Flax NNX decoder for the Llama / Qwen2 / Qwen3 families, with presets and HF config mapping."""
from raredx_jax.models.config import PRESETS, ModelConfig, model_config_from
from raredx_jax.models.transformer import KVCache, Transformer

__all__ = ["PRESETS", "ModelConfig", "model_config_from", "KVCache", "Transformer"]
