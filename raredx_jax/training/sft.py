"""Supervised fine-tuning: knowledge internalization (`stage=knowledge_sft`) and SFT on RERS trajectories
(`stage=sft`). Entry: `python -m raredx_jax.train --config=configs/knowledge_sft.py` (or configs/sft.py).

* Loss and step (training/lm.py): next-token cross-entropy on completion tokens of packed sequences, one jitted
  step over the mesh with gradient accumulation inside; the run loop is training/loop.py's `Trainer`.
* Numerics: parameters (master weights) in `model.param_dtype` (fp32), compute in `model.dtype` (bf16 on
  accelerators), logits and loss in fp32; remat policy per decoder layer from `model.remat`.
* Checkpoints (checkpoints/manager.py): every `train.checkpoint_every` steps and at the end, keep the last
  `train.keep_checkpoints`; a rerun of the same command resumes exactly (params, optimiser, step, RNG, grain
  iterator); a damaged latest checkpoint is skipped with a warning.
* NaN/inf guard: a step whose loss or gradient norm is not finite is not applied, the run stops with a message
  naming the step and the last good checkpoint (which is never overwritten by a bad state).
* Run directory: `config.json` (resolved config), `metrics.jsonl`, `tb/` (TensorBoard), `checkpoints/<step>/`,
  `summary.json`, and for knowledge SFT `probe.json` (evaluation/knowledge_probe.py).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np

from raredx_jax import lora
from raredx_jax.checkpoints import orbax as orbax_io
from raredx_jax.data import tfds_builders
from raredx_jax.data.build import build_all
from raredx_jax.data.pipeline import DATASETS, sft_dataset, tokenize_sft
from raredx_jax.data.tokenizer import load_tokenizer
from raredx_jax.evaluation.knowledge_probe import knowledge_probe_score
from raredx_jax.models.config import ModelConfig
from raredx_jax.parallel.mesh import make_mesh
from raredx_jax.training import metrics as metrics_lib
from raredx_jax.training.common import (
    STAGE_COMMANDS,
    MissingInputError,
    NonFiniteLossError,
    check_vocab,
    initial_model_config,
    load_initial_model,
    resolve_init_checkpoint,
    sync,
    write_json,
)
from raredx_jax.training.lm import batch_sharding, check_batch, make_eval_step, make_train_step, to_global
from raredx_jax.training.loop import Hooks, Trainer
from raredx_jax.training.optim import OptimizerSettings, make_optimizer
from raredx_jax.training.resume_guard import check_resume
from raredx_jax.training.settings import from_section
from raredx_jax.training.sft_settings import ProbeSettings, SFTSettings
from raredx_jax.training.state import (
    abstract_params,
    abstract_train_state,
    cast_params,
    create_train_state,
    split_model,
    train_state_shardings,
)

log = logging.getLogger(__name__)


# --- inputs ------------------------------------------------------------------------------------------------------
def data_dir(config: Any, st: SFTSettings) -> str:
    return st.data_dir or config.data.dir


def ensure_dataset(config: Any, st: SFTSettings) -> None:
    """Fail early, naming what to run first, when the training data is not there. With `train.build_data`
    the embedded knowledge corpus is built (or checked up to date) in-process first."""
    name, root = DATASETS[st.dataset], data_dir(config, st)
    if st.build_data and st.dataset == "knowledge":
        # build_all is idempotent (a manifest hash of the data config + generator code): a no-op when the
        # data matches this config, a rebuild when it does not.
        if jax.process_index() == 0:
            build_all(config, log=lambda m: print(f"[{config.stage}] data: {m}", flush=True))
        sync("raredx_build_data")
    if os.path.isdir(root) and tfds_builders.BUILDERS[name](data_dir=os.fspath(root)).is_prepared():
        return
    if st.dataset == "rers_trajectories":
        raise MissingInputError(
            f"train.dataset=rers_trajectories: no RERS trajectory dataset under {root} "
            f"(train.data_dir / data.dir). Run the RERS stage first: `{STAGE_COMMANDS['rers']}` "
            "(after knowledge SFT), with the same data.dir")
    raise MissingInputError(f"dataset {name} is not built under {root}; run `{STAGE_COMMANDS['data']}` "
                            "(with the same --config.data.dir) first")


def data_source(config: Any, st: SFTSettings, split: str) -> Any | None:
    """The split's random-access source, or None when the dataset has no such split."""
    try:
        return tfds_builders.data_source(DATASETS[st.dataset], split, data_dir(config, st))
    except ValueError as e:
        if "has no split" in str(e):
            return None
        raise


