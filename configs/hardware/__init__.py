"""Hardware targets (one module per machine shape); loaded by raredx_jax.hardware.apply_hardware by file path."""
