"""Orbax model checkpoints: one layout for standalone converted models and trainer step directories.

A *model checkpoint* is a directory with two orbax items: `params` (the NNX parameter state, saved sharded by
every process) and `model_config` (JSON: the ModelConfig fields). The SFT/GRPO trainers' CheckpointManager
step directories use the same two items plus their own (optimizer, step, RNG, data iterator), so every
consumer (`init_from`, evaluate, diagnose, export) loads any of them with `load_model`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from raredx_jax import fileio
from raredx_jax.checkpoints.hf_io import PICKLE_SUFFIXES, abstract_model, pickle_refused, pickle_weights
from raredx_jax.models.config import ModelConfig
from raredx_jax.models.transformer import Transformer
from raredx_jax.parallel.sharding import DEFAULT_RULES

PARAMS_ITEM = "params"
CONFIG_ITEM = "model_config"
META_ITEM = "meta"  # the trainers' JSON item (checkpoints/manager.py): stage, data, tokenizer digest, ...


def model_config_to_json(cfg: ModelConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    if cfg.rope_scaling is not None:
        d["rope_scaling"] = [list(kv) for kv in cfg.rope_scaling]
    if isinstance(cfg.eos_token_id, tuple):
        d["eos_token_id"] = list(cfg.eos_token_id)
    return d


def model_config_from_json(d: dict[str, Any], **overrides: Any) -> ModelConfig:
    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = tuple(tuple(kv) for kv in d["rope_scaling"])
    if isinstance(d.get("eos_token_id"), list):
        d["eos_token_id"] = tuple(d["eos_token_id"])
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"model_config: unknown field(s) {unknown}")
    d.update({k: v for k, v in overrides.items() if v is not None})
    return ModelConfig(**d)


def params_state(model: Transformer) -> Any:
    """The pure (array-only) parameter tree orbax stores."""
    return nnx.state(model, nnx.Param).to_pure_dict()


def save_model(path: str, model: Transformer, *, overwrite: bool = False, src: str | None = None,
               what: str = "model checkpoint directory", overwrite_hint: str = "pass overwrite=True to replace it",
               extra: Callable[[str], Any] | None = None) -> str:
    """Save a standalone model checkpoint as a unit (`fileio.atomic_directory`): a non-empty `path` is refused
    unless `overwrite` (orbax's own `force=True` used to delete whatever was there, the source model included
    when `path` was the source), and `path` is replaced only after the new checkpoint is complete.
    `extra(tmp_dir)` may add files (e.g. `tokenizer/`) before the directory is published."""

    path = os.path.abspath(path)
    primary = jax.process_index() == 0
    fileio.check_destination(src, path, overwrite, what=what, overwrite_hint=overwrite_hint)
    barrier = None
    if jax.process_count() > 1:
        barrier = multihost_utils.sync_global_devices
    with fileio.atomic_directory(path, overwrite, what=what, overwrite_hint=overwrite_hint, barrier=barrier,
                                 primary=primary) as tmp:
        # force=True only ever deletes `tmp`: our own fresh, empty temporary directory (orbax refuses an existing
        # path otherwise); orbax then writes its own temporary directory and renames it to `tmp`.
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(tmp, args=ocp.args.Composite(**{
                PARAMS_ITEM: ocp.args.StandardSave(params_state(model)),
                CONFIG_ITEM: ocp.args.JsonSave(model_config_to_json(model.config))}), force=True)
        if extra is not None and primary:
            extra(tmp)
    return path


def read_model_config(path: str, **overrides: Any) -> ModelConfig:
    path = os.path.abspath(path)
    if not os.path.isdir(os.path.join(path, CONFIG_ITEM)):
        raise FileNotFoundError(f"{path}: not a model checkpoint (no '{CONFIG_ITEM}' item); expected a directory "
                                "written by the trainers or `python -m raredx_jax.checkpoints.convert`")
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        meta = ckptr.restore(path, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))
    return model_config_from_json(meta[CONFIG_ITEM], **overrides)


def load_model(path: str, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES, **overrides: Any) -> Transformer:
    """Restore a model checkpoint directly into its shards on `mesh` (numerics overridable, e.g. dtype)."""

    path = os.path.abspath(path)
    if "lora" in read_checkpoint_meta(path):  # a LoRA run's step: its base with the adapters merged in
        from raredx_jax.lora import load_merged_model  # noqa: PLC0415 - cycle: raredx_jax.lora imports this module
        return load_merged_model(path, mesh, **overrides)
    cfg = read_model_config(path, **overrides)
    graphdef, abstract, shardings = abstract_model(cfg, mesh, rules)
    target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                          abstract.to_pure_dict(), shardings.to_pure_dict())
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(path, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(target)}))
    abstract.replace_by_pure_dict(restored[PARAMS_ITEM])
    return nnx.merge(graphdef, abstract)


def latest_checkpoint(ckpt_dir: str) -> str | None:
    """Newest complete step directory under a trainer's checkpoint dir (orbax leaves no partial ones)."""
    if not os.path.isdir(ckpt_dir):
        return None
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit() and os.path.isdir(os.path.join(ckpt_dir, d))]
    return os.path.join(ckpt_dir, str(max(steps))) if steps else None


def resolve_model_checkpoint(path: str) -> str:
    """Accept a model checkpoint, a trainer checkpoint dir (takes the latest step) or a run directory.

    A pickle-based weights file (`pytorch_model.bin`, `*.pt`; given directly or the only weights in the folder) is
    refused with the same message as the HF import and `convert` (hf_io.pickle_refused), not "no checkpoint here".
    """

    path = os.path.abspath(path)
    for cand in (path, latest_checkpoint(path), latest_checkpoint(os.path.join(path, "checkpoints"))):
        if cand and os.path.isdir(os.path.join(cand, CONFIG_ITEM)):
            return cand
    if os.path.isfile(path) and path.endswith(PICKLE_SUFFIXES):
        raise pickle_refused(path)
    pickles = pickle_weights(path)
    if pickles:
        raise pickle_refused(pickles[0])
    raise FileNotFoundError(f"{path}: no model checkpoint here (looked for '{CONFIG_ITEM}' in it, in its latest "
                            "step, and in <path>/checkpoints/<latest step>)")


def read_checkpoint_meta(path: str) -> dict[str, Any]:
    """The JSON `meta` item a trainer wrote beside the model ({} for a standalone model checkpoint)."""

    f = os.path.join(path, META_ITEM, "metadata")
    if not os.path.isfile(f):
        return {}
    try:
        with open(f, encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def check_tokenizer(path: str, tokenizer: Any) -> None:
    """Refuse a tokenizer whose vocabulary differs from the one the checkpoint was trained with.

    Why: the embedded SentencePiece model is retrained whenever the data build changes (a `data.*` setting or the
    generator code), and a model paired with another vocabulary does not fail, it silently emits nonsense
    (measured: held-out top-1 0.60 -> 0.00). Checkpoints written before the digest was recorded pass unchecked.
    """
    want = read_checkpoint_meta(path).get("tokenizer_digest")
    if not want:
        return
    got = tokenizer.digest()
    if got != want:
        raise ValueError(
            f"{path}: this checkpoint was trained with another tokenizer (vocabulary digest {want[:12]}; the "
            f"tokenizer in use, {getattr(tokenizer, 'path', tokenizer)}, has {got[:12]}). The data was probably "
            "rebuilt since (a data.* setting or the generator code changed, which retrains the SentencePiece "
            "model): point data.dir / tokenizer.path (evaluate and diagnose: --tokenizer) at the build the "
            "checkpoint was trained with, or retrain from the first stage.")
