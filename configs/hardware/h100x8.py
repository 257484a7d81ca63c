"""One host with 8x H100 80 GB (DGX/HGX, NVLink + NVSwitch); N such hosts under SLURM or plain ssh.

Sized for full fine-tuning of 7-8B bases (llama3.1-8b, qwen2.5-7b, qwen3-8b):
  state of 8B params with Adam and fp32 master weights: 4 + 4 (grads) + 8 (moments) = 16 B/param = 128 GB,
  FSDP-sharded over the host's 8 GPUs -> 16 GB per GPU.
  batch 32 x 4096 = 131k tokens per host step -> 16k tokens per GPU:
    remat="full" keeps only each layer's input: 4096 x 2 B x 32 layers = 256 KB/token -> 4 GB,
    logits 16k x 128k vocab x 4 B = 8.4 GB (+ cotangent) -> ~17 GB,
  => ~40 GB peak, leaving room for the per-layer all-gathers and XLA's temporaries in 80 GB.
  ("dots" remat would keep ~86 KB/token/layer x 32 layers = ~2.7 MB/token = ~45 GB: too close to 80 GB.)
Mesh: FSDP inside the host (NVLink, 900 GB/s) and data parallelism across hosts (InfiniBand): data=-1,
fsdp=8. One host -> data=1; 4 hosts -> data=4 (32 GPUs). The global batch must split over all GPUs:
scale it with the hosts, e.g. --config.train.batch_size=$((32 * NHOSTS)).
"""
from raredx_jax.hardware import set_target

DESCRIPTION = "8x H100 80 GB per host (x N hosts): FSDP in-host, data-parallel across hosts, bf16, cuDNN"
NUM_DEVICES = 8  # per host


def apply(c) -> None:
    # Mesh: one replica per host (data=-1) x the host's 8 GPUs (fsdp=8, NVLink); 8B models need no tensor
    # parallelism at this memory. dot_product = cuDNN flash attention.
    # Sampling: 128 prompts x 4 samples = 512 sequences; 8B KV cache (8 kv heads x 128 x 32 layers x k,v x 2 B)
    # = 128 KB/token: 512 x ~2.5k tokens x 128 KB = ~164 GB over 8 GPUs = ~20 GB each.
    # auto: one host -> single process; under launch/slurm_multigpu.sbatch or launch/ssh_hosts.sh the
    # RAREDX_* variables (or SLURM's own) start jax.distributed.
    set_target(c, data=-1, fsdp=8, tensor=1, remat="full", attention="dot_product", seq_len=4096, batch_size=32,
               sampling_batch_size=128, initialize="auto")
