"""Evaluation of a checkpoint on held-out simulated notes (and real cases when given): `config.eval.*`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs.base import make_config  # noqa: E402


def _stage(c):
    c.stage = "evaluate"


def get_config(hardware=None):
    return make_config(hardware, _stage)
