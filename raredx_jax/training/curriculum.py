"""Dual-level curriculum for GRPO: which cases (case level) and which task (lesson level).

Task level -- lessons
    An ordered list of lessons ``"<task>:<level>"`` (``config.curriculum.lessons``), e.g.
    ``closed_set:typical, open:typical, open:sparse, open:noisy, open:imprecise``. ``task`` is the prompt
    form the trainer builds (``closed_set`` = choose from a candidate list, ``open`` = open-domain ranked
    differential); ``level`` selects the cases whose ``Case.level`` matches (``*`` = every case). A lesson
    whose level matches no case is skipped (listed in ``metrics()["skipped_lessons"]``).

    Promotion rule (checked after every :meth:`DualCurriculum.update`), ``promote_rule``:

    * ``threshold``: the learner moves from lesson i to i + 1 when it has spent at least ``min_steps`` steps
      at lesson i **and** the mean of the per-step mean ``promote_metric`` (``reward`` or ``pass``) of
      lesson-i samples over the last ``window`` steps is ``>= promote_threshold`` (a float, or one value per
      lesson). The window must be full. A threshold below the starting reward promotes after ``min_steps``
      whatever the policy does, so a fixed threshold has to be set per model.
    * ``gain``: the lesson's first full window is its baseline; the learner moves on when a later window,
      disjoint from the baseline, beats it by ``promote_margin`` (and ``min_steps`` have passed). It gates on
      what the policy learned at this lesson, whatever its starting level.

    Either way ``promote_saturated`` promotes at once when every case of the lesson is skipped as always
    solved (nothing to learn there), and ``max_steps`` > 0 promotes anyway after that many steps at a lesson
    (plateau guard; 0 = never). Each promotion records its reason (rule | saturated | max_steps). Once past lesson 0, a
    ``replay`` share of every batch is drawn from earlier lessons (uniformly among them).

Case level -- pass-rate buckets
    For each (task, case) the curriculum keeps an estimate ``p`` of the policy's pass rate. Rollout results
    given to :meth:`update` are accumulated and folded into ``p`` only every ``remeasure_every`` steps (so
    sampling weights are piecewise constant and reproducible): ``estimator="ema"``: the first measurement sets
    ``p``, later ones ``p <- (1 - ema) p + ema * batch_rate``; ``estimator="counts"``: ``p = s / n`` with the
    counts discounted by ``count_decay`` at each re-measure. Unmeasured cases have ``p = prior``;
    :meth:`DualCurriculum.seed_pass_rates` gives cases a first measurement before step 1 (GRPO seeds it from
    the RERS journal named by ``prior_from``: RERS sampled every training case).

    A case is *skipped* once it has ``>= min_attempts`` attempts and ``p >= skip_hi`` (always solved) or
    ``p <= skip_lo`` (never solved); a ``revisit`` share of batch slots re-samples skipped cases uniformly so
    their estimate can change as the policy improves.

    Buckets: ``easy`` (p >= easy_min), ``hard`` (p < hard_max), ``medium`` (between). The bucket of a batch
    slot is drawn with weights that move linearly from ``bucket_weights_start`` to ``bucket_weights_end`` over
    ``shift_steps`` steps (easy -> hard), renormalised over the non-empty buckets; within the bucket a case is
    drawn with probability proportional to ``p (1 - p) + floor`` (peaks at 50% success), without replacement
    inside a batch while cases remain.

Determinism: :meth:`DualCurriculum.sample_batch` draws from ``rng`` (a ``numpy.random.Generator``) or, when
None, from the curriculum's own generator, whose state is part of :meth:`state_dict` (plain JSON types), so a
restored curriculum continues with exactly the same samples.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from ml_collections import config_dict

BUCKETS = ("easy", "medium", "hard")
TASKS = ("closed_set", "open")
PROMOTE_RULES = ("threshold", "gain")
STATE_VERSION = 2


def curriculum_config() -> config_dict.ConfigDict:
    """``config.curriculum`` at its defaults (configs/base.py builds the section from this; the one place they live)."""
    c = config_dict.ConfigDict()
    # task level
    c.lessons = ("closed_set:typical", "open:typical", "open:sparse", "open:noisy", "open:imprecise")
    c.promote_metric = "reward"  # reward | pass
    c.promote_rule = "threshold"  # threshold (absolute) | gain (over the lesson's own first window)
    c.promote_threshold = 0.5  # threshold rule: float, or a tuple with one value per lesson
    c.promote_margin = 0.05  # gain rule: the last window's mean must exceed the first window's by this much
    c.promote_saturated = True  # promote at once when every case of the lesson is skipped as always solved
    c.window = 8  # W: steps averaged by the promotion rule
    c.min_steps = 8  # at least this many steps at a lesson before promotion
    c.max_steps = 0  # > 0: promote anyway after this many steps at a lesson
    c.replay = 0.2  # share of each batch drawn from earlier lessons
    # case level
    c.remeasure_every = 10  # K: fold accumulated rollout results into the pass-rate estimates every K steps
    c.estimator = "ema"  # ema | counts
    c.ema = 0.5
    c.count_decay = 1.0
    c.prior = 0.5  # pass rate assumed for an unmeasured case
    c.prior_from = ""  # a RERS run dir: its journal's direct samples are every case's first measurement
    c.min_attempts = 8  # attempts before a case may be skipped
    c.skip_lo = 0.0  # p <= skip_lo after min_attempts: never solved -> skipped
    c.skip_hi = 1.0  # p >= skip_hi after min_attempts: always solved -> skipped
    c.revisit = 0.05  # share of slots re-sampling skipped cases
    c.floor = 0.02  # w = p (1 - p) + floor
    c.easy_min = 0.7
    c.hard_max = 0.3
    c.bucket_weights_start = (0.5, 0.35, 0.15)  # easy, medium, hard at step 0
    c.bucket_weights_end = (0.15, 0.35, 0.5)  # ... after shift_steps
    c.shift_steps = 0  # 0 = config.grpo.steps when the full config is given, else 1000
    c.seed = 0
    return c


def _resolve(cfg: Any) -> config_dict.ConfigDict:
    out = curriculum_config()
    sub, total = cfg, 0
    full = cfg is not None and any(k in cfg for k in ("curriculum", "grpo", "model", "stage"))
    if full:
        sub = cfg.curriculum if "curriculum" in cfg else None
        if "grpo" in cfg and "steps" in cfg.grpo:
            total = int(cfg.grpo.steps)
        if "seed" in cfg:
            out.seed = int(cfg.seed)
    if sub is not None:
        for k in sub.keys():
            if k not in out:
                raise ValueError(f"config.curriculum.{k}: unknown field (known: {sorted(out.keys())})")
            v = sub[k]
            if isinstance(out[k], tuple) and isinstance(v, str):
                v = tuple(x.strip() for x in v.split(",") if x.strip())
                if k != "lessons":
                    v = tuple(float(x) for x in v)
            elif isinstance(out[k], tuple) and isinstance(v, list):
                v = tuple(v)
            if k == "promote_threshold" and not isinstance(v, (int, float)):
                out.promote_threshold = None  # allow the float -> tuple type change
                out.promote_threshold = tuple(float(x) for x in v)
                continue
            out[k] = v
    if not int(out.shift_steps):
        out.shift_steps = total or 1000
    _validate(out)
    return out


def _validate(c: config_dict.ConfigDict) -> None:
    def bad(field, msg):
        raise ValueError(f"config.curriculum.{field}: {msg}")

    if not c.lessons:
        bad("lessons", "empty")
    for name in c.lessons:
        task, sep, level = name.partition(":")
        if not sep or task not in TASKS or not level:
            bad("lessons", f"{name!r} is not '<task>:<level>' with task in {TASKS}")
    if c.promote_metric not in ("reward", "pass"):
        bad("promote_metric", f"{c.promote_metric!r} not in ('reward', 'pass')")
    if c.promote_rule not in PROMOTE_RULES:
        bad("promote_rule", f"{c.promote_rule!r} not in {PROMOTE_RULES}")
    if c.estimator not in ("ema", "counts"):
        bad("estimator", f"{c.estimator!r} not in ('ema', 'counts')")
    if isinstance(c.promote_threshold, tuple) and len(c.promote_threshold) not in (len(c.lessons), len(c.lessons) - 1):
        bad("promote_threshold", f"{len(c.promote_threshold)} values for {len(c.lessons)} lessons")
    for f in ("bucket_weights_start", "bucket_weights_end"):
        w = c[f]
        if len(w) != 3 or min(w) < 0 or sum(w) <= 0:
            bad(f, f"{w}: need 3 non-negative weights (easy, medium, hard) with a positive sum")
    for f in ("replay", "revisit", "ema", "prior", "skip_lo", "skip_hi", "easy_min", "hard_max"):
        if not 0.0 <= float(c[f]) <= 1.0:
            bad(f, f"{c[f]} not in [0, 1]")
    if float(c.hard_max) > float(c.easy_min):
        bad("hard_max", f"{c.hard_max} > easy_min {c.easy_min}")
    for f in ("window", "remeasure_every"):
        if int(c[f]) < 1:
            bad(f, f"{c[f]} < 1")


@dataclasses.dataclass(frozen=True)
class Lesson:
    name: str
    task: str
    level: str

    @classmethod
    def parse(cls, name: str) -> "Lesson":
        task, _, level = name.partition(":")
        return cls(name, task, level)


def parse_lesson(name: str) -> tuple[str, str]:
    """``"open:sparse"`` -> ``("open", "sparse")``."""
    lesson = Lesson.parse(name)
    return lesson.task, lesson.level


class DualCurriculum:
    """Case-level x task-level curriculum (see the module docstring for every rule).

    case_levels: ``Case.level`` of each training case (the case index is the position in this list).
    cfg: the full config (reads ``curriculum``, ``grpo.steps``, ``seed``) or ``config.curriculum``; missing
      fields take :func:`curriculum_config` defaults.
    """

    def __init__(self, case_levels: Sequence[str], cfg: Any = None):
        self.cfg = _resolve(cfg)
        c = self.cfg
        self.n = len(case_levels)
        if self.n == 0:
            raise ValueError("DualCurriculum needs at least one case")
        self.case_levels = [str(x) for x in case_levels]
        all_lessons = [Lesson.parse(x) for x in c.lessons]
        self.pools: dict[str, np.ndarray] = {}
        self.lessons: list[Lesson] = []
        self.skipped_lessons: list[str] = []
        for les in all_lessons:
            pool = np.asarray([i for i, lv in enumerate(self.case_levels) if les.level in ("*", lv)], np.int64)
            if pool.size:
                self.lessons.append(les)
                self.pools[les.name] = pool
            else:
                self.skipped_lessons.append(les.name)
        if not self.lessons:
            raise ValueError(
                f"config.curriculum.lessons: no lesson matches any case level (levels present: "
                f"{sorted(set(self.case_levels))}, lessons: {list(c.lessons)})")
        idx = {x: i for i, x in enumerate(c.lessons)}
        th = c.promote_threshold
        self.thresholds = [float(th[idx[les.name]] if isinstance(th, tuple) and idx[les.name] < len(th) else
                                 (th if not isinstance(th, tuple) else th[-1])) for les in self.lessons]
        self.tasks = sorted({les.task for les in self.lessons})
        # case level state, per task
        self.p = {t: np.full(self.n, float(c.prior)) for t in self.tasks}
        self.attempts = {t: np.zeros(self.n) for t in self.tasks}  # effective attempts (measured)
        self.successes = {t: np.zeros(self.n) for t in self.tasks}
        self.pending_a = {t: np.zeros(self.n) for t in self.tasks}  # since the last re-measure
        self.pending_s = {t: np.zeros(self.n) for t in self.tasks}
        # task level state
        self.lesson_index = 0
        self.steps_at_lesson = 0
        self.window: list[list[float]] = []  # [step, sum, count] of current-lesson samples per step
        self.lesson_baseline: float | None = None  # gain rule: mean of the lesson's first full window
        self.baseline_end = -1.0  # the last step of that window
        self.last_counted_step = -1  # last step counted in steps_at_lesson
        self.step = 0  # last step given to update (0 = none yet)
        self.last_remeasure = 0
        self.promotions: list[dict] = []
        self.last_mix: dict[str, float] = {}
        self.rng = np.random.default_rng(int(c.seed))

    # -------------------------------------------------------------------------------------------------
    @property
    def lesson(self) -> Lesson:
        return self.lessons[self.lesson_index]

    def progress(self, step: int | None = None) -> float:
        s = self.step if step is None else step
        return min(1.0, max(0.0, s / float(self.cfg.shift_steps)))

    def bucket_weights(self, step: int | None = None) -> np.ndarray:
        """(easy, medium, hard) weights at ``step`` (default: the current step), before renormalisation."""
        a = np.asarray(self.cfg.bucket_weights_start, np.float64)
        b = np.asarray(self.cfg.bucket_weights_end, np.float64)
        t = self.progress(step)
        w = (1 - t) * a + t * b
        return w / w.sum()

    def skipped(self, task: str) -> np.ndarray:
        c = self.cfg
        p, n = self.p[task], self.attempts[task]
        return (n >= c.min_attempts) & ((p >= c.skip_hi) | (p <= c.skip_lo))

    def buckets(self, task: str) -> np.ndarray:
        """Bucket index (0 easy, 1 medium, 2 hard) of every case for ``task``."""
        p = self.p[task]
        return np.where(p >= self.cfg.easy_min, 0, np.where(p < self.cfg.hard_max, 2, 1))

    def case_weights(self, task: str) -> np.ndarray:
        p = self.p[task]
        return p * (1 - p) + float(self.cfg.floor)

    def lesson_weights(self) -> dict[str, float]:
        """Share of each lesson in a batch: current lesson 1 - replay, earlier ones replay / i each."""
        i = self.lesson_index
        if i == 0 or self.cfg.replay <= 0:
            return {self.lessons[i].name: 1.0}
        out = {les.name: float(self.cfg.replay) / i for les in self.lessons[:i]}
        out[self.lessons[i].name] = 1.0 - float(self.cfg.replay)
        return out

    # -------------------------------------------------------------------------------------------------
    def sample_batch(self, n: int, rng: np.random.Generator | None = None) -> list[tuple[int, str]]:
        """``n`` (case index, lesson name) pairs for the next step."""
        rng = self.rng if rng is None else rng
        lw = self.lesson_weights()
        names = list(lw)
        lesson_of = rng.choice(len(names), size=n, p=np.asarray([lw[k] for k in names]))
        out: list[tuple[int, str] | None] = [None] * n
        mix = {b: 0 for b in BUCKETS}
        mix["revisit"] = 0
        bw = self.bucket_weights()
        for li, name in enumerate(names):
            slots = np.flatnonzero(lesson_of == li)
            if slots.size == 0:
                continue
            task = Lesson.parse(name).task
            pool = self.pools[name]
            skip = self.skipped(task)[pool]
            active, skipped = pool[~skip], pool[skip]
            bucket = self.buckets(task)[active]
            weights = self.case_weights(task)[active]
            nonempty = np.asarray([np.any(bucket == b) for b in range(3)])
            # a slot revisits a skipped case with probability `revisit` (or always when nothing is active)
            u = rng.random(slots.size)
            revisit = (u < float(self.cfg.revisit)) & (skipped.size > 0)
            if active.size == 0:
                revisit[:] = True
            chosen_bucket = np.full(slots.size, -1)
            if nonempty.any():
                bp = np.where(nonempty, bw, 0.0)
                if bp.sum() <= 0:
                    bp = nonempty.astype(np.float64)
                bp = bp / bp.sum()
                chosen_bucket = rng.choice(3, size=slots.size, p=bp)
            for b in range(3):
                sel = slots[(chosen_bucket == b) & ~revisit]
                if sel.size == 0:
                    continue
                cand, w = active[bucket == b], weights[bucket == b]
                picks = _draw(rng, cand, w, sel.size)
                for s, ci in zip(sel, picks):
                    out[s] = (int(ci), name)
                mix[BUCKETS[b]] += sel.size
            sel = slots[revisit]
            if sel.size:
                src = skipped if skipped.size else pool
                picks = _draw(rng, src, np.ones(src.size), sel.size)
                for s, ci in zip(sel, picks):
                    out[s] = (int(ci), name)
                mix["revisit"] += sel.size
        self.last_mix = {k: v / max(n, 1) for k, v in mix.items()}
        return out  # type: ignore[return-value]

    # -------------------------------------------------------------------------------------------------
    def update(
        self,
        case_indices: Sequence[int],
        lessons: str | Sequence[str],
        rewards: Sequence[float],
        passes: Sequence[float] | None = None,
        step: int | None = None,
    ) -> list[dict]:
        """Record one step's rollouts; returns the promotions this call made (usually none).

        case_indices / rewards / passes: one entry per rollout (repeat a case index for each of its G samples).
        lessons: the lesson of each rollout (or one name for all). passes: 1 when the rollout solved its case
        (gold at rank 1); default ``rewards >= 1``. step: the training step (default: last step + 1); calls
        with the same step are merged into one promotion-window entry.
        """
        ci = np.asarray(case_indices, np.int64).reshape(-1)
        r = np.asarray(rewards, np.float64).reshape(-1)
        ps = (r >= 1.0).astype(np.float64) if passes is None else np.asarray(passes, np.float64).reshape(-1)
        les = [lessons] * ci.size if isinstance(lessons, str) else list(lessons)
        if not (ci.size == r.size == ps.size == len(les)):
            raise ValueError(f"update: {ci.size} case indices, {r.size} rewards, {ps.size} passes, {len(les)} lessons")
        if ci.size and (ci.min() < 0 or ci.max() >= self.n):
            raise ValueError(f"update: case index out of range [0, {self.n})")
        step = self.step + 1 if step is None else int(step)
        # case level: accumulate
        for name in set(les):
            if name not in self.pools:
                raise ValueError(f"update: unknown lesson {name!r} (lessons: {[x.name for x in self.lessons]})")
            task = Lesson.parse(name).task
            m = np.asarray([x == name for x in les])
            np.add.at(self.pending_a[task], ci[m], 1.0)
            np.add.at(self.pending_s[task], ci[m], ps[m])
        # task level: current-lesson samples only
        cur = self.lesson.name
        m = np.asarray([x == cur for x in les], bool)
        metric = r if self.cfg.promote_metric == "reward" else ps
        if step != self.last_counted_step:
            self.steps_at_lesson += 1
            self.last_counted_step = step
        if m.any():  # a step with only replay samples adds nothing to the window
            if not self.window or self.window[-1][0] != step:
                self.window.append([float(step), 0.0, 0.0])
            self.window[-1][1] += float(metric[m].sum())
            self.window[-1][2] += float(m.sum())
        self.window = self.window[-int(self.cfg.window):]
        self.step = step
        if step - self.last_remeasure >= int(self.cfg.remeasure_every):
            self.remeasure()
        return self._maybe_promote(step)

    def seed_pass_rates(self, task: str, case_indices: Sequence[int], attempts: Sequence[float],
                        successes: Sequence[float]) -> int:
        """A first measurement of cases that have none yet (e.g. RERS's direct samples of every training case):
        ``p = successes / attempts`` with those attempts counted, so saturated and hopeless cases can be skipped
        from step 1. Returns how many cases were seeded."""
        if task not in self.p:
            return 0
        ci = np.asarray(case_indices, np.int64).reshape(-1)
        a = np.asarray(attempts, np.float64).reshape(-1)
        s_ = np.asarray(successes, np.float64).reshape(-1)
        if not (ci.size == a.size == s_.size):
            raise ValueError(f"seed_pass_rates: {ci.size} cases, {a.size} attempts, {s_.size} successes")
        m = (a > 0) & (self.attempts[task][ci] == 0)
        ci, a, s_ = ci[m], a[m], s_[m]
        self.p[task][ci] = s_ / a
        self.attempts[task][ci] = a
        self.successes[task][ci] = s_
        return int(ci.size)

    def remeasure(self) -> None:
        """Fold the accumulated rollout results into the pass-rate estimates."""
        c = self.cfg
        for t in self.tasks:
            a, s = self.pending_a[t], self.pending_s[t]
            seen = a > 0
            if seen.any():
                rate = np.where(seen, s / np.maximum(a, 1e-12), 0.0)
                if c.estimator == "ema":
                    first = seen & (self.attempts[t] == 0)
                    later = seen & ~first
                    self.p[t] = np.where(first, rate, self.p[t])
                    self.p[t] = np.where(later, (1 - c.ema) * self.p[t] + c.ema * rate, self.p[t])
                    self.attempts[t] = self.attempts[t] + a
                    self.successes[t] = self.successes[t] + s
                else:
                    d = float(c.count_decay)
                    self.attempts[t] = np.where(seen, d * self.attempts[t] + a, self.attempts[t])
                    self.successes[t] = np.where(seen, d * self.successes[t] + s, self.successes[t])
                    self.p[t] = np.where(seen, self.successes[t] / np.maximum(self.attempts[t], 1e-12), self.p[t])
            self.pending_a[t] = np.zeros(self.n)
            self.pending_s[t] = np.zeros(self.n)
        self.last_remeasure = self.step

    def window_mean(self) -> float | None:
        """Mean of the per-step means in the promotion window (None when empty)."""
        vals = [s / c for _, s, c in self.window if c > 0]
        return float(np.mean(vals)) if vals else None

    def saturated(self, lesson: Lesson | None = None) -> bool:
        """Every case of the lesson is skipped as always solved (measured, p >= skip_hi): nothing left to learn."""
        lesson = lesson or self.lesson
        c, pool = self.cfg, self.pools[lesson.name]
        p, n = self.p[lesson.task][pool], self.attempts[lesson.task][pool]
        return bool(np.all((n >= c.min_attempts) & (p >= c.skip_hi)))

    def _maybe_promote(self, step: int) -> list[dict]:
        c = self.cfg
        if self.lesson_index >= len(self.lessons) - 1:
            return []
        full = len(self.window) >= int(c.window)
        mean = self.window_mean()
        if c.promote_rule == "gain":
            # the baseline is the lesson's first full window; the rule compares a later, disjoint window with it
            if full and self.lesson_baseline is None:
                self.lesson_baseline, self.baseline_end = mean, self.window[-1][0]
            rule = (full and self.lesson_baseline is not None and self.steps_at_lesson >= int(c.min_steps)
                    and self.window[0][0] > self.baseline_end and mean is not None
                    and mean >= self.lesson_baseline + float(c.promote_margin))
        else:
            rule = full and self.steps_at_lesson >= int(c.min_steps) and mean is not None and (
                mean >= self.thresholds[self.lesson_index])
        saturated = bool(c.promote_saturated) and self.saturated()
        forced = int(c.max_steps) > 0 and self.steps_at_lesson >= int(c.max_steps)
        if not (rule or saturated or forced):
            return []
        event = {"step": int(step), "from": self.lesson.name, "to": self.lessons[self.lesson_index + 1].name,
                 "window_mean": mean, "baseline": self.lesson_baseline, "steps_at_lesson": self.steps_at_lesson,
                 "reason": "rule" if rule else ("saturated" if saturated else "max_steps")}
        self.lesson_index += 1
        self.steps_at_lesson = 0
        self.last_counted_step = step  # the promoting step counts for the old lesson only
        self.window = []
        self.lesson_baseline, self.baseline_end = None, -1.0
        self.promotions.append(event)
        return [event]

    # -------------------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        """Scalars for logging: lesson, window mean, bucket sizes, skipped cases, last batch mix."""
        task = self.lesson.task
        pool = self.pools[self.lesson.name]
        b = self.buckets(task)[pool]
        skip = self.skipped(task)[pool]
        out: dict[str, Any] = {
            "lesson_index": self.lesson_index,
            "lesson": self.lesson.name,
            "steps_at_lesson": self.steps_at_lesson,
            "window_mean": self.window_mean(),
            "lesson_baseline": self.lesson_baseline,
            "pass_rate_mean": float(self.p[task][pool].mean()),
            "skipped_cases": int(skip.sum()),
            "skipped_lessons": list(self.skipped_lessons),
            "progress": self.progress(),
        }
        for i, name in enumerate(BUCKETS):
            out[f"bucket_size/{name}"] = int(((b == i) & ~skip).sum())
        for k, v in self.last_mix.items():
            out[f"batch_mix/{k}"] = v
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue identically, as plain JSON types."""
        return {
            "version": STATE_VERSION,
            "num_cases": self.n,
            "lessons": [x.name for x in self.lessons],
            "lesson_index": self.lesson_index,
            "steps_at_lesson": self.steps_at_lesson,
            "window": [list(map(float, w)) for w in self.window],
            "lesson_baseline": self.lesson_baseline,
            "baseline_end": self.baseline_end,
            "step": self.step,
            "last_counted_step": self.last_counted_step,
            "last_remeasure": self.last_remeasure,
            "promotions": list(self.promotions),
            "last_mix": dict(self.last_mix),
            "cases": {
                t: {
                    "p": self.p[t].tolist(),
                    "attempts": self.attempts[t].tolist(),
                    "successes": self.successes[t].tolist(),
                    "pending_a": self.pending_a[t].tolist(),
                    "pending_s": self.pending_s[t].tolist(),
                }
                for t in self.tasks
            },
            "rng": _jsonable(self.rng.bit_generator.state),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"curriculum state version {state.get('version')!r}, expected {STATE_VERSION}")
        state = {"lesson_baseline": None, "baseline_end": -1.0, **state}  # version 1 had no gain rule
        if state["num_cases"] != self.n:
            raise ValueError(f"curriculum state has {state['num_cases']} cases, this curriculum {self.n}")
        names = [x.name for x in self.lessons]
        if state["lessons"] != names:
            raise ValueError(f"curriculum state lessons {state['lessons']} differ from the config's {names}")
        self.lesson_index = int(state["lesson_index"])
        self.steps_at_lesson = int(state["steps_at_lesson"])
        self.window = [list(map(float, w)) for w in state["window"]]
        self.lesson_baseline = state["lesson_baseline"]
        self.baseline_end = float(state["baseline_end"])
        self.step = int(state["step"])
        self.last_counted_step = int(state["last_counted_step"])
        self.last_remeasure = int(state["last_remeasure"])
        self.promotions = [dict(e) for e in state["promotions"]]
        self.last_mix = dict(state.get("last_mix", {}))
        for t in self.tasks:
            d = state["cases"][t]
            self.p[t] = np.asarray(d["p"], np.float64)
            self.attempts[t] = np.asarray(d["attempts"], np.float64)
            self.successes[t] = np.asarray(d["successes"], np.float64)
            self.pending_a[t] = np.asarray(d["pending_a"], np.float64)
            self.pending_s[t] = np.asarray(d["pending_s"], np.float64)
        bg = getattr(np.random, state["rng"]["bit_generator"])()
        bg.state = state["rng"]
        self.rng = np.random.Generator(bg)


def _draw(rng: np.random.Generator, cand: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """k draws from ``cand`` with probabilities ~ w: without replacement while candidates remain."""
    w = np.asarray(w, np.float64) + 1e-12  # every candidate stays drawable (floor may be 0)
    p = w / w.sum()
    if k <= cand.size:
        return rng.choice(cand, size=k, replace=False, p=p)
    first = rng.permutation(cand)
    rest = rng.choice(cand, size=k - cand.size, replace=True, p=p)
    return np.concatenate([first, rest])


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


__all__ = ["DualCurriculum", "Lesson", "parse_lesson", "curriculum_config", "BUCKETS", "TASKS"]
