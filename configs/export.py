"""Export a run's latest checkpoint to an HF directory: set --config.model.init_from=<run dir>."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs.base import make_config  # noqa: E402


def _stage(c):
    c.stage = "export"
    c.run_dir = "runs/export"
    c.model.init_from = "runs/grpo"


def get_config(hardware=None):
    return make_config(hardware, _stage)
