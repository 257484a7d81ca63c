"""The one training entry point: `python -m raredx_jax.train --config=configs/<stage>.py [--config.x=y ...]`.

Dispatches on `config.stage` through `STAGES` (stage -> "module:function"); a stage function takes the
resolved ConfigDict and returns a summary dict. A later stage registers by adding one line here. A hardware
target composes with any stage: `--config=configs/knowledge_sft.py:h100x8`.

Exit status: 0 on success; 2 for a bad config or a missing input: an unknown or mistyped `--config.x=y` field, a
config file that does not load, a value a stage refuses, an input not built yet (the message names the field or
the stage to run first), a run dir whose checkpoints hold another model or are all damaged, a run dir that cannot
be written; 3 when training stopped on a non-finite loss (the last good checkpoint is kept); 1 for an unexpected
failure (a traceback). Errors of exit 2 and 3 are one line `train: error: ...` on stderr; RAREDX_TRACEBACK=1
raises them instead, with the traceback.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import sys
from typing import Any, Callable

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from raredx_jax.checkpoints.manager import CheckpointError
from raredx_jax.parallel.distributed import maybe_initialize
from raredx_jax.training.common import MissingInputError, NonFiniteLossError

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

    fn = resolve_stage(config.stage)
    maybe_initialize(config)
    return fn(config)


def fail(message: Any, code: int = 2) -> None:
    """Print `train: error: <message>` as one line on stderr and exit with `code`."""
    print(f"train: error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(code)


def one_line(message: Any) -> str:
    """An error message as one line; a message that embeds a traceback (a config file that raised while loading)
    is reduced to where it happened and the exception's own message."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if any(ln.startswith("Traceback (most recent call last)") for ln in lines):
        head = lines[0].split(": Error whilst parsing config file", 1)[0].rstrip(":")
        last = re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])
        lines = [f"{head}: {last}"] if head and not head.startswith("Traceback") else [last]
    return " ".join(lines)


def _config_overrides(argv: list[str]) -> list[str]:
    """The dotted fields of the `--config.a.b=value` arguments, in order."""
    out = []
    for a in argv[1:]:
        if a.startswith(("--config.", "-config.")):
            out.append(a.lstrip("-").split("=", 1)[0][len("config."):])
    return out


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with the CLI's error contract: a bad flag or config override is one line, exit 2.

    ml_collections raises KeyError / AttributeError (not a flags error) for an override of a field the config does
    not have, which absl would print as a traceback with exit 1.
    """
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        if os.environ.get("RAREDX_TRACEBACK"):
            raise
        fail(one_line(e) + (" (see --helpshort)" if isinstance(e, flags.UnrecognizedFlagError) else ""))
    except (KeyError, AttributeError) as e:
        if os.environ.get("RAREDX_TRACEBACK"):
            raise
        inner = e.args[0] if e.args else e
        text = inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
        first, *hint = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
        key = first.strip("'\"")
        bad = [o for o in _config_overrides(argv) if key in o.split(".")]
        where = f"--config.{bad[0]}" if bad else "--config"
        fail(f"{where}: the config has no field {key!r}{' (' + hint[0] + ')' if hint else ''}; the fields are "
             "those of configs/base.py and the stage's config file, and no field is created by an override")
    return []  # not reached


def _config_path(argv: list[str]) -> str:
    for a in argv[1:]:
        if a.startswith(("--config=", "-config=")):
            return a.split("=", 1)[1]
    return "?"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments: {argv[1:]} (use --config.x=y to override fields)")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
    try:
        config = _CONFIG.value
        if config is not None:
            config.get("stage")  # ml_collections defers the error of a config file that did not load to first use
    except OSError as e:
        if os.environ.get("RAREDX_TRACEBACK"):
            raise
        reason = [ln.strip() for ln in str(e).splitlines() if ln.strip()][-1]
        fail(f"--config={_config_path(sys.argv)}: the config file did not load ({reason})")
    if config is None:
        fail("--config is required, e.g. --config=configs/knowledge_sft.py")
    run_cli(config)


def run_cli(config: Any) -> None:
    """`run(config)` with the CLI's error contract (module docstring): prints the summary as one JSON line; a bad
    config or missing input is one line on stderr, exit 2; a non-finite loss, exit 3."""

    try:
        summary = run(config)
    except NonFiniteLossError as e:
        if os.environ.get("RAREDX_TRACEBACK"):
            raise
        fail(e, 3)
    # CheckpointError: every checkpoint of the run dir is damaged (they were moved aside; the line says what to do)
    except (MissingInputError, FileNotFoundError, PermissionError, ValueError, CheckpointError) as e:
        if os.environ.get("RAREDX_TRACEBACK"):
            raise
        fail(e, 2)
    if summary is not None:
        print(json.dumps({"summary": summary}, default=str), flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
