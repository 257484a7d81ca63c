"""Evaluation of a checkpoint on held-out simulated notes (and real cases when given): `config.eval.*`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs.base import get_config as base_config  # noqa: E402


def get_config(hardware=None):
    c = base_config(hardware)
    c.stage = "evaluate"
    return c
