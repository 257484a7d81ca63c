"""Supervised fine-tuning: knowledge internalization (`stage=knowledge_sft`) and SFT on RERS trajectories
(`stage=sft`). Entry: `python -m raredx_jax.train --config=configs/knowledge_sft.py` (or configs/sft.py).

* Loss: next-token cross-entropy on completion tokens only (the batch's `loss_mask`; prompt tokens are never
  targets) and never across the boundary of two packed sequences (segment ids), averaged over the target
  tokens of the whole global batch.
* Numerics: parameters (master weights) in `model.param_dtype` (fp32), compute in `model.dtype` (bf16 on
  accelerators), logits and loss in fp32; remat policy per decoder layer from `model.remat`.
* One `jax.jit` train step with explicit in/out shardings over the mesh: parameters and optimiser state
  sharded by the logical-axis rules, the batch over ('data', 'fsdp'); the train state is donated. Gradient
  accumulation is a micro-batch scan inside that step (see training/optim.py for why).
* Checkpoints (checkpoints/manager.py): every `train.checkpoint_every` steps and at the end, keep the last
  `train.keep_checkpoints`; a rerun of the same command resumes exactly (params, optimiser, step, RNG, grain
  iterator); a damaged latest checkpoint is skipped with a warning.
* NaN/inf guard: a step whose loss or gradient norm is not finite is not applied, the run stops with a message
  naming the step and the last good checkpoint (which is never overwritten by a bad state).
* Run directory: `config.json` (resolved config), `metrics.jsonl`, `tb/` (TensorBoard), `checkpoints/<step>/`,
  `summary.json`, and for knowledge SFT `probe.json` (the knowledge probe).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from raredx_jax import lora
from raredx_jax.checkpoints import orbax as orbax_io
from raredx_jax.checkpoints.manager import TrainCheckpointManager
from raredx_jax.models.config import ModelConfig, model_config_from
from raredx_jax.parallel.mesh import make_mesh
from raredx_jax.parallel.sharding import logical_to_spec
from raredx_jax.training import metrics as metrics_lib
from raredx_jax.training.optim import accumulate_gradients, make_optimizer
from raredx_jax.training.resume_guard import ModelChangedError, check_model_shape, check_resume  # noqa: F401
from raredx_jax.training.state import (TrainState, abstract_params, abstract_train_state, cast_params,
                                       create_train_state, replicated, split_model, train_state_shardings)

log = logging.getLogger(__name__)

BATCH_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")
STAGE_COMMANDS = {
    "knowledge_sft": "python -m raredx_jax.train --config=configs/knowledge_sft.py",
    "rers": "python -m raredx_jax.train --config=configs/rers.py",
    "data": "python -m raredx_jax.data.build --config=configs/data.py",
}


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient norm of a step was NaN/inf; training stopped, the last good checkpoint is kept."""


class MissingInputError(FileNotFoundError):
    """An input of this stage does not exist yet; the message names the stage / command to run first."""


# --- loss --------------------------------------------------------------------------------------------------------
def target_weights(batch: dict[str, jax.Array]) -> jax.Array:
    """[B, T-1] fp32: 1 where tokens[:, t+1] is a completion token predicted from t within the same sequence."""
    seg = batch["segment_ids"]
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    return batch["loss_mask"][:, 1:].astype(jnp.float32) * same.astype(jnp.float32)


def token_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """[B, T-1] negative log-likelihood of tokens[:, 1:] under logits[:, :-1] (fp32, logsumexp - target)."""
    lg = logits[:, :-1].astype(jnp.float32)
    lse = jax.nn.logsumexp(lg, axis=-1)
    tgt = jnp.take_along_axis(lg, tokens[:, 1:, None], axis=-1)[..., 0]
    return lse - tgt


