"""Sampling: one jit-compiled prefill + `lax.while_loop` decode over a donated KV cache (static batches, or
continuously refilled slots), and a text-level API."""
from raredx_jax.sampling.continuous import RowResult, generate_continuous
from raredx_jax.sampling.sampler import (
    GenerateOutput,
    Sampler,
    SamplingParams,
    bucket_length,
    generate,
    left_pad,
    sample_from_logits,
    sample_keys,
    truncation_mask,
)
from raredx_jax.sampling.text import Completion, generate_text

__all__ = ["Completion", "GenerateOutput", "Sampler", "SamplingParams", "bucket_length", "generate", "generate_text",
           "generate_continuous", "left_pad", "RowResult", "sample_from_logits", "sample_keys", "truncation_mask"]
