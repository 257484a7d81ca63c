"""CPU: a laptop, a CI runner, or tests with XLA_FLAGS=--xla_force_host_platform_device_count=8.

Runs the embedded tiny model end to end on 2 cores in minutes. float32 everywhere: CPUs have no fast bf16
matmul (XLA:CPU emulates it) and the tests compare against transformers in float32. The plain XLA attention
is the reference implementation. No remat: activations of the tiny model are a few MB.
"""
from raredx_jax.hardware import set_target

DESCRIPTION = "CPU (laptop / CI / forced host devices), tiny model, float32, XLA attention"
NUM_DEVICES = None  # 1 on a laptop, 8 under the tests' forced host devices; the mesh takes whatever is there


def apply(c) -> None:
    # Every CPU device on the fsdp axis (the default mesh): with 8 forced host devices the tests shard parameters
    # for real. Batch sizes stay as the stage config set them: on CPU each stage picks the scale that runs in
    # minutes. auto: single process unless RAREDX_* / SLURM variables say otherwise (the 2-process loopback test
    # sets RAREDX_COORDINATOR / RAREDX_NUM_PROCESSES / RAREDX_PROCESS_ID).
    set_target(c, dtype="float32", remat="none", attention="xla", initialize="auto")