def lm_loss_sums(logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(sum of target-token NLL, number of target tokens) of one batch (INTERFACES.md loss contract)."""
    w = target_weights(batch)
    return jnp.sum(token_nll(logits, batch["tokens"]) * w), jnp.sum(w)


def forward(graphdef: nnx.GraphDef, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
    model = nnx.merge(graphdef, params)
    logits, _ = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    return logits


# --- steps -------------------------------------------------------------------------------------------------------
def batch_sharding(mesh: jax.sharding.Mesh, batch_size: int, seq_len: int) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), (batch_size, seq_len), mesh))


def _batch_shards(mesh: jax.sharding.Mesh) -> int:
    return int(mesh.shape.get("data", 1) * mesh.shape.get("fsdp", 1))


def check_batch(mesh: jax.sharding.Mesh, batch_size: int, grad_accum: int) -> None:
    shards = _batch_shards(mesh)
    if grad_accum < 1:
        raise ValueError(f"train.grad_accum must be >= 1, got {grad_accum}")
    if batch_size % grad_accum:
        raise ValueError(f"train.batch_size={batch_size} is not divisible by train.grad_accum={grad_accum}")
    micro = batch_size // grad_accum
    if micro % shards:
        raise ValueError(f"train.batch_size / train.grad_accum = {micro} rows per micro-batch do not split over "
                         f"data x fsdp = {shards} devices; use a multiple of {shards * grad_accum} for "
                         "train.batch_size")
    if batch_size % jax.process_count():
        raise ValueError(f"train.batch_size={batch_size} must be divisible by the {jax.process_count()} processes")


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    shardings: TrainState, mesh: jax.sharding.Mesh, batch_shape: tuple[int, int], *,
                    grad_accum: int = 1, nan_at_step: int = -1, frozen_sh: Any = None, lora_dropout: float = 0.0
                    ) -> Callable[..., tuple[TrainState, dict]]:
    """The jitted SFT train step `(state, batch) -> (state, metrics)`; the state is donated.

    metrics (replicated scalars): loss (mean NLL over target tokens), targets, tokens (non-padding),
    grad_norm (before clipping), lr, ok (loss and grad norm finite; when False the update was not applied).
    `nan_at_step` (>= 0) poisons that step's loss, to exercise the guard in tests.
    LoRA (`frozen_sh` = the frozen base's shardings): the step is `(state, batch, base)`, `state.params` holds the
    adapters only and the model is `lora.combine(base, adapters)`; only the adapters get gradients.
    """
    b_sh = batch_sharding(mesh, *batch_shape)
    micro_sh = NamedSharding(mesh, PartitionSpec(None, *b_sh.spec))
    rep = replicated(mesh)

    def loss_fn(params, mb, denom, base=None, rng=None):
        if base is not None:
            params = lora.combine(base, params, rng, lora_dropout)
        logits = forward(graphdef, params, mb)
        s, n = lm_loss_sums(logits, mb)
        return s / denom, {"targets": n}

    def step(state: TrainState, batch: dict[str, jax.Array], base: Any = None):
        denom = jnp.maximum(jnp.sum(target_weights(batch)), 1.0)
        constrain = lambda mb: jax.lax.with_sharding_constraint(mb, micro_sh)  # noqa: E731
        rng = None if base is None else jax.random.fold_in(state.key(), state.step)
        loss, aux, grads = accumulate_gradients(functools.partial(loss_fn, denom=denom, base=base, rng=rng),
                                                state.params, batch, grad_accum, constrain)
        if nan_at_step >= 0:
            loss = jnp.where(state.step == nan_at_step, jnp.nan, loss)
        gnorm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                                  opt_state=keep(opt_state, state.opt_state))
        metrics = {"loss": loss, "targets": aux["targets"], "tokens": jnp.sum(batch["segment_ids"] != 0),
                   "grad_norm": gnorm, "lr": schedule(state.step), "ok": ok}
        return new_state, metrics

    if frozen_sh is not None:
        return jax.jit(step, in_shardings=(shardings, b_sh, frozen_sh), out_shardings=(shardings, rep),
                       donate_argnums=(0,))
    return jax.jit(step, in_shardings=(shardings, b_sh), out_shardings=(shardings, rep), donate_argnums=(0,))


def make_eval_step(graphdef: nnx.GraphDef, param_shardings: Any, mesh: jax.sharding.Mesh,
                   batch_shape: tuple[int, int]) -> Callable[[Any, dict], tuple[jax.Array, jax.Array]]:
    """Jitted `(params, batch) -> (sum NLL, target count)`."""
    def ev(params, batch):
        return lm_loss_sums(forward(graphdef, params, batch), batch)

    return jax.jit(ev, in_shardings=(param_shardings, batch_sharding(mesh, *batch_shape)),
                   out_shardings=replicated(mesh))


def make_row_logprob(graphdef: nnx.GraphDef, param_shardings: Any, mesh: jax.sharding.Mesh,
                     batch_shape: tuple[int, int]) -> Callable[[Any, dict], jax.Array]:
    """Jitted `(params, batch) -> [B]` summed log-likelihood of each row's target tokens (loss_mask)."""
    def rows(params, batch):
        w = target_weights(batch)
        return -jnp.sum(token_nll(forward(graphdef, params, batch), batch["tokens"]) * w, axis=1)

    return jax.jit(rows, in_shardings=(param_shardings, batch_sharding(mesh, *batch_shape)),
                   out_shardings=replicated(mesh))


def to_global(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows -> global arrays sharded over the batch axis (rows of all processes stacked)."""
    out = {}
    for k in BATCH_KEYS:
        x = np.asarray(local[k], np.int32)
        shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        out[k] = jax.make_array_from_process_local_data(sharding, x, shape)
    return out


def replicated_batch(arrays: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """The same full host batch on every process -> a global array sharded by `sharding`."""
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx]) for k, v in arrays.items()}


# --- inputs ------------------------------------------------------------------------------------------------------
def _numerics(config: Any) -> dict[str, Any]:
    m = config.model
    return dict(dtype=m.dtype, param_dtype=m.param_dtype, attention=m.attention, remat=m.remat,
                scan_layers=bool(m.scan_layers))


def resolve_init_checkpoint(init_from: str) -> str:
    try:
        return orbax_io.resolve_model_checkpoint(init_from)
    except FileNotFoundError as e:
        raise MissingInputError(
            f"model.init_from={init_from!r}: {e}. Train the earlier stage first, e.g. "
            f"`{STAGE_COMMANDS['knowledge_sft']}` (its run_dir is what init_from should name)") from None


def initial_model_config(config: Any, vocab_size: int | None) -> ModelConfig:
    """ModelConfig of the model a fresh run starts from (init_from checkpoint, HF dir or preset)."""
    if config.model.init_from:
        return orbax_io.read_model_config(resolve_init_checkpoint(config.model.init_from), **_numerics(config))
    return model_config_from(config, vocab_size)


def load_initial_model(config: Any, mesh: jax.sharding.Mesh, model_cfg: ModelConfig) -> Any:
    """The starting model: `model.init_from` (orbax, a previous stage) > `model.hf_path` > fresh init."""
    from raredx_jax.checkpoints import hf_io

    if config.model.init_from:
        path = resolve_init_checkpoint(config.model.init_from)
        print(f"[{config.stage}] starting from checkpoint {path}", flush=True)
        return orbax_io.load_model(path, mesh, **_numerics(config))
    if config.model.hf_path:
        print(f"[{config.stage}] starting from HF model {config.model.hf_path}", flush=True)
        return hf_io.load_hf_model(config.model.hf_path, mesh, cfg=model_cfg, progress=jax.process_index() == 0)
    print(f"[{config.stage}] starting from a fresh {config.model.preset} model (seed {config.seed})", flush=True)
    return hf_io.init_model(model_cfg, mesh, seed=int(config.seed))


def _data_dir(config: Any) -> str:
    return config.train.get("data_dir", "") or config.data.dir


def _dataset_name(config: Any) -> str:
    from raredx_jax.data.pipeline import DATASETS

    name = config.train.dataset
    if name not in DATASETS:
        raise ValueError(f"train.dataset must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[name]


def ensure_dataset(config: Any) -> None:
    """Fail early, naming what to run first, when the training data is not there. With `train.build_data`
    the embedded knowledge corpus is built (or checked up to date) in-process first."""
    from raredx_jax.data import tfds_builders

    name = _dataset_name(config)
    data_dir = _data_dir(config)
    if config.train.get("build_data", False) and config.train.dataset == "knowledge":
        # build_all is idempotent (a manifest hash of the data config + generator code): a no-op when the
        # data matches this config, a rebuild when it does not.
        from raredx_jax.data.build import build_all

        if jax.process_index() == 0:
            build_all(config, log=lambda m: print(f"[{config.stage}] data: {m}", flush=True))
        _sync("raredx_build_data")
    built = os.path.isdir(data_dir) and tfds_builders.BUILDERS[name](data_dir=os.fspath(data_dir)).is_prepared()
    if built:
        return
    if config.train.dataset == "rers_trajectories":
        raise MissingInputError(
            f"train.dataset=rers_trajectories: no RERS trajectory dataset under {data_dir} "
            f"(train.data_dir / data.dir). Run the RERS stage first: `{STAGE_COMMANDS['rers']}` "
            "(after knowledge SFT), with the same data.dir")
    raise MissingInputError(f"dataset {name} is not built under {data_dir}; run `{STAGE_COMMANDS['data']}` "
                            "(with the same --config.data.dir) first")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _source(config: Any, split: str) -> Any | None:
    from raredx_jax.data import tfds_builders

    try:
        return tfds_builders.data_source(_dataset_name(config), split, _data_dir(config))
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
    from raredx_jax.data.pipeline import tokenize_sft

    checked = long = cut = 0
    for i in range(min(n, len(source))):
        x = tokenize_sft(source[i], tokenizer, 1 << 30)
        checked += 1
        if len(x["tokens"]) > seq_len:
            long += 1
            cut += int(x["loss_mask"][seq_len:].sum() > 0)
    return checked, long, cut


# --- knowledge probe ---------------------------------------------------------------------------------------------
def knowledge_probe_score(config: Any, graphdef: nnx.GraphDef, params: Any, param_shardings: Any,
                          mesh: jax.sharding.Mesh, tokenizer: Any) -> dict[str, Any] | None:
    """Closed-choice knowledge probe on held-out phrasings (data.knowledge.knowledge_probe): for each item the
    model's log-likelihood of every candidate disease name as the assistant's answer is computed (one real
    forward pass, no sampling); the item counts as correct when the gold name ranks first. Candidates: every
    disease of the trained subset (or `probe.num_candidates` of them, gold included). Reports accuracy by the
    summed log-likelihood (primary) and by the per-token mean, beside chance (mean 1 / #candidates).
    """
    try:
        from raredx_jax.data.knowledge import knowledge_probe
    except ImportError:
        return None
    probe_cfg = config.get("probe", None)
    n = int(probe_cfg.get("n", 0)) if probe_cfg is not None else 0
    if n <= 0:
        return None
    from raredx_jax.data.build import run_diseases

    diseases, ontology = run_diseases(config)
    seed = int(probe_cfg.get("seed", 1234))
    items = knowledge_probe(diseases, ontology, seed=seed, n=n)
    by_id = {d.id: d for d in diseases}
    k = int(probe_cfg.get("num_candidates", 0)) or len(diseases)
    rng = np.random.default_rng(seed)
    rows, row_item, row_cand, golds, n_cands = [], [], [], [], []
    for i, item in enumerate(items):
        gold = by_id[item["answer_id"]]
        others = [d for d in diseases if d.id != gold.id]
        if k < len(diseases):
            others = [others[j] for j in rng.choice(len(others), size=k - 1, replace=False)]
        cands = [gold] + others
        golds.append(0)
        n_cands.append(len(cands))
        p_ids = tokenizer.encode_chat(item["messages"], add_generation_prompt=True)
        for j, c in enumerate(cands):
            c_ids = tokenizer.encode(c.name)
            rows.append((p_ids, c_ids))
            row_item.append(i)
            row_cand.append(j)
    seq = max(len(p) + len(c) for p, c in rows)
    seq = int(math.ceil(seq / 16) * 16)
    shards = _batch_shards(mesh)
    bsz = max(shards, int(probe_cfg.get("batch_size", 64)) // shards * shards)
    fn = make_row_logprob(graphdef, param_shardings, mesh, (bsz, seq))
    sh = batch_sharding(mesh, bsz, seq)
    ll = np.zeros(len(rows), np.float64)
    ntok = np.zeros(len(rows), np.float64)
    for start in range(0, len(rows), bsz):
        chunk = rows[start:start + bsz]
        arr = {key: np.zeros((bsz, seq), np.int32) for key in BATCH_KEYS}
        arr["tokens"][:] = tokenizer.pad_id
        for r, (p, c) in enumerate(chunk):
            t = p + c
            arr["tokens"][r, :len(t)] = t
            arr["segment_ids"][r, :len(t)] = 1
            arr["positions"][r, :len(t)] = np.arange(len(t))
            arr["loss_mask"][r, len(p):len(t)] = 1
            ntok[start + r] = len(c)
        out = np.asarray(jax.device_get(fn(params, replicated_batch(arr, sh))))
        ll[start:start + len(chunk)] = out[:len(chunk)]
    correct = np.zeros(len(items))
    correct_norm = np.zeros(len(items))
    row_item, row_cand = np.asarray(row_item), np.asarray(row_cand)
    for i in range(len(items)):
        sel = row_item == i
        s, c, t = ll[sel], row_cand[sel], ntok[sel]
        correct[i] = float(c[np.argmax(s)] == golds[i])
        correct_norm[i] = float(c[np.argmax(s / np.maximum(t, 1))] == golds[i])
    chance = float(np.mean([1.0 / m for m in n_cands]))
    return {"items": len(items), "candidates_per_item": float(np.mean(n_cands)), "accuracy": float(correct.mean()),
            "accuracy_per_token": float(correct_norm.mean()), "chance": chance, "seed": seed}


# --- the run -----------------------------------------------------------------------------------------------------
def _write_resolved_config(config: Any, run_dir: str) -> None:
    """Write `<run_dir>/config.json`; first refuse (ModelChangedError) a run dir whose checkpoints hold another
    model than the config names: another source than the old config.json records, or another shape (GRPO calls
    this too, before its resume)."""
    check_resume(config, run_dir)
    if jax.process_index() != 0:
        return
    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, "config.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, os.path.join(run_dir, "config.json"))


def _resume_model_config(ckpt: TrainCheckpointManager, config: Any) -> ModelConfig | None:
    """ModelConfig recorded in the newest readable step (numerics from the current config); ModelChangedError when
    its shape differs from the model the config asks for (another preset, vocab_size, HF dir or init checkpoint)."""
    for step in reversed(ckpt.steps()):
        try:
            saved = orbax_io.read_model_config(ckpt.step_dir(step), **_numerics(config))
        except Exception as e:  # noqa: BLE001 - a damaged step; restore() reports and skips it
            log.warning("cannot read model_config of %s: %s", ckpt.step_dir(step), e)
            continue
        check_model_shape(saved, config, ckpt.step_dir(step))
        return saved
    return None


def _data_fingerprint(config: Any) -> dict[str, Any]:
    """What the saved grain iterator state depends on: a resume with different values warns."""
    t = config.train
    return {"dataset": t.dataset, "data_dir": os.path.abspath(_data_dir(config)), "batch_size": int(t.batch_size),
            "seq_len": int(t.seq_len), "pack": bool(t.pack), "seed": int(config.seed),
            "processes": jax.process_count()}


def _eval_loss(eval_step, params, make_iter: Callable[[], Iterator], n_batches: int, sharding) -> float | None:
    total, count = 0.0, 0.0
    it = make_iter()
    for i, b in enumerate(it):
        if n_batches > 0 and i >= n_batches:
            break
        s, n = eval_step(params, to_global(b, sharding))
        total += float(s)
        count += float(n)
    return total / count if count else None


def run_sft(config: Any) -> dict[str, Any]:
    """Train per `config` (knowledge_sft or sft), resuming from `<run_dir>/checkpoints` when present.

    Returns the summary (also written to `<run_dir>/summary.json`).
    """
    from raredx_jax.data.pipeline import sft_dataset
    from raredx_jax.data.tokenizer import load_tokenizer

    t_start = time.time()
    stage = config.stage
    tc = config.train
    run_dir = os.path.abspath(config.run_dir)
    primary = jax.process_index() == 0
    total = int(tc.steps)
    if total <= 0:
        raise ValueError(f"train.steps must be positive, got {total}")
    batch_size, seq_len, accum = int(tc.batch_size), int(tc.seq_len), int(tc.get("grad_accum", 1))
    mesh = make_mesh(config.mesh)
    check_batch(mesh, batch_size, accum)
    check_resume(config, run_dir)  # before a data build: a refused resume fails in seconds

    ensure_dataset(config)
    tokenizer = load_tokenizer(config)
    _write_resolved_config(config, run_dir)

    ckpt = TrainCheckpointManager(run_dir, keep=int(tc.keep_checkpoints),
                                  async_save=bool(tc.get("async_checkpointing", True)))
    model_cfg = _resume_model_config(ckpt, config) if ckpt.steps() else None
    if model_cfg is None:
        model_cfg = initial_model_config(config, tokenizer.vocab_size)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{model_cfg.vocab_size} (tokenizer.path / model.vocab_size mismatch)")
    if seq_len > model_cfg.max_position_embeddings:
        log.warning("train.seq_len=%d exceeds the model's max_position_embeddings=%d", seq_len,
                    model_cfg.max_position_embeddings)

    tx, schedule = make_optimizer(tc, total)
    lora_cfg = lora.LoraSettings.from_config(config)
    if lora_cfg is None:
        graphdef, params_abs, param_sh = abstract_params(model_cfg, mesh)
        train_sh = param_sh
    else:  # the train state holds the adapters only; the frozen base is a separate argument of the step
        graphdef, full_abs, param_sh = lora.abstract_lora_model(model_cfg, lora_cfg, mesh)
        base_sh, train_sh = lora.split_params(param_sh)
        params_abs = lora.trainable_params(full_abs)
    base = None
    shardings = train_state_shardings(tx, params_abs, train_sh, mesh)

    if lora_cfg is not None or ckpt.steps():
        lora.check_run_mode(ckpt.step_dir(ckpt.latest_step()) if ckpt.steps() else None, lora_cfg)
    try:
        with jax.set_mesh(mesh):
            restored = ckpt.restore(abstract_train_state(tx, params_abs, shardings)) if ckpt.steps() else None
            if restored is not None:
                state = restored.state
                start = restored.step
                data_state = restored.data_state
                saved_fp = restored.meta.get("data")
                if saved_fp and saved_fp != _data_fingerprint(config):
                    print(f"WARNING: resuming with different data settings than step {start} was trained with "
                          f"(saved {saved_fp}, now {_data_fingerprint(config)}); the data order will not continue "
                          "exactly", flush=True)
                orbax_io.check_tokenizer(restored.path, tokenizer)
                if lora_cfg is not None:
                    base = lora.resume_base(config, restored.meta, restored.path, mesh, model_cfg, lora_cfg)
                print(f"[{stage}] resumed from {restored.path} (step {start}/{total})", flush=True)
            else:
                if config.model.init_from:
                    orbax_io.check_tokenizer(resolve_init_checkpoint(config.model.init_from), tokenizer)
                model = load_initial_model(config, mesh, model_cfg)
                if lora_cfg is None:
                    graphdef, params = split_model(model)
                else:
                    graphdef, base, params, _ = lora.init_lora_model(model, lora_cfg, mesh, int(config.seed))
                del model
                params = cast_params(params, train_sh, model_cfg.param_dtype)
                state = create_train_state(params, tx, int(config.seed), shardings)
                start, data_state = 0, None

            summary_path = os.path.join(run_dir, "summary.json")
            done = metrics_lib.completed_summary(run_dir, start, total, stage)
            if done is not None:
                return done

            # data: this host's shard of the global batch
            n_proc = jax.process_count()
            local_bs = batch_size // n_proc
            train_src = _source(config, tc.get("train_split", "train"))
            if train_src is None:
                raise MissingInputError(f"dataset {_dataset_name(config)} under {_data_dir(config)} has no "
                                        f"'{tc.get('train_split', 'train')}' split")
            eval_src = _source(config, tc.get("eval_split", "validation"))
            holdout = float(tc.get("eval_holdout_fraction", 0.0))
            if eval_src is None and holdout > 0:
                train_src, eval_src = split_holdout(train_src, holdout, int(config.seed))
                print(f"[{stage}] no '{tc.get('eval_split', 'validation')}' split: holding out {len(eval_src)} of "
                      f"{len(train_src) + len(eval_src)} training records for evaluation "
                      "(train.eval_holdout_fraction)", flush=True)
            checked, long, cut = truncation_report(train_src, tokenizer, seq_len)
            if cut and primary:
                print(f"WARNING: {cut} of the first {checked} training records are longer than train.seq_len={seq_len} "
                      "and lose the end of their completion; raise train.seq_len", flush=True)
            train_ds = sft_dataset(train_src, tokenizer, seq_len, local_bs, seed=int(config.seed),
                                   shard_index=jax.process_index(), shard_count=n_proc, pack=bool(tc.pack))
            it = iter(train_ds)
            if data_state is not None:
                it.set_state(data_state)
            elif start > 0:
                print(f"WARNING: checkpoint step {start} has no data iterator state; the data restarts from the "
                      "beginning", flush=True)
            eval_every, eval_batches = int(tc.get("eval_every", 0)), int(tc.get("eval_batches", 0))
            if eval_src is None and eval_every > 0:
                print(f"[{stage}] no '{tc.get('eval_split', 'validation')}' split in {_dataset_name(config)}: "
                      "no held-out evaluation", flush=True)

            def make_eval_iter():
                # One pass in a single process; a fixed number of batches with several (all must step together).
                epochs, nb = (1, eval_batches) if n_proc == 1 else (None, max(eval_batches, 1))
                ds = sft_dataset(eval_src, tokenizer, seq_len, local_bs, seed=int(config.seed) + 1,
                                 shard_index=jax.process_index(), shard_count=n_proc, pack=bool(tc.pack),
                                 num_epochs=epochs, shuffle=False)
                return iter(ds)

            b_sh = batch_sharding(mesh, batch_size, seq_len)
            train_step = make_train_step(graphdef, tx, schedule, shardings, mesh, (batch_size, seq_len),
                                         grad_accum=accum, nan_at_step=int(tc.get("debug_nan_at_step", -1)),
                                         **({} if lora_cfg is None else dict(frozen_sh=base_sh,
                                                                             lora_dropout=lora_cfg.dropout)))
            step_extra = () if lora_cfg is None else (base,)

            def model_params():  # what eval and the probe run: the whole model (LoRA: base + adapters)
                return state.params if lora_cfg is None else lora.combine(base, state.params)
            eval_step = (make_eval_step(graphdef, param_sh, mesh, (batch_size, seq_len))
                         if eval_src is not None else None)

            flops_tok = metrics_lib.model_flops_per_token(model_cfg, seq_len)
            peak = metrics_lib.device_peak_flops(jax.devices()[0].device_kind, model_cfg.dtype)
            n_dev = jax.device_count()
            logger = metrics_lib.MetricsLogger(run_dir, total, start, primary=primary, desc=stage,
                                               progress=None)
            if primary:
                print(f"[{stage}] model {model_cfg.family} {model_cfg.num_params() / 1e6:.2f}M params, "
                      f"dtype {model_cfg.dtype}/{model_cfg.param_dtype}, remat {model_cfg.remat}; mesh "
                      f"{dict(mesh.shape)}; batch {batch_size}x{seq_len} (grad_accum {accum}); steps {start}->{total}; "
                      f"run_dir {run_dir}", flush=True)

            log_every = max(1, int(tc.get("log_every", 10)))
            ckpt_every = int(tc.get("checkpoint_every", 0))
            meta_base = {"stage": stage, "data": _data_fingerprint(config), "tokenizer_digest": tokenizer.digest()}
            if lora_cfg is not None:
                meta_base["lora"] = lora.checkpoint_meta(config, lora_cfg)
                if primary:
                    print(f"[{stage}] LoRA {lora_cfg.to_json()}: {lora.count(params_abs) / 1e6:.3f}M trainable "
                          f"parameters", flush=True)
            pending: list[tuple[int, dict]] = []
            first_loss = last_loss = None
            eval_losses: list[tuple[int, float]] = []
            t_interval = time.time()
            steps_in_interval = 0
            compile_s = None
            last_saved = ckpt.latest_step()

            def fetch():
                b = next(it)
                return to_global(b, b_sh), it.get_state()

            def flush(step: int) -> dict[str, Any]:
                nonlocal t_interval, steps_in_interval, first_loss, last_loss
                host = jax.device_get([m for _, m in pending])
                now = time.time()
                dt = max(now - t_interval, 1e-9)
                tps = steps_in_interval * batch_size * seq_len / dt if steps_in_interval else None
                mfu = metrics_lib.mfu(tps or 0.0, flops_tok, n_dev, peak)
                rec = {}
                for (s, _), m in zip(pending, host):
                    rec = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
                           "targets": int(m["targets"]), "tokens": int(m["tokens"])}
                    if not bool(m["ok"]):
                        ckpt.wait()
                        good = ckpt.latest_step()
                        where = (f"the last good checkpoint is step {good} in {ckpt.step_dir(good)}" if good is not None
                                 else "no checkpoint was saved yet")
                        raise NonFiniteLossError(
                            f"[{stage}] non-finite loss or gradient at step {s} (loss={rec['loss']}, grad_norm="
                            f"{rec['grad_norm']}): stopping without saving; {where}. Lower train.lr / raise "
                            "train.warmup_steps / check the data, then rerun the same command to resume from it.")
                    if first_loss is None:
                        first_loss = rec["loss"]
                    last_loss = rec["loss"]
                    if s == step:
                        rec.update(tokens_per_s=tps, mfu=mfu, step_time_s=dt / max(steps_in_interval, 1))
                    logger.write(s, rec)
                pending.clear()
                t_interval, steps_in_interval = time.time(), 0
                return rec

            if start == 0 and eval_step is not None and eval_every > 0 and bool(tc.get("eval_at_start", True)):
                el = _eval_loss(eval_step, model_params(), make_eval_iter, eval_batches, b_sh)
                if el is not None:
                    eval_losses.append((0, el))
                    logger.write(0, {"loss": el}, kind="eval")
                    logger.message(f"[{stage}] held-out loss at step 0: {el:.4f}")
            try:
                next_batch = fetch() if start < total else None
                for step in range(start, total):
                    batch, dstate = next_batch
                    t0 = time.time()
                    state, m = train_step(state, batch, *step_extra)
                    if compile_s is None:
                        compile_s = time.time() - t0
                        t_interval = time.time()  # the first interval measures steps, not compilation
                    else:
                        steps_in_interval += 1
                    s = step + 1
                    pending.append((s, m))
                    if s < total:
                        next_batch = fetch()  # overlaps the step running on the devices
                    do_eval = eval_step is not None and eval_every > 0 and (s % eval_every == 0 or s == total)
                    do_ckpt = (ckpt_every > 0 and s % ckpt_every == 0) or s == total
                    if s % log_every == 0 or s == total or do_eval or do_ckpt:
                        rec = flush(s)
                        if do_eval:
                            el = _eval_loss(eval_step, model_params(), make_eval_iter, eval_batches, b_sh)
                            if el is not None:
                                eval_losses.append((s, el))
                                logger.write(s, {"loss": el}, kind="eval")
                                rec["eval_loss"] = el
                        logger.progress(s, rec)
                        if do_ckpt:
                            ckpt.save(s, state, model_cfg, data_state=dstate, meta=meta_base)
                            last_saved = s
            finally:
                ckpt.wait()
                logger.close()
            if primary:  # the whole run's history, across resumes
                train_recs = metrics_lib.read_metrics(run_dir, "train")
                if train_recs:
                    first_loss = train_recs[0].get("loss", first_loss)
                    last_loss = train_recs[-1].get("loss", last_loss)
                eval_losses = [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(run_dir, "eval")]

            summary: dict[str, Any] = {
                "stage": stage, "run_dir": run_dir, "steps": total, "resumed_from": start or None,
                "first_loss": first_loss, "final_loss": last_loss,
                "eval_loss": [{"step": s, "loss": v} for s, v in eval_losses],
                "checkpoint": ckpt.step_dir(last_saved) if last_saved is not None else None,
                "params": model_cfg.num_params(), "seconds": round(time.time() - t_start, 1),
                **({} if lora_cfg is None else {"trainable_params": lora.count(params_abs)}),
                "compile_seconds": round(compile_s, 1) if compile_s is not None else None,
            }
            probe_cfg = config.get("probe", None)
            if stage == "knowledge_sft" or (probe_cfg is not None and bool(probe_cfg.get("always", False))):
                probe = knowledge_probe_score(config, graphdef, model_params(), param_sh, mesh, tokenizer)
                if probe is not None:
                    summary["probe"] = probe
                    if primary:
                        with open(os.path.join(run_dir, "probe.json"), "w", encoding="utf-8") as f:
                            json.dump(probe, f, indent=2)
                        print(f"[{stage}] knowledge probe: top-1 {probe['accuracy']:.3f} (per-token "
                              f"{probe['accuracy_per_token']:.3f}) vs chance {probe['chance']:.3f} on {probe['items']} "
                              f"held-out items x {probe['candidates_per_item']:.0f} candidates", flush=True)
    finally:
        ckpt.close()
    if primary:
        with open(summary_path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        os.replace(summary_path + ".tmp", summary_path)
        ev = summary["eval_loss"]
        print(f"[{stage}] done: loss {first_loss if first_loss is None else round(first_loss, 4)} -> "
              f"{last_loss if last_loss is None else round(last_loss, 4)}"
              + (f", held-out {ev[0]['loss']:.4f} (step {ev[0]['step']}) -> {ev[-1]['loss']:.4f}" if ev else "")
              + f"; {summary['seconds']}s; checkpoint {summary['checkpoint']}", flush=True)
    return summary
