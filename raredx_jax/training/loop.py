"""The skeleton every training stage runs on: one run directory, restore-or-init, the step loop with its
cadences, the non-finite stop, progress and the summary.

Why: SFT and GRPO wrote the same sequence twice (resolved config, checkpoint manager, restore, "already
complete" short-circuit, the `(every and s % every == 0) or s == total` cadence of log / eval / checkpoint, the
non-finite loss turned into an error naming the last good checkpoint, an atomic `summary.json`), with small
drifts between the copies. A stage now supplies only what differs: how to build and restore its state, one
step, and its hooks (levanter's `Trainer` with default hooks, tunix's `PeftTrainer`).

    with Trainer(config, total, mesh, keep=..., async_save=...) as trainer:
        model_cfg = trainer.model_config(fresh=lambda: ...)
        restored = trainer.restore(abstract_state, tokenizer, lora_settings)   # None on a fresh run
        ...                                                                    # init or adopt the state
        if (done := trainer.completed()) is not None:
            return done
        trainer.run(step_fn, Hooks(log=..., log_every=..., checkpoint=..., checkpoint_every=..., ...))
    return trainer.finish(summary, done_line)

Cadence: a hook with period `every` runs at every `every`-th step and at the last step (`every` = 0: only at
the last); the log hook also runs whenever the eval or checkpoint hook does, before them, so metrics (and the
non-finite check) are flushed before anything is evaluated or saved. A step or hook raising
`NonFiniteLossError(detail)` stops the run: pending saves finish, nothing is saved, and the error is re-raised
as one line naming the last good checkpoint and what to change.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax

from raredx_jax import lora
from raredx_jax.checkpoints import orbax as orbax_io
from raredx_jax.checkpoints.manager import Restored, TrainCheckpointManager
from raredx_jax.models.config import ModelConfig
from raredx_jax.training import metrics as metrics_lib
from raredx_jax.training.common import NonFiniteLossError, resume_model_config, write_json, write_resolved_config


def due(step: int, every: int, total: int) -> bool:
    """Whether a hook of period `every` runs after `step` (1-based): each `every`-th step and the last one."""
    return (every > 0 and step % every == 0) or step == total


@dataclasses.dataclass
class Hooks:
    """What a stage does at its cadences (module docstring).

    log(step) -> the record shown on the progress line (flush the metrics of the steps since the last call;
    raise NonFiniteLossError on a bad one); checkpoint(step) saves; evaluate(step) -> extra progress fields or
    None (it writes its own `kind: "eval"` record), also run at step 0 of a fresh run when `eval_at_start`.
    `nonfinite_hint` ends the non-finite error: what to change before rerunning.
    """

    log: Callable[[int], dict[str, Any]]
    log_every: int
    checkpoint: Callable[[int], Any]
    checkpoint_every: int
    evaluate: Callable[[int], dict[str, Any] | None] | None = None
    eval_every: int = 0
    eval_at_start: bool = True
    nonfinite_hint: str = "rerun the same command to resume from it"


class Trainer:
    """One stage's run: `<run_dir>/config.json`, `checkpoints/`, `metrics.jsonl` + `tb/`, `summary.json`."""

    def __init__(self, config: Any, total: int, mesh: jax.sharding.Mesh, *, keep: int, async_save: bool,
                 extra_items: tuple[str, ...] = ()):
        if total <= 0:
            raise ValueError(f"the number of steps must be positive, got {total}")
        self.config = config
        self.stage = config.stage
        self.run_dir = os.path.abspath(config.run_dir)
        self.total = int(total)
        self.mesh = mesh
        self.primary = jax.process_index() == 0
        self.t_start = time.time()
        self.start = 0
        write_resolved_config(config, self.run_dir)  # refuses a run dir holding another model first
        self.ckpt = TrainCheckpointManager(self.run_dir, keep=keep, async_save=async_save, extra_items=extra_items)
        self.last_saved = self.ckpt.latest_step()
        self.logger: metrics_lib.MetricsLogger | None = None

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        self.ckpt.close()

    # --- restore-or-init ---------------------------------------------------------------------------------------
    def model_config(self, fresh: Callable[[], ModelConfig]) -> ModelConfig:
        """The model's config: the one a checkpoint of this run recorded (its shape checked against the config),
        else `fresh()` (the starting model's)."""
        saved = resume_model_config(self.ckpt, self.config) if self.ckpt.steps() else None
        return saved if saved is not None else fresh()

    def restore(self, target: Any, tokenizer: Any, lora_settings: Any = None) -> Restored | None:
        """The newest good checkpoint restored into `target` (abstract TrainState), or None on a fresh run.
        Refuses first a LoRA / full fine-tune mix and, after, a checkpoint trained with another tokenizer."""
        latest = self.ckpt.latest_step()
        lora.check_run_mode(self.ckpt.step_dir(latest) if latest is not None else None, lora_settings)
        if latest is None:
            return None
        with jax.set_mesh(self.mesh):
            restored = self.ckpt.restore(target)
        if restored is None:
            return None
        orbax_io.check_tokenizer(restored.path, tokenizer)
        self.start = restored.step
        self.print(f"[{self.stage}] resumed from {restored.path} (step {self.start}/{self.total})")
        return restored

    def completed(self) -> dict[str, Any] | None:
        """The run's summary when it already finished (a rerun of a finished stage returns it, trains nothing)."""
        return metrics_lib.completed_summary(self.run_dir, self.start, self.total, self.stage)

    # --- the loop ----------------------------------------------------------------------------------------------
    def print(self, text: str) -> None:
        """A status line from the primary process."""
        if self.primary:
            print(text, flush=True)

    def open_logger(self) -> metrics_lib.MetricsLogger:
        """The metrics writer (JSONL, TensorBoard, progress), truncated to the resumed step."""
        if self.logger is None:
            self.logger = metrics_lib.MetricsLogger(self.run_dir, self.total, self.start, primary=self.primary,
                                                    desc=self.stage)
        return self.logger

    def run(self, step: Callable[[int], Any], hooks: Hooks) -> None:
        """Steps `start + 1 .. total` (`step(s)` runs global step s), the hooks at their cadences."""
        logger = self.open_logger()
        try:
            if self.start == 0 and hooks.evaluate is not None and hooks.eval_at_start:
                hooks.evaluate(0)
            for s in range(self.start + 1, self.total + 1):
                step(s)
                do_eval = hooks.evaluate is not None and due(s, hooks.eval_every, self.total)
                do_ckpt = due(s, hooks.checkpoint_every, self.total)
                if do_eval or do_ckpt or due(s, max(hooks.log_every, 1), self.total):
                    rec = dict(hooks.log(s))
                    if do_eval:
                        rec.update(hooks.evaluate(s) or {})
                    logger.progress(s, rec)
                    if do_ckpt:
                        hooks.checkpoint(s)
                        self.last_saved = s
        except NonFiniteLossError as e:
            self.ckpt.wait()
            good = self.ckpt.latest_step()
            where = (f"the last good checkpoint is step {good} in {self.ckpt.step_dir(good)}" if good is not None
                     else "no checkpoint was saved yet")
            raise NonFiniteLossError(f"[{self.stage}] {e}: stopping without saving; {where}. "
                                     f"{hooks.nonfinite_hint}") from None
        finally:
            self.ckpt.wait()
            logger.close()

    # --- the end -----------------------------------------------------------------------------------------------
    def summary(self, model_cfg: ModelConfig, **fields: Any) -> dict[str, Any]:
        """The fields every stage's summary has, with the stage's own in between (JSON key order)."""
        return {"stage": self.stage, "run_dir": self.run_dir, "steps": self.total,
                "resumed_from": self.start or None, **fields,
                "checkpoint": self.ckpt.step_dir(self.last_saved) if self.last_saved is not None else None,
                "params": model_cfg.num_params(), "seconds": round(time.time() - self.t_start, 1)}

    def finish(self, summary: dict[str, Any], done_line: str) -> dict[str, Any]:
        """Write `summary.json` (atomically) and print the stage's last line; returns the summary."""
        if self.primary:
            write_json(os.path.join(self.run_dir, "summary.json"), summary)
            print(f"[{self.stage}] done: {done_line}; {summary['seconds']}s; checkpoint {summary['checkpoint']}",
                  flush=True)
        return summary
