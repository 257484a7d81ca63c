"""Helpers around the AOT plan (raredx_jax/plan.py): the README table generator (`table.py`)."""
