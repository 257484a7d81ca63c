"""Parallelism: multi-process start-up (`distributed`), device meshes and logical-axis sharding rules."""