class IndexView:
    """A random-access view of some records of a source (grain reads it like the source itself)."""

    def __init__(self, source: Any, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.source[int(self.indices[i])]


def split_holdout(source: Any, fraction: float, seed: int) -> tuple[Any, Any]:
    """(train view, held-out view): a seeded `fraction` of the records held out (at least one)."""
    n = len(source)
    n_eval = max(1, int(round(n * fraction)))
    if n_eval >= n:
        raise ValueError(f"train.eval_holdout_fraction={fraction} leaves no training records out of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return IndexView(source, np.sort(perm[n_eval:])), IndexView(source, np.sort(perm[:n_eval]))


def truncation_report(source: Any, tokenizer: Any, seq_len: int, n: int = 256) -> tuple[int, int, int]:
    """(records checked, records longer than seq_len, of those whose completion loses tokens) over the first
    `n` records: long records are truncated by the pipeline, silently dropping the end of the completion."""
    checked = long = cut = 0
    for i in range(min(n, len(source))):
        x = tokenize_sft(source[i], tokenizer, 1 << 30)
        checked += 1
        if len(x["tokens"]) > seq_len:
            long += 1
            cut += int(x["loss_mask"][seq_len:].sum() > 0)
    return checked, long, cut



def data_fingerprint(config: Any, st: SFTSettings) -> dict[str, Any]:
    """What the saved grain iterator state depends on: a resume with different values warns."""
    return {"dataset": st.dataset, "data_dir": os.path.abspath(data_dir(config, st)), "batch_size": st.batch_size,
            "seq_len": st.seq_len, "pack": st.pack, "seed": int(config.seed), "processes": jax.process_count()}


def eval_loss(eval_step: Callable, params: Any, make_iter: Callable[[], Iterator], n_batches: int,
              sharding: Any) -> float | None:
    """Mean target-token NLL over the held-out batches (`n_batches` > 0: at most that many)."""
    total, count = 0.0, 0.0
    for i, b in enumerate(make_iter()):
        if n_batches > 0 and i >= n_batches:
            break
        s, n = eval_step(params, to_global(b, sharding))
        total += float(s)
        count += float(n)
    return total / count if count else None


# --- the stage ---------------------------------------------------------------------------------------------------
class SFTRun:
    """What SFT supplies to the `Trainer`: its state (full model, or LoRA adapters over a frozen base), the data
    iterator (restored with the checkpoint), one jitted step, the held-out loss, and its summary fields."""

    def __init__(self, config: Any, st: SFTSettings, trainer: Trainer, model_cfg: ModelConfig, tokenizer: Any):
        self.config, self.st, self.trainer, self.model_cfg, self.tokenizer = config, st, trainer, model_cfg, tokenizer
        self.mesh = trainer.mesh
        self.tx, self.schedule = make_optimizer(from_section(OptimizerSettings, config.optim, "optim"), st.steps)
        self.lora = lora.LoraSettings.from_config(config)
        if self.lora is None:
            self.graphdef, self.params_abs, self.param_sh = abstract_params(model_cfg, self.mesh)
            train_sh = self.param_sh
        else:  # the train state holds the adapters only; the frozen base is a separate argument of the step
            self.graphdef, full_abs, self.param_sh = lora.abstract_lora_model(model_cfg, self.lora, self.mesh)
            self.base_sh, train_sh = lora.split_params(self.param_sh)
            self.params_abs = lora.trainable_params(full_abs)
        self.train_sh = train_sh
        self.shardings = train_state_shardings(self.tx, self.params_abs, train_sh, self.mesh)
        self.base: Any = None
        self.state: Any = None
        self.data_state: Any = None

    # --- state -------------------------------------------------------------------------------------------------
    def abstract_state(self) -> Any:
        return abstract_train_state(self.tx, self.params_abs, self.shardings)

    def resume(self, restored: Any) -> None:
        """Adopt a restored checkpoint: state, data iterator position, LoRA base."""
        self.state, self.data_state = restored.state, restored.data_state
        saved_fp, now_fp = restored.meta.get("data"), data_fingerprint(self.config, self.st)
        if saved_fp and saved_fp != now_fp:
            log.warning("resuming with different data settings than step %d was trained with (saved %s, now %s); "
                        "the data order will not continue exactly", restored.step, saved_fp, now_fp)
        if self.lora is not None:
            self.base = lora.resume_base(self.config, restored.meta, restored.path, self.mesh, self.model_cfg,
                                         self.lora)

    def init(self) -> None:
        """A fresh state from the starting model (`model.init_from`, `model.hf_path` or a fresh init)."""
        config = self.config
        if config.model.init_from:
            orbax_io.check_tokenizer(resolve_init_checkpoint(config.model.init_from), self.tokenizer)
        model = load_initial_model(config, self.mesh, self.model_cfg)
        if self.lora is None:
            _, params = split_model(model)
        else:
            _, self.base, params, _ = lora.init_lora_model(model, self.lora, self.mesh, int(config.seed))
        del model
        params = cast_params(params, self.train_sh, self.model_cfg.param_dtype)
        self.state = create_train_state(params, self.tx, int(config.seed), self.shardings)

    def model_params(self) -> Any:
        """What eval and the probe run: the whole model (LoRA: base + adapters)."""
        return self.state.params if self.lora is None else lora.combine(self.base, self.state.params)

    # --- data and steps ----------------------------------------------------------------------------------------
    def open_data(self) -> None:
        """The training iterator (at the restored position), the held-out source, and the jitted steps."""
        config, st, stage, start = self.config, self.st, self.config.stage, self.trainer.start
        n_proc, seed = jax.process_count(), int(config.seed)
        self.local_bs = st.batch_size // n_proc
        train_src = data_source(config, st, st.train_split)
        if train_src is None:
            raise MissingInputError(f"dataset {DATASETS[st.dataset]} under {data_dir(config, st)} has no "
                                    f"'{st.train_split}' split")
        self.eval_src = data_source(config, st, st.eval_split)
        if self.eval_src is None and st.eval_holdout_fraction > 0:
            train_src, self.eval_src = split_holdout(train_src, st.eval_holdout_fraction, seed)
            self.trainer.print(f"[{stage}] no '{st.eval_split}' split: holding out {len(self.eval_src)} of "
                               f"{len(train_src) + len(self.eval_src)} training records for evaluation "
                               "(train.eval_holdout_fraction)")
        checked, _, cut = truncation_report(train_src, self.tokenizer, st.seq_len)
        if cut and self.trainer.primary:
            log.warning("%d of the first %d training records are longer than train.seq_len=%d and lose the end of "
                        "their completion; raise train.seq_len", cut, checked, st.seq_len)
        self.it = iter(sft_dataset(train_src, self.tokenizer, st.seq_len, self.local_bs, seed=seed,
                                   shard_index=jax.process_index(), shard_count=n_proc, pack=st.pack))
        if self.data_state is not None:
            self.it.set_state(self.data_state)
        elif start > 0:
            log.warning("checkpoint step %d has no data iterator state; the data restarts from the beginning", start)
        if self.eval_src is None and st.eval_every > 0:
            self.trainer.print(f"[{stage}] no '{st.eval_split}' split in {DATASETS[st.dataset]}: no held-out "
                               "evaluation")
        self.b_sh = batch_sharding(self.mesh, st.batch_size, st.seq_len)
        self.train_step = make_train_step(
            self.graphdef, self.tx, self.schedule, self.shardings, self.mesh, (st.batch_size, st.seq_len),
            grad_accum=st.grad_accum, nan_at_step=st.debug_nan_at_step,
            **({} if self.lora is None else dict(frozen_sh=self.base_sh, lora_dropout=self.lora.dropout)))
        self.eval_step = (make_eval_step(self.graphdef, self.param_sh, self.mesh, (st.batch_size, st.seq_len))
                          if self.eval_src is not None else None)
        self.flops_tok = metrics_lib.model_flops_per_token(self.model_cfg, st.seq_len)
        self.peak = metrics_lib.device_peak_flops(jax.devices()[0].device_kind, self.model_cfg.dtype)
        self.meta = {"stage": stage, "data": data_fingerprint(config, st), "tokenizer_digest": self.tokenizer.digest()}
        if self.lora is not None:
            self.meta["lora"] = lora.checkpoint_meta(config, self.lora)
        self.pending: list[tuple[int, Any]] = []
        self.first_loss = self.last_loss = None
        self.eval_losses: list[tuple[int, float]] = []
        self.compile_s: float | None = None
        self.t_interval, self.steps_in_interval = time.time(), 0
        self.next_batch = self.fetch() if start < st.steps else None

    def fetch(self) -> tuple[dict[str, jax.Array], Any]:
        b = next(self.it)
        return to_global(b, self.b_sh), self.it.get_state()

    def banner(self) -> str:
        m, st = self.model_cfg, self.st
        text = (f"[{self.config.stage}] model {m.family} {m.num_params() / 1e6:.2f}M params, dtype {m.dtype}/"
                f"{m.param_dtype}, remat {m.remat}; mesh {dict(self.mesh.shape)}; batch {st.batch_size}x{st.seq_len} "
                f"(grad_accum {st.grad_accum}); steps {self.trainer.start}->{st.steps}; run_dir {self.trainer.run_dir}")
        if self.lora is not None:
            text += (f"\n[{self.config.stage}] LoRA {self.lora.to_json()}: {lora.count(self.params_abs) / 1e6:.3f}M "
                     "trainable parameters")
        return text

    def step(self, s: int) -> None:
        """Global step s: dispatch the jitted step, then fetch the next batch while the devices run it."""
        batch, self.data_state = self.next_batch
        t0 = time.time()
        self.state, m = self.train_step(self.state, batch, *(() if self.lora is None else (self.base,)))
        if self.compile_s is None:
            self.compile_s = time.time() - t0
            self.t_interval = time.time()  # the first interval measures steps, not compilation
        else:
            self.steps_in_interval += 1
        self.pending.append((s, m))
        if s < self.st.steps:
            self.next_batch = self.fetch()

    # --- hooks -------------------------------------------------------------------------------------------------
    def flush(self, step: int) -> dict[str, Any]:
        """Write the metrics of the steps since the last flush; NonFiniteLossError at a step not applied."""
        host = jax.device_get([m for _, m in self.pending])
        dt = max(time.time() - self.t_interval, 1e-9)
        n = self.steps_in_interval
        tps = n * self.st.batch_size * self.st.seq_len / dt if n else None
        mfu = metrics_lib.mfu(tps or 0.0, self.flops_tok, jax.device_count(), self.peak)
        rec: dict[str, Any] = {}
        for (s, _), m in zip(self.pending, host):
            rec = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
                   "targets": int(m["targets"]), "tokens": int(m["tokens"])}
            if not bool(m["ok"]):
                raise NonFiniteLossError(f"non-finite loss or gradient at step {s} (loss={rec['loss']}, "
                                         f"grad_norm={rec['grad_norm']})")
            if self.first_loss is None:
                self.first_loss = rec["loss"]
            self.last_loss = rec["loss"]
            if s == step:
                rec.update(tokens_per_s=tps, mfu=mfu, step_time_s=dt / max(n, 1))
            self.trainer.logger.write(s, rec)
        self.pending.clear()
        self.t_interval, self.steps_in_interval = time.time(), 0
        return rec

    def make_eval_iter(self) -> Iterator:
        # One pass in a single process; a fixed number of batches with several (all must step together).
        st, n_proc = self.st, jax.process_count()
        epochs = 1 if n_proc == 1 else None
        return iter(sft_dataset(self.eval_src, self.tokenizer, st.seq_len, self.local_bs, seed=int(self.config.seed)
                                + 1, shard_index=jax.process_index(), shard_count=n_proc, pack=st.pack,
                                num_epochs=epochs, shuffle=False))

    def evaluate(self, s: int) -> dict[str, Any] | None:
        n_batches = self.st.eval_batches if jax.process_count() == 1 else max(self.st.eval_batches, 1)
        el = eval_loss(self.eval_step, self.model_params(), self.make_eval_iter, n_batches, self.b_sh)
        if el is None:
            return None
        self.eval_losses.append((s, el))
        self.trainer.logger.write(s, {"loss": el}, kind="eval")
        if s == 0:
            self.trainer.logger.message(f"[{self.config.stage}] held-out loss at step 0: {el:.4f}")
        return {"eval_loss": el}

    def save(self, s: int) -> None:
        self.trainer.ckpt.save(s, self.state, self.model_cfg, data_state=self.data_state, meta=self.meta)

    def hooks(self) -> Hooks:
        st = self.st
        with_eval = self.eval_step is not None and st.eval_every > 0
        return Hooks(log=self.flush, log_every=st.log_every, checkpoint=self.save,
                     checkpoint_every=st.checkpoint_every, evaluate=self.evaluate if with_eval else None,
                     eval_every=st.eval_every, eval_at_start=st.eval_at_start,
                     nonfinite_hint="Lower optim.lr / raise optim.warmup_steps / check the data, then rerun the same "
                                    "command to resume from it.")

    # --- the end -----------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The summary over the whole run's history (across resumes), with the knowledge probe when due."""
        tr, run_dir = self.trainer, self.trainer.run_dir
        if tr.primary:
            train_recs = metrics_lib.read_metrics(run_dir, "train")
            if train_recs:
                self.first_loss = train_recs[0].get("loss", self.first_loss)
                self.last_loss = train_recs[-1].get("loss", self.last_loss)
            self.eval_losses = [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(run_dir, "eval")]
        summary = tr.summary(self.model_cfg, first_loss=self.first_loss, final_loss=self.last_loss,
                             eval_loss=[{"step": s, "loss": v} for s, v in self.eval_losses])
        if self.lora is not None:
            summary["trainable_params"] = lora.count(self.params_abs)
        summary["compile_seconds"] = round(self.compile_s, 1) if self.compile_s is not None else None
        probe_st = from_section(ProbeSettings, self.config.get("probe", None) or {}, "probe")
        if self.config.stage == "knowledge_sft" or probe_st.always:
            probe = knowledge_probe_score(self.config, probe_st, self.graphdef, self.model_params(), self.param_sh,
                                          self.mesh, self.tokenizer)
            if probe is not None:
                summary["probe"] = probe
                if tr.primary:
                    write_json(os.path.join(run_dir, "probe.json"), probe)
                tr.print(f"[{self.config.stage}] knowledge probe: top-1 {probe['accuracy']:.3f} (per-token "
                         f"{probe['accuracy_per_token']:.3f}) vs chance {probe['chance']:.3f} on {probe['items']} "
                         f"held-out items x {probe['candidates_per_item']:.0f} candidates")
        return summary

    def done_line(self, summary: dict[str, Any]) -> str:
        first, last, ev = self.first_loss, self.last_loss, summary["eval_loss"]
        return (f"loss {first if first is None else round(first, 4)} -> {last if last is None else round(last, 4)}"
                + (f", held-out {ev[0]['loss']:.4f} (step {ev[0]['step']}) -> {ev[-1]['loss']:.4f}" if ev else ""))


def run_sft(config: Any) -> dict[str, Any]:
    """Train per `config` (knowledge_sft or sft), resuming from `<run_dir>/checkpoints` when present; returns the
    summary (also `<run_dir>/summary.json`)."""
    st = from_section(SFTSettings, config.train, "train")
    mesh = make_mesh(config.mesh)
    check_batch(mesh, st.batch_size, st.grad_accum)
    check_resume(config, config.run_dir)  # before a data build: a refused resume fails in seconds
    ensure_dataset(config, st)
    tokenizer = load_tokenizer(config)
    with Trainer(config, st.steps, mesh, keep=st.keep_checkpoints, async_save=st.async_checkpointing) as trainer, \
            jax.set_mesh(mesh):
        model_cfg = trainer.model_config(fresh=lambda: initial_model_config(config, tokenizer.vocab_size))
        check_vocab(tokenizer, model_cfg, "model.vocab_size")
        if st.seq_len > model_cfg.max_position_embeddings:
            log.warning("train.seq_len=%d exceeds the model's max_position_embeddings=%d", st.seq_len,
                        model_cfg.max_position_embeddings)
        run = SFTRun(config, st, trainer, model_cfg, tokenizer)
        restored = trainer.restore(run.abstract_state(), tokenizer, run.lora)
        if restored is not None:
            run.resume(restored)
        else:
            run.init()
        if (done := trainer.completed()) is not None:
            return done
        run.open_data()
        trainer.print(run.banner())
        trainer.run(run.step, run.hooks())
        summary = run.summary()
    return trainer.finish(summary, run.done_line(summary))
