"""What GRPO measures beyond the step metrics: greedy held-out pass@1 on a fixed subset of cases, and the
within-lesson reward trends of the curriculum (its summary).
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np

from raredx_jax.data.prompts import diagnosis_messages
from raredx_jax.rewards.diagnosis import verify
from raredx_jax.training.grpo.learner import GRPOLearner
from raredx_jax.training.grpo.settings import GRPOSettings
from raredx_jax.training.rollout import RolloutBatch


def eval_subset(cases: Sequence[Any], n: int, seed: int) -> list[Any]:
    """A fixed subset of ``n`` held-out cases (a seeded permutation; 0 = all), the same every evaluation."""
    if n <= 0 or n >= len(cases):
        return list(cases)
    idx = np.sort(np.random.default_rng([int(seed), 0xE7A1]).permutation(len(cases))[:n])
    return [cases[i] for i in idx]


def held_out_eval(learner: GRPOLearner, cases: Sequence[Any], linker: Any, settings: GRPOSettings) -> dict[str, Any]:
    """Greedy pass@1 (= top-1) and top-k on open-domain prompts of ``cases``, overall and per level."""
    t0 = time.time()
    msgs = [diagnosis_messages(c.text, top_k=settings.open_top_k) for c in cases]
    samples = learner.generate_greedy(msgs, cases)
    ranks, fmt = [], []
    for c, text in zip(cases, samples.texts):
        v = verify(text, c.diagnosis, linker, top_k=settings.eval_top_k)
        ranks.append(v.rank)
        fmt.append(v.format_ok)
    k = settings.eval_top_k
    out: dict[str, Any] = {
        "pass@1": float(np.mean([r == 1 for r in ranks])),
        f"top{k}": float(np.mean([r is not None and r <= k for r in ranks])),
        "format_ok": float(np.mean(fmt)),
        "response_length_mean": float(np.mean(samples.lengths)),
        "n": len(cases),
    }
    for level in sorted({c.level for c in cases}):
        sel = [r for c, r in zip(cases, ranks) if c.level == level]
        out[f"pass@1/{level}"] = float(np.mean([r == 1 for r in sel]))
    out["seconds"] = round(time.time() - t0, 2)
    return out


def lesson_trends(train_recs: Sequence[dict], promo_recs: Sequence[dict], lessons: Sequence[str], total: int
                  ) -> dict[str, dict[str, Any]]:
    """Per lesson, over the steps it was the current lesson: the rollout pass rate and reward of its own samples
    at the start and at the end (means of up to 3 steps each). Rewards of different lessons are not comparable
    (different notes), so a trend is only read within a lesson."""
    bounds, start = {}, 1
    for i, name in enumerate(lessons):
        if i and not any(r.get("to") == name for r in promo_recs):
            break  # never reached
        end = next((int(r["step"]) for r in promo_recs if r.get("from") == name), total)
        bounds[name] = (start, end)
        start = end + 1
    out = {}
    for name, (a, b) in bounds.items():
        recs = [r for r in train_recs if a <= int(r.get("step", 0)) <= b]
        vals = {k: [r[f"reward/lesson/{name}/{k}"] for r in recs if f"reward/lesson/{name}/{k}" in r]
                for k in ("pass", "total")}
        k = max(1, min(3, len(vals["pass"]) // 2))
        out[name] = {"steps": [a, b], **{f"{m}_{w}": (float(np.mean(v[:k] if w == "first" else v[-k:])) if v else None)
                                         for m, v in vals.items() for w in ("first", "last")}}
    return out


def lesson_reward_metrics(batch: RolloutBatch, lessons: Sequence[str]) -> dict[str, float]:
    """Per lesson of the step's prompts: mean total reward, pass rate and the lesson's share of the rows."""
    g = batch.group_size
    per_row = np.repeat(np.asarray(lessons, dtype=object), g)
    out = {}
    for name in sorted(set(lessons)):
        m = per_row == name
        out[f"reward/lesson/{name}/total"] = float(batch.rewards["total"][m].mean())
        if "pass" in batch.rewards:
            out[f"reward/lesson/{name}/pass"] = float(batch.rewards["pass"][m].mean())
        out[f"lesson_share/{name}"] = float(m.mean())
    return out
