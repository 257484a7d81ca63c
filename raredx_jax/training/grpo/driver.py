"""The GRPO stage: `python -m raredx_jax.train --config=configs/rl_curriculum.py` (`config.stage = "grpo"`).

What GRPO supplies to the `Trainer` (training/loop.py): the task (training and held-out cases, the reward, the
dual-level curriculum seeded from the RERS journal), the learner's state (restored with the curriculum and the
sampler's key), one step (curriculum batch -> rollout -> update -> curriculum update), the held-out evaluation
and its summary (reward and pass-rate trends, promotions, held-out top-1 before and after).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

import jax
import numpy as np

from raredx_jax import lora
from raredx_jax.checkpoints import orbax as orbax_io
from raredx_jax.data.build import RL_SPLIT, run_diseases
from raredx_jax.data.linking import DiseaseLinker
from raredx_jax.data.tfds_builders import data_source, decode_case
from raredx_jax.data.tokenizer import load_tokenizer
from raredx_jax.parallel.mesh import make_mesh
from raredx_jax.rewards.combined import RewardFn
from raredx_jax.sampling.sampler import SamplingParams
from raredx_jax.training import metrics as metrics_lib
from raredx_jax.training.common import STAGE_COMMANDS, MissingInputError, check_vocab, numerics, write_json
from raredx_jax.training.curriculum import DualCurriculum
from raredx_jax.training.grpo.evaluation import eval_subset, held_out_eval, lesson_reward_metrics, lesson_trends
from raredx_jax.training.grpo.learner import GRPOLearner
from raredx_jax.training.grpo.settings import GRPOSettings
from raredx_jax.training.loop import Hooks, Trainer
from raredx_jax.training.optim import OptimizerSettings
from raredx_jax.training.rers_journal import JOURNAL_DIR, read_journals
from raredx_jax.training.rollout import diagnosis_reward, lesson_case, lesson_messages
from raredx_jax.training.settings import from_section
from raredx_jax.training.state import split_model

log = logging.getLogger(__name__)

CURRICULUM_ITEM = "curriculum"
RL_ITEM = "rl_state"


def init_checkpoint(config: Any) -> str:
    """The RERS-SFT checkpoint GRPO starts from (``model.init_from``); MissingInputError naming the stage."""
    init, cmd = config.model.get("init_from", ""), STAGE_COMMANDS["rers_sft"]
    if not init:
        raise MissingInputError(
            "model.init_from is empty: GRPO starts from the SFT-on-RERS-trajectories checkpoint. Run "
            f"`{cmd}` first and set --config.model.init_from to its run_dir (default runs/rers_sft)")
    try:
        return orbax_io.resolve_model_checkpoint(init)
    except FileNotFoundError as e:
        raise MissingInputError(
            f"model.init_from={init!r}: {e}. GRPO starts from the SFT-on-RERS-trajectories run: run `{cmd}` "
            "first (after knowledge SFT and RERS), or point --config.model.init_from at its run_dir") from None


def load_cases(config: Any, split: str) -> list[Any]:
    """Every simulated case of `split` (errors name the flag that builds a missing split)."""
    try:
        src = data_source("raredx_simulated_cases", split, config.data.dir)
    except FileNotFoundError as e:
        raise MissingInputError(str(e)) from None
    except ValueError as e:
        if split == RL_SPLIT:
            raise ValueError(f"{e}. The {RL_SPLIT!r} split holds GRPO-only training notes: build it with "
                             "--config.data.rl_notes_per_disease=N, or set config.grpo.train_split=train") from None
        raise
    return [decode_case(src[i]) for i in range(len(src))]


def seed_from_rers(curriculum: Any, train_cases: Sequence[Any], rers_dir: str) -> int:
    """First pass-rate estimate of every training case RERS sampled: its direct round (``rers.num_samples`` samples
    of the open prompt per case, from the model RERS-SFT started from) is in the RERS journal, free. It places a
    case in a bucket; skipping it needs the current policy's rollouts too (see below). Returns how many cases were
    seeded; "" = none. A missing journal is an error naming the flag."""
    if not rers_dir:
        return 0
    journal_dir = os.path.join(rers_dir, JOURNAL_DIR)
    chunks = read_journals(journal_dir)
    if not chunks:
        raise MissingInputError(f"curriculum.prior_from={rers_dir!r}: no RERS journal in {journal_dir} (run RERS "
                                "first, or set --config.curriculum.prior_from='' for unmeasured cases)")
    by_id = {c["case_id"]: c.get("direct", {}) for ch in chunks.values() for c in ch["cases"]}
    # RERS sampled another policy (the model RERS-SFT started from, at RERS's temperature): its rate sets where a
    # case starts, but counts as at most min_attempts - 1 attempts, so no case is skipped as always or never
    # solved before the current policy's own rollouts confirm it
    cap = max(float(curriculum.cfg.min_attempts) - 1.0, 0.0)
    idx, att, suc = [], [], []
    for i, case in enumerate(train_cases):
        d = by_id.get(case.id)
        tries = float(d.get("tries", 0)) if d else 0.0
        if tries > 0 and cap > 0:
            w = min(tries, cap) / tries
            idx.append(i)
            att.append(tries * w)
            suc.append(float(d.get("correct", 0)) * w)
    return curriculum.seed_pass_rates("open", idx, att, suc)


@dataclasses.dataclass
class GRPOTask:
    """What GRPO trains and measures on: cases, the candidate diseases, the reward and the curriculum."""

    train_cases: list[Any]
    eval_cases: list[Any]
    disease_names: list[tuple[str, str]]
    linker: DiseaseLinker
    reward: RewardFn
    curriculum: DualCurriculum
    seeded: int  # cases whose first pass-rate estimate came from the RERS journal

    @classmethod
    def load(cls, config: Any, st: GRPOSettings) -> "GRPOTask":
        seed = int(config.seed)
        train_cases = [c for split in st.train_splits for c in load_cases(config, split)]
        if st.max_train_cases:
            train_cases = train_cases[:st.max_train_cases]
        eval_cases = eval_subset(load_cases(config, st.eval_split), st.eval_cases, seed) if st.eval_cases >= 0 else []
        if st.eval_cases >= 0 and not eval_cases:
            raise ValueError(f"config.grpo.eval_split={st.eval_split!r} has no cases (set grpo.eval_cases=-1 for no "
                             "held-out evaluation)")
        diseases = run_diseases(config)[0]
        linker = DiseaseLinker(diseases)
        reward = RewardFn(linker, config)
        curriculum = DualCurriculum([c.level for c in train_cases], config)
        seeded = seed_from_rers(curriculum, train_cases, curriculum.cfg.prior_from)
        if st.curriculum_reward not in reward.weights and st.curriculum_reward not in ("total", "pass", "rank"):
            raise ValueError(f"config.grpo.curriculum_reward={st.curriculum_reward!r}: not a reward component "
                             f"({sorted(reward.weights)} or total | pass | rank)")
        return cls(train_cases, eval_cases, [(d.id, d.name) for d in diseases], linker, reward, curriculum, seeded)


class GRPORun:
    """GRPO's part of the `Trainer` loop: state restore/init, one step, its hooks and its summary."""

    def __init__(self, config: Any, st: GRPOSettings, trainer: Trainer, learner: GRPOLearner, task: GRPOTask,
                 init_path: str | None):
        self.config, self.st, self.trainer, self.learner, self.task = config, st, trainer, learner, task
        self.init_path = init_path
        self.stage, self.seed = config.stage, int(config.seed)
        self.metrics: dict[str, Any] = {}

    def reference(self) -> Any:
        """The frozen reference's parameters (only loaded when grpo.beta > 0)."""
        self.trainer.print(f"[{self.stage}] loading the frozen reference (beta={self.st.beta}) from {self.init_path}")
        return split_model(orbax_io.load_model(self.init_path, self.trainer.mesh, **numerics(self.config)))[1]

    def resume(self, restored: Any) -> None:
        learner, st, curriculum = self.learner, self.st, self.task.curriculum
        if learner.lora is None:
            learner.set_state(restored.state, self.reference if st.beta > 0 else None)
        else:
            learner.set_state(restored.state, base=lora.resume_base(self.config, restored.meta, restored.path,
                                                                    self.trainer.mesh, learner.cfg, learner.lora))
        start = restored.step
        if CURRICULUM_ITEM in restored.extras:
            curriculum.load_state_dict(restored.extras[CURRICULUM_ITEM])
        else:
            log.warning("checkpoint step %d has no curriculum state; the curriculum restarts", start)
        saved = restored.extras.get(RL_ITEM, {})
        learner.optimizer_steps = int(saved.get("optimizer_steps", start * learner.updates_per_step))
        if saved.get("settings") and saved["settings"] != st.digest(learner.optimizer):
            log.warning("resuming with different grpo settings than step %d was trained with", start)
        self.trainer.print(f"[{self.stage}] curriculum at lesson {curriculum.lesson.name}")

    def init(self, tokenizer: Any) -> None:
        self.init_path = self.init_path or init_checkpoint(self.config)
        orbax_io.check_tokenizer(self.init_path, tokenizer)
        self.trainer.print(f"[{self.stage}] starting from checkpoint {self.init_path}")
        with jax.set_mesh(self.trainer.mesh):
            model = orbax_io.load_model(self.init_path, self.trainer.mesh, **numerics(self.config))
            use_ref = self.st.beta > 0 and self.learner.lora is None
            self.learner.init_from_model(model, self.reference if use_ref else None)

    def banner(self) -> str:
        st, learner, task, cfg = self.st, self.learner, self.task, self.learner.cfg
        ref_note = ("reference loaded" if learner.ref_params is not None else
                    "LoRA: the frozen base is the reference" if learner.lora is not None and st.beta > 0 else
                    "no reference model")
        lay = learner.layout
        return (f"[{self.stage}] model {cfg.family} {cfg.num_params() / 1e6:.2f}M params, dtype {cfg.dtype}/"
                f"{cfg.param_dtype}; mesh {dict(self.trainer.mesh.shape)}; {st.prompts_per_step} prompts x "
                f"{st.group_size} samples/step, {lay.num} mini-batch(es) of {lay.rows} rows (padded {lay.padded}, "
                f"{lay.accum} micro) x {st.epochs_per_step} epoch(s); loss {st.loss}, advantage {st.advantage}, beta "
                f"{st.beta} ({ref_note}); old logprobs: {'recomputed' if learner.recompute_old else 'sampler'}; "
                f"{len(task.train_cases)} train cases, {len(task.eval_cases)} held-out ({task.seeded} case pass rates "
                f"from the RERS journal); lessons {[x.name for x in task.curriculum.lessons]}; filter "
                f"{st.filter_groups}; steps {self.trainer.start}->{st.steps}; run_dir {self.trainer.run_dir}")

    # --- the loop ----------------------------------------------------------------------------------------------
    def step(self, s: int) -> None:
        """Global step s: a curriculum batch, the learner's rollout and update, the curriculum update."""
        st, task, logger = self.st, self.task, self.trainer.logger
        pairs = task.curriculum.sample_batch(st.prompts_per_step)
        cases = [task.train_cases[ci] for ci, _ in pairs]
        lessons = [les for _, les in pairs]
        messages = [lesson_messages(c, les, task.disease_names, np.random.default_rng([self.seed, s, slot, 0xC105]),
                                    n_candidates=st.closed_set_candidates, top_k=st.open_top_k)
                    for slot, (c, les) in enumerate(zip(cases, lessons))]
        payloads = [lesson_case(c, les, n_candidates=st.closed_set_candidates, top_k=st.open_top_k)
                    for c, les in zip(cases, lessons)]
        batch, m = self.learner.step(messages, payloads, s)
        g = st.group_size
        promos = task.curriculum.update(np.repeat([ci for ci, _ in pairs], g), [x for x in lessons for _ in range(g)],
                                        batch.rewards[st.curriculum_reward], batch.rewards.get("pass"), step=s)
        cm = task.curriculum.metrics()
        cm.pop("skipped_lessons", None)
        logger.write(s, {**m, **lesson_reward_metrics(batch, lessons), **{f"curriculum/{k}": v for k, v in cm.items()}})
        for e in promos:
            logger.write(s, e, kind="promotion")
            logger.message(f"[{self.stage}] step {s}: curriculum promoted {e['from']} -> {e['to']} ({e['reason']}, "
                           f"window mean {e['window_mean']})")
        self.metrics = m

    def log(self, s: int) -> dict[str, Any]:
        m = self.metrics
        self.trainer.logger.message(
            f"[{self.stage}] step {s}/{self.st.steps} lesson {self.task.curriculum.lesson.name}: reward "
            f"{m['reward/total_mean']:.3f} pass {m.get('reward/pass_mean', float('nan')):.3f} kept "
            f"{m['groups_kept_fraction']:.2f} len {m['response_length_mean']:.0f} kl {m.get('kl', 0.0):.4f} clip "
            f"{m.get('clip_fraction', 0.0):.3f} ({m['step_time_s']:.1f}s)")
        return {k: m[k2] for k, k2 in (("loss", "loss"), ("lr", "lr"), ("tokens_per_s", "train_tokens_per_s"),
                                       ("mfu", "mfu")) if k2 in m}

    def evaluate(self, s: int) -> dict[str, Any] | None:
        st = self.st
        ev = held_out_eval(self.learner, self.task.eval_cases, self.task.linker, st)
        self.trainer.logger.write(s, ev, kind="eval")
        self.trainer.logger.message(f"[{self.stage}] step {s}: held-out pass@1 {ev['pass@1']:.3f}, top{st.eval_top_k} "
                                    f"{ev[f'top{st.eval_top_k}']:.3f}, format {ev['format_ok']:.2f} (n={ev['n']})")
        return None

    def save(self, s: int) -> None:
        learner = self.learner
        meta = {"stage": self.stage, "tokenizer_digest": learner.tokenizer.digest(),
                **({} if learner.lora is None else {"lora": lora.checkpoint_meta(self.config, learner.lora)})}
        rl_state = {"step": s, "settings": self.st.digest(learner.optimizer), "seed": self.seed,
                    "optimizer_steps": learner.optimizer_steps,
                    "sampler_key": [int(x) for x in np.asarray(jax.random.key_data(learner.sampler_key(s)))]}
        self.trainer.ckpt.save(s, learner.state, learner.cfg, meta=meta,
                               extras={CURRICULUM_ITEM: self.task.curriculum.state_dict(), RL_ITEM: rl_state})

    def hooks(self) -> Hooks:
        st = self.st
        return Hooks(log=self.log, log_every=st.log_every, checkpoint=self.save, checkpoint_every=st.checkpoint_every,
                     evaluate=self.evaluate if self.task.eval_cases else None, eval_every=st.eval_every,
                     eval_at_start=st.eval_at_start,
                     nonfinite_hint="Lower optim.lr, then rerun the same command to resume from it.")

    # --- the end -----------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Reward / pass trends, held-out top-1 before and after, promotions and lesson trends (whole run)."""
        tr, st, curriculum = self.trainer, self.st, self.task.curriculum
        train_recs, eval_recs, promo_recs = [metrics_lib.read_metrics(tr.run_dir, kind) if tr.primary else []
                                             for kind in ("train", "eval", "promotion")]

        def mean_of(recs: Sequence[dict], key: str) -> float | None:
            vals = [r[key] for r in recs if isinstance(r.get(key), (int, float))]
            return float(np.mean(vals)) if vals else None

        k, topk = max(1, min(5, len(train_recs) // 4 or 1)), f"top{st.eval_top_k}"
        summary = tr.summary(
            self.learner.cfg,
            reward_first=mean_of(train_recs[:k], "reward/total_mean"),
            reward_last=mean_of(train_recs[-k:], "reward/total_mean"),
            pass_first=mean_of(train_recs[:k], "reward/pass_mean"),
            pass_last=mean_of(train_recs[-k:], "reward/pass_mean"),
            eval=[{"step": r["step"], "pass@1": r.get("pass@1"), topk: r.get(topk), "format_ok": r.get("format_ok")}
                  for r in eval_recs],
            heldout_top1_before=eval_recs[0].get("pass@1") if eval_recs and eval_recs[0]["step"] == 0 else None,
            heldout_top1_after=eval_recs[-1].get("pass@1") if eval_recs else None,
            promotions=[{k2: r.get(k2) for k2 in ("step", "from", "to", "reason", "baseline", "window_mean")}
                        for r in promo_recs],
            lesson_trends=lesson_trends(train_recs, promo_recs, [x.name for x in curriculum.lessons], st.steps),
            # how many promotions the gain rule made vs the saturation and plateau (max_steps) guards
            promotion_reasons={why: sum(r.get("reason") == why for r in promo_recs)
                               for why in ("rule", "saturated", "max_steps")},
            final_lesson=curriculum.lesson.name, init_from=self.init_path)
        if tr.primary:
            write_json(os.path.join(tr.run_dir, "curriculum.json"),
                       {"metrics": curriculum.metrics(), "promotions": curriculum.promotions})
        return summary

    @staticmethod
    def done_line(summary: dict[str, Any]) -> str:
        return (f"reward {summary['reward_first']} -> {summary['reward_last']}; held-out top-1 "
                f"{summary['heldout_top1_before']} -> {summary['heldout_top1_after']}; lesson "
                f"{summary['final_lesson']}")


def run_grpo(config: Any) -> dict[str, Any]:
    """Train per ``config`` (stage ``grpo``), resuming from ``<run_dir>/checkpoints`` when present."""
    st = GRPOSettings.from_config(config)
    mesh = make_mesh(config.mesh)
    resuming = orbax_io.latest_checkpoint(os.path.join(os.path.abspath(config.run_dir), "checkpoints")) is not None
    init_path = init_checkpoint(config) if not resuming or st.beta > 0 else None  # fails before anything is written
    try:
        tokenizer = load_tokenizer(config)
    except FileNotFoundError as e:
        raise MissingInputError(str(e)) from None
    task = GRPOTask.load(config, st)
    with Trainer(config, st.steps, mesh, keep=st.keep_checkpoints, async_save=st.async_checkpointing,
                 extra_items=(CURRICULUM_ITEM, RL_ITEM)) as trainer:
        model_cfg = trainer.model_config(fresh=lambda: orbax_io.read_model_config(
            init_path or init_checkpoint(config), **numerics(config)))
        check_vocab(tokenizer, model_cfg, "model.init_from")
        learner = GRPOLearner(model_cfg, tokenizer, diagnosis_reward(task.reward), st,
                              SamplingParams.from_config(config.sampling), mesh, seed=int(config.seed),
                              lora_settings=lora.LoraSettings.from_config(config),
                              optimizer=from_section(OptimizerSettings, config.optim, "optim"))
        run = GRPORun(config, st, trainer, learner, task, init_path)
        restored = trainer.restore(learner.abstract_state(), tokenizer, learner.lora)
        if restored is not None:
            run.resume(restored)
        else:
            run.init(tokenizer)
        if (done := trainer.completed()) is not None:
            return done
        trainer.print(run.banner())
        trainer.run(run.step, run.hooks())
        summary = run.summary()
    return trainer.finish(summary, run.done_line(summary))
