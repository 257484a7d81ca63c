"""TPU v6e-256 (Trillium) pod: 256 chips (one TensorCore, one JAX device each), 4 chips per host -> 64 hosts,
32 GB HBM per chip, 2D-torus ICI (16x16).

HBM per chip is a third of v5p's, so the budget is per-chip tight while the slice is wide:
  Adam state of an 8B model, 128 GB, FSDP over 256 chips = 0.5 GB per chip.
  batch 512 x 4096 = 2M tokens per step -> 2 sequences = 8k tokens per chip:
    remat="full": 256 KB/token -> 2 GB; logits 8k x 128k x 4 B = 4.2 GB (+ cotangent, bf16 copy) -> ~12 GB;
  => ~16 GB of 32 GB with room for the all-gathered layer weights (8B / 32 layers x 2 B = 0.5 GB) in flight.
FSDP over the whole slice, as maxtext does for 8B models on v6e-256; splash attention; jax.distributed
auto-detected from the TPU metadata (launch/tpu_pod.sh runs the command on all 64 workers).
"""
from raredx_jax.hardware import set_target

DESCRIPTION = "TPU v6e-256 (256 chips, 64 hosts, 32 GB HBM), FSDP over the slice, bf16, splash attention"
NUM_DEVICES = 256


def apply(c) -> None:
    # Mesh: the default fsdp=-1 = all 256 chips; train batch 512 = 2 per chip.
    # Sampling: 1024 prompts x 4 samples = 4096 sequences x ~2.5k tokens x 128 KB = ~1.3 TB over 256 chips = ~5 GB
    # each.
    set_target(c, remat="full", attention="splash", seq_len=4096, batch_size=512, sampling_batch_size=1024,
               initialize="on")
