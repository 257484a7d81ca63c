"""Random-initialised transformers (PyTorch CPU) reference models of each family, built locally.

Every parameter (norms and biases too) is drawn at random so a wrong mapping of any tensor shows up.
"""
from __future__ import annotations

import numpy as np
import torch
import transformers

VOCAB = 128
FAMILIES = ("llama", "qwen2", "qwen3")


def hf_config(family: str) -> transformers.PretrainedConfig:
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        # Llama-3 rope scaling with a small original context so the scaling changes the frequencies used here.
        return transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    if family == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if family == "qwen3":
        # head_dim independent of hidden/heads (64/4 = 16).
        return transformers.Qwen3Config(**common, head_dim=24, tie_word_embeddings=False,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    raise ValueError(family)


def build_hf_model(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p) if name.endswith("bias") else 0.08 * torch.randn_like(p))
    return model.eval()


def save_hf_model(family: str, path: str, seed: int = 0) -> transformers.PreTrainedModel:
    model = build_hf_model(family, seed)
    model.save_pretrained(path, safe_serialization=True)
    return model


def hf_logits(model, tokens: np.ndarray, attention_mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                    attention_mask=torch.as_tensor(attention_mask, dtype=torch.long),
                    position_ids=torch.as_tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


def left_padded_batch(seed: int = 0, lengths=(12, 7, 3)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens, mask (1 = real), positions for a left-padded batch of different lengths."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    tokens = np.zeros((len(lengths), t), np.int32)
    mask = np.zeros((len(lengths), t), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, t - n:] = rng.integers(3, VOCAB, n)
        mask[i, t - n:] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return tokens, mask, positions
