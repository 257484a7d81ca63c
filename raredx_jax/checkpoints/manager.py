"""Trainer checkpoints: an orbax CheckpointManager over `<run_dir>/checkpoints/<step>/`, atomic, keep-last-k,
with exact resume and fall-back past a damaged latest checkpoint.

Items of one step directory:
  params        the pure parameter dict (StandardSave)         } the layout of `checkpoints/orbax.py`, so
  model_config  ModelConfig fields (JsonSave)                  } `orbax.load_model(step_dir)` loads any step
  opt_state     the optax state (StandardSave)
  train_state   {"step", "rng"} arrays (StandardSave)
  data_iter     the grain iterator state, one JSON file per process (grain.checkpoint.CheckpointHandler)
  meta          JSON: step, fingerprints of params/opt_state, config digest, wall time, trainer extras
  <extra>       trainer-specific JSON items named at construction (e.g. GRPO's curriculum state)

Atomicity is orbax's: a step is written to a temporary directory and renamed when complete, so a kill during
a save leaves the previous steps intact and no half step. Damage after the fact (a deleted or truncated file,
a disk error) is caught on restore: the step fails to read, or its parameters' fingerprint differs from the
one recorded at save time. Such a step is moved to `<run_dir>/checkpoints_corrupt/` with a warning and the
next older step is tried.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from typing import Any, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from raredx_jax.checkpoints.orbax import CONFIG_ITEM, META_ITEM, PARAMS_ITEM, model_config_to_json

log = logging.getLogger(__name__)

OPT_ITEM = "opt_state"
TRAIN_ITEM = "train_state"
DATA_ITEM = "data_iter"
_DATA_FILE = re.compile(r"process_\d+-of-(\d+)\.json$")  # grain's per-process iterator state files
FINGERPRINT_RTOL = 1e-4  # sums of |x| in fp32 may differ by reduction order when the mesh changes


class CheckpointError(RuntimeError):
    """No restorable checkpoint although some exist (all damaged)."""


class _IterState:
    """What grain's orbax handler needs of an iterator: a frozen snapshot of `it.get_state()`.

    The trainer prefetches the next batch while a step runs, so the live iterator is ahead of the state that
    belongs with the saved parameters; the snapshot taken right after fetching the last trained batch is saved.
    """

    def __init__(self, state: Any = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state, indent=1).encode()

    def set_state(self, raw: bytes) -> None:
        self.state = json.loads(raw.decode() if isinstance(raw, bytes) else raw)

    def start_prefetch(self) -> None:  # called by grain's handler after set_state
        pass


@dataclasses.dataclass
class Restored:
    step: int
    state: Any  # TrainState (or whatever target pytree was given)
    data_state: Any  # the grain iterator state of this process, or None
    meta: dict[str, Any]
    model_config: dict[str, Any]
    extras: dict[str, Any]
    path: str


_fingerprint_jit = None


def fingerprint(tree: Any) -> float:
    """sum |x| over every float leaf (fp32): a cheap check that restored arrays are the saved ones."""
    global _fingerprint_jit
    if _fingerprint_jit is None:
        def f(t):
            leaves = [x for x in jax.tree.leaves(t) if jnp.issubdtype(x.dtype, jnp.floating)]
            return sum((jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in leaves), jnp.zeros((), jnp.float32))

        _fingerprint_jit = jax.jit(f)
    return float(_fingerprint_jit(tree))


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= FINGERPRINT_RTOL * max(abs(a), abs(b), 1e-12)


class TrainCheckpointManager:
    """Save / restore trainer state under `<run_dir>/checkpoints`; see the module docstring."""

    def __init__(self, run_dir: str, *, keep: int = 2, async_save: bool = True,
                 extra_items: Sequence[str] = ()):
        self.run_dir = os.path.abspath(run_dir)
        self.directory = os.path.join(self.run_dir, "checkpoints")
        self.corrupt_dir = os.path.join(self.run_dir, "checkpoints_corrupt")
        self.extra_items = tuple(extra_items)
        if keep is not None and int(keep) < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
        handlers = {
            PARAMS_ITEM: ocp.StandardCheckpointHandler(),
            CONFIG_ITEM: ocp.JsonCheckpointHandler(),
            OPT_ITEM: ocp.StandardCheckpointHandler(),
            TRAIN_ITEM: ocp.StandardCheckpointHandler(),
            DATA_ITEM: grain.checkpoint.CheckpointHandler(),
            META_ITEM: ocp.JsonCheckpointHandler(),
            **{name: ocp.JsonCheckpointHandler() for name in self.extra_items},
        }
        # cleanup_tmp_directories: a save cut short by a kill leaves `<step>.orbax-checkpoint-tmp`; remove it.
        options = ocp.CheckpointManagerOptions(max_to_keep=int(keep) if keep else None, create=True,
                                               enable_async_checkpointing=async_save, save_interval_steps=1,
                                               cleanup_tmp_directories=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._closed = False

    # --- queries -------------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    # --- save ----------------------------------------------------------------------------------------------
    def save(self, step: int, state: Any, model_config: Any, *, data_state: Any = None,
             meta: dict[str, Any] | None = None, extras: dict[str, Any] | None = None) -> str:
        """Save `state` (a TrainState: step, params, opt_state, rng) as step `step`; returns the step dir.

        Asynchronous when enabled: arrays are copied off the devices before this returns, the files are
        written in the background (call `wait()` before relying on them).
        """
        meta = dict(meta or {})
        meta.update(step=int(step), time=time.time(), params_fingerprint=fingerprint(state.params),
                    opt_fingerprint=fingerprint(state.opt_state))
        cfg_json = model_config if isinstance(model_config, dict) else model_config_to_json(model_config)
        items = {
            PARAMS_ITEM: ocp.args.StandardSave(state.params),
            CONFIG_ITEM: ocp.args.JsonSave(cfg_json),
            OPT_ITEM: ocp.args.StandardSave(state.opt_state),
            TRAIN_ITEM: ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
            META_ITEM: ocp.args.JsonSave(meta),
        }
        if data_state is not None:
            items[DATA_ITEM] = grain.checkpoint.CheckpointSave(_IterState(data_state))
        for name, value in (extras or {}).items():
            if name not in self.extra_items:
                raise ValueError(f"checkpoint item {name!r} was not declared in extra_items={self.extra_items}")
            items[name] = ocp.args.JsonSave(value)
        if step in self._mngr.all_steps():
            log.warning("checkpoint step %d already exists in %s; replacing it", step, self.directory)
            self._mngr.wait_until_finished()
            self._mngr.delete(step)
        self._mngr.save(int(step), args=ocp.args.Composite(**items), force=True)
        return self.step_dir(step)

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release orbax's threads; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._mngr.wait_until_finished()
        self._mngr.close()

    # --- restore -------------------------------------------------------------------------------------------
    def restore(self, target: Any, *, step: int | None = None, restore_data: bool = True) -> Restored | None:
        """Restore the newest good step (or `step` and older) into `target` (a TrainState of
        ShapeDtypeStructs with shardings). None when there is no checkpoint at all.

        A step that fails to read or whose fingerprints differ from the recorded ones is quarantined with a
        warning and the previous one is tried; CheckpointError if none is good.
        """
        self._mngr.wait_until_finished()
        self._mngr.reload()
        candidates = [s for s in reversed(self.steps()) if step is None or s <= step]
        if not candidates:
            return None
        tried = []
        for s in candidates:
            try:
                return self._restore_step(s, target, restore_data)
            except Exception as e:  # noqa: BLE001 - any failure to read means: not a usable checkpoint
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
                tried.append(f"step {s} ({reason})")
                older = [c for c in candidates if c < s]
                moved = self._quarantine(s)
                msg = (f"checkpoint {self.step_dir(s)} is damaged or incomplete ({reason}); "
                       + (f"moved to {moved}; " if moved else "")
                       + (f"falling back to step {older[0]}" if older else "no older checkpoint"))
                log.warning(msg)
        raise CheckpointError(f"no restorable checkpoint in {self.directory}; tried: " + "; ".join(tried)
                              + f". The damaged steps were moved to {self.corrupt_dir}. Remove the run directory "
                              "(or set a new run_dir) to start over.")

    def _item_exists(self, step: int, item: str) -> bool:
        return os.path.isdir(os.path.join(self.step_dir(step), item))

    def _data_process_counts(self, step: int) -> set[int]:
        """Process counts of the data iterator files in a step (grain names them `process_<i>-of-<n>.json`)."""
        names = os.listdir(os.path.join(self.step_dir(step), DATA_ITEM))
        return {int(m.group(1)) for m in map(_DATA_FILE.match, names) if m}

    def _restore_step(self, step: int, target: Any, restore_data: bool) -> Restored:
        path = self.step_dir(step)
        required = (PARAMS_ITEM, CONFIG_ITEM, OPT_ITEM, TRAIN_ITEM, META_ITEM)
        missing = [i for i in required if not self._item_exists(step, i)]
        if missing:
            raise FileNotFoundError(f"items {missing} missing from {path}")
        args = {
            PARAMS_ITEM: ocp.args.StandardRestore(target.params),
            CONFIG_ITEM: ocp.args.JsonRestore(),
            OPT_ITEM: ocp.args.StandardRestore(target.opt_state),
            TRAIN_ITEM: ocp.args.StandardRestore({"step": target.step, "rng": target.rng}),
            META_ITEM: ocp.args.JsonRestore(),
        }
        has_data = restore_data and self._item_exists(step, DATA_ITEM)
        saved_by = self._data_process_counts(step) if has_data else set()
        if saved_by and jax.process_count() not in saved_by:
            # Not damage: the run was saved by another number of processes (grain keeps one file per process,
            # `process_<i>-of-<n>.json`, each for that process's shard of the data). The arrays reshard onto this
            # topology; the iterator state does not apply, so the data order restarts.
            has_data = False
            msg = (f"checkpoint {path}: the data iterator state was saved by {'/'.join(map(str, sorted(saved_by)))} "
                   f"process(es), this run has {jax.process_count()}; restoring the train state without it (the data "
                   "order restarts)")
            log.warning(msg)
        if has_data:
            args[DATA_ITEM] = grain.checkpoint.CheckpointRestore(_IterState())
        for name in self.extra_items:
            if self._item_exists(step, name):
                args[name] = ocp.args.JsonRestore()
        out = self._mngr.restore(step, args=ocp.args.Composite(**args))
        meta = dict(out[META_ITEM])
        ts = out[TRAIN_ITEM]
        state = target.replace(step=ts["step"], params=out[PARAMS_ITEM], opt_state=out[OPT_ITEM], rng=ts["rng"])
        if int(np.asarray(jax.device_get(state.step))) != step or int(meta.get("step", step)) != step:
            raise ValueError(f"step mismatch: directory {step}, train_state {int(state.step)}, meta {meta.get('step')}")
        for name, tree in (("params", state.params), ("opt", state.opt_state)):
            want = meta.get(f"{name}_fingerprint")
            if want is not None:
                got = fingerprint(tree)
                if not _close(got, float(want)):
                    raise ValueError(f"{name} fingerprint {got!r} differs from the saved {want!r} (corrupt data)")
        data_state = out[DATA_ITEM].state if has_data else None
        extras = {name: out[name] for name in self.extra_items if name in out and out[name] is not None}
        return Restored(step=step, state=state, data_state=data_state, meta=meta, model_config=dict(out[CONFIG_ITEM]),
                        extras=extras, path=path)

    def _quarantine(self, step: int) -> str | None:
        """Move a damaged step out of the managed directory (primary process), so the next save of the same
        step number does not collide with it and `latest_checkpoint` never picks it."""
        src = self.step_dir(step)
        dst = os.path.join(self.corrupt_dir, f"{step}-{int(time.time())}")
        moved = None
        if jax.process_index() == 0 and os.path.isdir(src):
            os.makedirs(self.corrupt_dir, exist_ok=True)
            try:
                shutil.move(src, dst)
                moved = dst
            except OSError as e:
                log.warning("could not move damaged checkpoint %s aside: %s", src, e)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"raredx_quarantine_{step}")
        self._mngr.reload()
        return moved
