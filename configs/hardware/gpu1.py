"""One GPU (A100/H100 40-80 GB, L40S 48 GB): small models (tiny .. qwen2.5-0.5b/1.5b), full fine-tuning.

Memory budget for qwen2.5-0.5b (the largest base this target is sized for), Adam, fp32 master weights:
  params 2 GB + grads 2 GB + Adam moments 4 GB = 8 GB of state.
  batch 8 x 2048 tokens = 16k tokens per step:
    logits 16k x 152k vocab x 4 B = ~10 GB (f32 for the loss) plus their cotangent,
    remat="dots" keeps only matmul outputs: ~25 KB/token/layer x 24 layers x 16k = ~10 GB.
  => ~40 GB peak: fits 48-80 GB cards; on a 24 GB card use --config.model.remat=full and batch_size=4.
bf16 compute (tensor cores) with fp32 master weights. Attention through jax.nn.dot_product_attention, which
takes the cuDNN flash-attention kernel on GPU (falls back to XLA with a message where cuDNN can't).
"""
from raredx_jax.hardware import set_target

DESCRIPTION = "1 GPU (40-80 GB), models up to ~1.5B, bf16 compute, cuDNN attention"
NUM_DEVICES = 1


def apply(c) -> None:
    # Mesh: the default fsdp=-1 = 1 device; kept -1 so the same target also runs on a 2-GPU workstation.
    # Sampling: 64 prompts x rers.num_samples/grpo.group_size 4 = 256 sequences; 0.5B KV cache is 12 KB/token:
    # 256 x ~2.5k tokens x 12 KB = ~8 GB. One process, nothing to coordinate: distributed off.
    set_target(c, remat="dots", attention="dot_product", seq_len=2048, batch_size=8, sampling_batch_size=64,
               initialize="off")
