"""Refuse to resume a run directory with another model than the one its checkpoints hold.

A trainer resumes whenever `<run_dir>/checkpoints` has a step, and the model it resumes is the one in that step,
whatever the config now says. Rerunning a run dir with another `model.hf_path`, `model.preset` or
`model.vocab_size` (or an init checkpoint / HF directory of another shape) would therefore continue the old model
silently. Two checks, called by `training/common.py` for every stage on the `Trainer` (SFT, GRPO) and by RERS:

* `check_model_source(config, run_dir)`: the model source of the run's previous `config.json` (written by the
  run that made the checkpoints) against the current config: `model.init_from` (set or not), `model.hf_path`,
  and for a preset `model.preset` and `model.vocab_size`. Only the fields that pick the model count: numerics
  (`model.dtype`, `remat`, `attention`, ...) may change on resume, and so may the path of `model.init_from`
  when it still names a model of the same shape (a moved run dir), which the second check covers.
* `check_model_shape(saved, config, where)`: the shape recorded in the checkpoint against the shape the config
  would build now (the init checkpoint's, the HF directory's `config.json`, or the preset's).

`check_resume(config, run_dir)` runs both before the trainer rewrites config.json (`sft._write_resolved_config`),
so a refused run leaves the record of the old model in place and the old settings still resume.

Both raise ModelChangedError (a ValueError: `python -m raredx_jax.train` prints it as one line, exit 2) naming
every field that differs, old -> new.
"""
from __future__ import annotations

import json
import os
from typing import Any

from raredx_jax.checkpoints import orbax as orbax_io
from raredx_jax.models.config import model_config_from

SHAPE_FIELDS = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                "num_kv_heads", "head_dim", "rope_theta", "rope_scaling", "rms_norm_eps", "tie_word_embeddings",
                "attention_bias", "qk_norm", "max_position_embeddings")
UNSET = "(unset)"


class ModelChangedError(ValueError):
    """The run dir's checkpoints hold another model than the config asks for; resuming would train the old one."""


def _get(section: Any, key: str, default: Any = None) -> Any:
    try:
        v = section.get(key, default)
    except AttributeError:
        return default
    return default if v is None else v


def _norm_path(p: str) -> str:
    return os.path.realpath(os.path.expanduser(p)) if p else ""


def model_source(model: Any) -> dict[str, Any]:
    """The fields of a `model` config section (ConfigDict or the dict of a config.json) that pick the model."""
    init_from = str(_get(model, "init_from", "") or "")
    if init_from:
        return {"model.init_from": init_from}
    hf_path = str(_get(model, "hf_path", "") or "")
    preset = str(_get(model, "preset", "") or "")
    if hf_path or preset == "hf":
        return {"model.hf_path": hf_path}
    return {"model.preset": preset, "model.vocab_size": int(_get(model, "vocab_size", 0) or 0)}


def source_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`field: old -> new` for each model-source field that differs (paths compared resolved)."""
    diff = []
    for k in list(old) + [k for k in new if k not in old]:
        a, b = old.get(k, UNSET), new.get(k, UNSET)
        if k == "model.init_from" and a != UNSET and b != UNSET:
            continue  # another path to a model of the same shape is allowed; check_model_shape compares shapes
        same = (_norm_path(a) == _norm_path(b)) if (k == "model.hf_path" and UNSET not in (a, b)) else a == b
        if not same:
            diff.append(f"{k}: {_show(a)} -> {_show(b)}")
    return diff


def _show(v: Any) -> str:
    return v if v == UNSET else repr(v)


def _step_dirs(run_dir: str) -> list[str]:
    """The run's checkpoint step dirs, newest first."""
    d = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(d):
        return []
    steps = sorted((int(x) for x in os.listdir(d) if x.isdigit() and os.path.isdir(os.path.join(d, x))), reverse=True)
    return [os.path.join(d, str(s)) for s in steps]


def check_resume(config: Any, run_dir: str) -> None:
    """Both checks for a run dir about to be resumed (nothing to check without a checkpoint). Called before the
    trainer rewrites `<run_dir>/config.json`, so a refused run leaves the record of the old model in place."""
    steps = _step_dirs(os.path.abspath(run_dir))
    if not steps:
        return
    check_model_source(config, run_dir)

    for step in steps:
        try:
            saved = orbax_io.read_model_config(step)
        except Exception:  # noqa: BLE001 - a damaged step: the trainer's restore reports and skips it
            continue
        check_model_shape(saved, config, step)
        return


def check_model_source(config: Any, run_dir: str) -> None:
    """ModelChangedError when `run_dir` has checkpoints and its previous config.json picked another model."""
    run_dir = os.path.abspath(run_dir)
    path = os.path.join(run_dir, "config.json")
    if not _step_dirs(run_dir) or not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError):
        return  # an unreadable record: check_model_shape still compares the checkpoint itself
    if not isinstance(old, dict) or not isinstance(old.get("model"), dict):
        return
    diff = source_differences(model_source(old["model"]), model_source(config.model))
    if diff:
        raise ModelChangedError(_message(f"{run_dir}/checkpoints holds a model trained from another model source",
                                         diff, run_dir))


def expected_shape(config: Any) -> dict[str, Any] | None:
    """The shape fields of the model the config would start from now; None when it cannot be read (then there
    is nothing to compare). A `tiny` preset without `model.vocab_size` takes its vocabulary from the tokenizer,
    which the checkpoint's tokenizer digest check covers, so vocab_size is left out then."""

    m = config.model
    try:
        if _get(m, "init_from", ""):
            cfg = orbax_io.read_model_config(orbax_io.resolve_model_checkpoint(str(m.init_from)))
        else:
            cfg = model_config_from(config, None)
    except Exception:  # noqa: BLE001 - a missing init / HF dir: the source check above still applies
        return None
    shape = {f: getattr(cfg, f) for f in SHAPE_FIELDS}
    if not _get(m, "init_from", "") and not (_get(m, "hf_path", "") or _get(m, "preset", "") == "hf") \
            and not int(_get(m, "vocab_size", 0) or 0):
        shape.pop("vocab_size")
    return shape


def check_model_shape(saved: Any, config: Any, where: str) -> None:
    """ModelChangedError when the ModelConfig `saved` in checkpoint `where` has another shape than the config's."""
    want = expected_shape(config)
    if want is None:
        return
    diff = [f"{k}: {getattr(saved, k)!r} -> {v!r}" for k, v in want.items() if getattr(saved, k) != v]
    if diff:
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(where)))
        raise ModelChangedError(_message(f"{where} holds a model of another shape than the config asks for "
                                         f"({_describe(config.model)})", diff, run_dir))


def _describe(model: Any) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in model_source(model).items())


def _message(what: str, diff: list[str], run_dir: str) -> str:
    shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
    return (f"resume refused: {what} ({shown}); resuming would continue the old model. Use a new run_dir, "
            f"delete {os.path.join(run_dir, 'checkpoints')} to start over, or rerun with the old settings")
