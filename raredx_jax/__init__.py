"""raredx-jax: train reasoning LLMs to diagnose rare diseases from clinical notes (RareDxR1 recipe) in JAX."""

__version__ = "0.1.0"
