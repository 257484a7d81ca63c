"""CPU: a laptop, a CI runner, or tests with XLA_FLAGS=--xla_force_host_platform_device_count=8.

Runs the embedded tiny model end to end on 2 cores in minutes. float32 everywhere: CPUs have no fast bf16
matmul (XLA:CPU emulates it) and the tests compare against transformers in float32. The plain XLA attention
is the reference implementation. No remat: activations of the tiny model are a few MB.
"""

DESCRIPTION = "CPU (laptop / CI / forced host devices), tiny model, float32, XLA attention"
NUM_DEVICES = None  # 1 on a laptop, 8 under the tests' forced host devices; the mesh takes whatever is there


def apply(c) -> None:
    # Every CPU device on the fsdp axis: with 8 forced host devices the tests shard parameters for real.
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat = "none"
    c.model.attention = "xla"
    # 16 x 256 tokens: ~4k tokens per step keeps a tiny-model step well under a second on 2 cores.
    c.train.batch_size = 16
    c.train.seq_len = 256
    c.sampling.batch_size = 32  # divides 1 and 8 devices
    # auto: single process unless RAREDX_* / SLURM variables say otherwise (the 2-process loopback test
    # sets RAREDX_COORDINATOR / RAREDX_NUM_PROCESSES / RAREDX_PROCESS_ID).
    c.distributed.initialize = "auto"
