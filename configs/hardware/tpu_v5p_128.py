"""TPU v5p-128 pod slice: 128 TensorCores = 64 chips (megacore: one JAX device per chip), 4 chips per host
-> 16 hosts, 95 GB HBM per chip, 3D-torus ICI (4x4x4).

Sized for 7-8B bases: Adam state 128 GB FSDP-sharded over 64 chips = 2 GB per chip, so pure FSDP over the
whole slice (ICI all-gathers are cheap) and no tensor parallelism.
  batch 256 x 4096 = 1M tokens per step -> 4 sequences = 16k tokens per chip:
    remat="full": 256 KB/token -> 4 GB; logits 16k x 128k x 4 B = 8.4 GB (+ cotangent) -> ~17 GB;
  => ~25 GB of 95 GB; "dots" would also fit (~65 GB) and is faster: try --config.model.remat=dots.
Splash attention (Pallas) is the TPU flash-attention kernel. Every host runs the same command
(launch/tpu_pod.sh) and jax.distributed.initialize() finds the coordinator from the TPU metadata.
"""
from raredx_jax.hardware import set_target

DESCRIPTION = "TPU v5p-128 (64 chips, 16 hosts, 95 GB HBM), FSDP over the slice, bf16, splash attention"
NUM_DEVICES = 64


def apply(c) -> None:
    # Mesh: the default fsdp=-1 = all 64 chips; train batch 256 = 4 per chip.
    # Sampling: 512 prompts x 4 samples = 2048 sequences x ~2.5k tokens x 128 KB = ~655 GB over 64 chips = ~10 GB
    # each. Always multi-host: distributed on, jax auto-detects the pod.
    set_target(c, remat="full", attention="splash", seq_len=4096, batch_size=256, sampling_batch_size=512,
               initialize="on")
