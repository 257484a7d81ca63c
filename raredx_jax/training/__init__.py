"""Training stages: SFT (knowledge, RERS trajectories), RERS sampling, GRPO with the dual-level curriculum.

The skeleton every trainer runs on is ``loop`` (``Trainer`` + ``Hooks``); ``common`` holds the stage errors and
commands, ``settings`` the one settings style. Stages: ``sft`` (on ``lm``'s loss and steps), ``rers`` (+ its
``rers_journal``), ``grpo/`` (settings, update, learner, evaluation, driver) with ``rl_objectives`` (advantage
estimators and losses, registered by name), ``rollout`` and ``curriculum``. docs/ARCHITECTURE.md has the map.
"""
