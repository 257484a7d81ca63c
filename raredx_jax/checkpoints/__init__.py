"""Checkpoint I/O: HF safetensors <-> NNX (hf_io), orbax model checkpoints (orbax), conversion CLI (convert)."""
