"""The one training entry point: `python -m raredx_jax.train --config=configs/<stage>.py [--config.x=y ...]`.

Dispatches on `config.stage` through `STAGES` (stage -> "module:function"); a stage function takes the
resolved ConfigDict and returns a summary dict. A later stage registers by adding one line here. A hardware
target composes with any stage: `--config=configs/knowledge_sft.py:h100x8`.

Exit status: 0 on success, 2 for a bad config or a missing input (the message names the field or the stage to
run first), 3 when training stopped on a non-finite loss (the last good checkpoint is kept).
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from typing import Any, Callable

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

# stage -> "module:function(config) -> dict". Add a line to register a stage.
STAGES: dict[str, str] = {
    "knowledge_sft": "raredx_jax.training.sft:run_sft",
    "sft": "raredx_jax.training.sft:run_sft",
    "grpo": "raredx_jax.training.grpo:run_grpo",
    "rers": "raredx_jax.training.rers:run_rers",
    "evaluate": "raredx_jax.evaluate:run_evaluate_stage",
    "export": "raredx_jax.export:run_export",
    "pipeline": "raredx_jax.pipeline:run_pipeline",
}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Stage config file, e.g. configs/knowledge_sft.py (optionally :<hardware target>)",
    lock_config=True)


def resolve_stage(stage: str) -> Callable[[Any], dict]:
    """The function registered for `stage`; ValueError listing the known stages otherwise."""
    if stage not in STAGES:
        raise ValueError(f"config.stage={stage!r} is not a training stage; known stages: "
                         f"{', '.join(sorted(STAGES))} (each has configs/<stage>.py)")
    module_name, _, fn_name = STAGES[stage].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise ValueError(f"stage {stage!r} is registered as {STAGES[stage]} but {module_name} does not exist "
                             "(not implemented yet)") from e
        raise
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"stage {stage!r}: {module_name} has no function {fn_name!r}")
    return fn


def run(config: Any) -> dict:
    """Run the stage `config.stage` in this process (jax.distributed is started first when configured)."""
    from raredx_jax.parallel.distributed import maybe_initialize

    fn = resolve_stage(config.stage)
    maybe_initialize(config)
    return fn(config)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]} (use --config.x=y to override fields)")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
    config = _CONFIG.value
    if config is None:
        sys.exit("train: --config is required, e.g. --config=configs/knowledge_sft.py")
    from raredx_jax.training.sft import MissingInputError, NonFiniteLossError

    try:
        summary = run(config)
    except NonFiniteLossError as e:
        print(f"train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    except (MissingInputError, FileNotFoundError, ValueError) as e:
        if os.environ.get("RAREDX_TRACEBACK"):
            raise
        print(f"train: error: {e}\n(set RAREDX_TRACEBACK=1 for the traceback)", file=sys.stderr, flush=True)
        sys.exit(2)
    if summary is not None:
        print(json.dumps({"summary": summary}, default=str), flush=True)


if __name__ == "__main__":
    app.run(main)
