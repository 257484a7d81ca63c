"""Training stages: SFT (knowledge, RERS trajectories), RERS sampling, GRPO with the dual-level curriculum.

Modules: ``rl_objectives`` (pure-JAX advantage estimators and policy losses, registered by name),
``curriculum`` (case-level pass-rate sampling + task-level lesson promotion, JSON checkpointable).
"""
