"""What every stage driver shares: the error classes the CLI maps to exit codes, the commands that build each
stage's inputs, the run directory's resolved config and summary, and the model a run starts from.

Why one module: the SFT, RERS and GRPO drivers, `train.py` and `export.py` all need these; keeping them here
means no stage imports another stage's module (or its private helpers) to get them.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
from jax.experimental import multihost_utils

from raredx_jax.checkpoints import hf_io
from raredx_jax.checkpoints import orbax as orbax_io
from raredx_jax.checkpoints.manager import TrainCheckpointManager
from raredx_jax.fileio import atomic_file
from raredx_jax.models.config import ModelConfig, model_config_from
from raredx_jax.training.resume_guard import check_model_shape, check_resume

log = logging.getLogger(__name__)

#: The command that produces each stage's output (named in the errors of the stage that needs it).
STAGE_COMMANDS = {
    "data": "python -m raredx_jax.data.build --config=configs/data.py",
    "knowledge_sft": "python -m raredx_jax.train --config=configs/knowledge_sft.py",
    "rers": "python -m raredx_jax.train --config=configs/rers.py",
    "rers_sft": "python -m raredx_jax.train --config=configs/rers_sft.py",
}


class MissingInputError(FileNotFoundError):
    """An input of this stage does not exist yet; the message names the stage / command to run first (exit 2)."""


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm of a step was NaN/inf; training stopped, the last good checkpoint is kept
    (exit 3)."""


def numerics(config: Any) -> dict[str, Any]:
    """The compute settings of `config.model` a saved model is loaded with (its shape comes from the checkpoint)."""
    m = config.model
    return dict(dtype=m.dtype, param_dtype=m.param_dtype, attention=m.attention, remat=m.remat,
                scan_layers=bool(m.scan_layers))


def sync(name: str) -> None:
    """A barrier across processes (no-op in one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def resolve_init_checkpoint(init_from: str, produced_by: str = "knowledge_sft") -> str:
    """The checkpoint `model.init_from` names; MissingInputError naming the stage that produces it otherwise."""
    try:
        return orbax_io.resolve_model_checkpoint(init_from)
    except FileNotFoundError as e:
        raise MissingInputError(
            f"model.init_from={init_from!r}: {e}. Train the earlier stage first, e.g. "
            f"`{STAGE_COMMANDS[produced_by]}` (its run_dir is what init_from should name)") from None


def initial_model_config(config: Any, vocab_size: int | None) -> ModelConfig:
    """ModelConfig of the model a fresh run starts from (init_from checkpoint, HF dir or preset)."""
    if config.model.init_from:
        return orbax_io.read_model_config(resolve_init_checkpoint(config.model.init_from), **numerics(config))
    return model_config_from(config, vocab_size)


def load_initial_model(config: Any, mesh: jax.sharding.Mesh, model_cfg: ModelConfig) -> Any:
    """The starting model: `model.init_from` (orbax, a previous stage) > `model.hf_path` > fresh init."""
    if config.model.init_from:
        path = resolve_init_checkpoint(config.model.init_from)
        print(f"[{config.stage}] starting from checkpoint {path}", flush=True)
        return orbax_io.load_model(path, mesh, **numerics(config))
    if config.model.hf_path:
        print(f"[{config.stage}] starting from HF model {config.model.hf_path}", flush=True)
        return hf_io.load_hf_model(config.model.hf_path, mesh, cfg=model_cfg, progress=jax.process_index() == 0)
    print(f"[{config.stage}] starting from a fresh {config.model.preset} model (seed {config.seed})", flush=True)
    return hf_io.init_model(model_cfg, mesh, seed=int(config.seed))


def write_resolved_config(config: Any, run_dir: str) -> None:
    """Write `<run_dir>/config.json`; first refuse (ModelChangedError) a run dir whose checkpoints hold another
    model than the config names: another source than the old config.json records, or another shape."""
    check_resume(config, run_dir)
    if jax.process_index() != 0:
        return
    with atomic_file(os.path.join(run_dir, "config.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def resume_model_config(ckpt: TrainCheckpointManager, config: Any) -> ModelConfig | None:
    """ModelConfig recorded in the newest readable step (numerics from the current config); ModelChangedError when
    its shape differs from the model the config asks for (another preset, vocab_size, HF dir or init checkpoint)."""
    for step in reversed(ckpt.steps()):
        try:
            saved = orbax_io.read_model_config(ckpt.step_dir(step), **numerics(config))
        except Exception as e:  # noqa: BLE001 - a damaged step; restore() reports and skips it
            log.warning("cannot read model_config of %s: %s", ckpt.step_dir(step), e)
            continue
        check_model_shape(saved, config, ckpt.step_dir(step))
        return saved
    return None


def write_json(path: str, payload: Any) -> None:
    """Write `payload` as indented JSON atomically (a reader sees the old file or the whole new one)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=str)


def check_vocab(tokenizer: Any, model_cfg: ModelConfig, source: str) -> None:
    """Refuse a tokenizer with more ids than the model's embedding has rows."""
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{model_cfg.vocab_size} (tokenizer.path / {source} mismatch)")
