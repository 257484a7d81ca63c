"""Combined reward for GRPO (per-component arrays + weighted total) and the RERS leak check.

Components are registered by name (:func:`register_reward`), so a new reward is one function of a
:class:`RewardContext`; ``rewards.weights`` in the config picks which ones enter the total and with what
weight. Built in:

=============  ===========================================================================================
``diagnosis``  rank-aware: :func:`~raredx_jax.rewards.diagnosis.rank_reward` of the gold's rank (``top_k``,
               ``decay``); 0 when ``diagnosis_requires_format`` and the answer block is not well formed, 0
               when ``diagnosis_requires_grounding`` and the completion does not cite the note (leak check),
               and 0 when ``enforce_answer_count`` and the answer lists more entries than the prompt allows
               (the payload's ``max_answers``: listing every candidate of a closed-set prompt earns nothing)
``format``     :func:`~raredx_jax.rewards.format.format_reward` in [0, 1] (0.25 per check)
``length``     :func:`~raredx_jax.rewards.format.length_penalty` in [-1, 0] (DAPO overlong shaping)
=============  ===========================================================================================

How the components combine (``combine``):

* ``gated`` (default): ``total = w_diagnosis * diagnosis + earned * sum(w_k * shaping_k)``, where ``earned``
  is 1 for a right first answer that earned the diagnosis reward (no gate above refused it). Shaping terms
  (format, length, any other component) count only for completions whose first answer is right, so among
  wrong answers they create no advantage at all (a group of misses has zero variance and is dropped by
  GRPO's group filter) and among right answers they prefer the well-formed, shorter one. :class:`RewardFn`
  checks from each component's registered bounds that a completion with the right first answer always scores
  strictly more than any completion with a wrong first answer, and refuses weights for which it would not.
* ``sum``: the plain weighted sum (the earlier default, kept for ablations). With partial credit below rank 1
  and shaping terms it can pay a wrong first answer more than a right one, so it is reported, not refused.

:func:`compute_rewards` returns ``{"total", <each weighted component>, "rank", "pass", "format_ok",
"answers"}`` as float32 arrays (one value per completion) so the trainer logs each separately. ``rank`` is 0
where the gold is not in the top k; ``pass`` is 1 where it is at rank 1 (top-1 as evaluation scores it, whatever
a gate above decided); ``answers`` is the number of entries the answer listed.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Callable, Sequence

import numpy as np
from ml_collections import config_dict

from raredx_jax.rewards.diagnosis import Verification, rank_reward, verify
from raredx_jax.rewards.format import format_reward, length_penalty

log = logging.getLogger(__name__)

DEFAULT_LEAK_PHRASES = (
    "as given",
    "the correct diagnosis is",
    "i was told",
    "we were told",
    "was told that",
    "the provided answer",
    "provided diagnosis",
    "the given diagnosis",
    "given answer",
    "given label",
    "the label",
    "correct answer",
    "reference answer",
    "ground truth",
    "the hint",
    "previous attempt",
    "failed attempt",
    "my earlier answer",
    "my previous answer",
)


def rewards_config() -> config_dict.ConfigDict:
    """``config.rewards`` at its defaults (configs/base.py builds the section from this; the one place they live)."""
    c = config_dict.ConfigDict()
    # Shaping weights are small tie-breakers among right answers (combine=gated): format up to +0.2, length down
    # to -0.2, so a right first answer scores between 0.8 and 1.2 and a wrong one exactly 0
    c.weights = config_dict.ConfigDict({"diagnosis": 1.0, "format": 0.2, "length": 0.2})
    c.combine = "gated"  # gated (shaping only for right first answers) | sum (plain weighted sum); module doc
    c.top_k = 10  # entries linked by the verifier; ranks beyond top_k earn nothing (and are not linked)
    # top1: what evaluation scores (greedy top-1). Partial credit for rank 2+ (reciprocal, linear, ...) gave a
    # completion whose first answer is wrong a positive advantage in groups of misses, the group shape of sparse
    # and hard notes, where every GRPO run that moved the policy lost top-1 (README, GRPO)
    c.decay = "top1"  # top1 | reciprocal | linear | geometric | topk
    # an answer listing more entries than its prompt allows (the payload's max_answers: open_top_k for open
    # prompts, all candidates but one for closed-set prompts) earns no diagnosis reward: copying the candidate
    # list must not pay
    c.enforce_answer_count = True
    c.geometric_base = 0.5
    c.diagnosis_requires_format = False  # True: diagnosis reward only for a closed, non-empty answer block
    # True: diagnosis reward only when the completion cites the note (the RERS leak check: no leak phrase and at
    # least leak_min_findings of the note's findings), so a right answer after reasoning recited from memory
    # earns nothing and RL does not reinforce lucky guesses
    c.diagnosis_requires_grounding = False
    c.format_prefix = ""  # e.g. "<think>" when the chat template pre-fills it into the prompt
    c.format_tolerance = 8  # non-space characters tolerated before <think> / after </answer>
    c.length_max = 0  # tokens; 0 = sampling.max_new_tokens when the full config is given, else no penalty
    c.length_cache = 32  # soft zone before length_max where the penalty ramps 0 -> -1
    c.leak_phrases = DEFAULT_LEAK_PHRASES
    c.leak_min_findings = 2  # RERS: reasoning must mention at least this many findings from the note
    c.leak_min_overlap = 0.5  # fraction of a note phrase's content words that must appear in the reasoning
    return c


def _resolve(cfg: Any) -> tuple[config_dict.ConfigDict, int]:
    """(rewards config with defaults filled, default length_max from sampling.max_new_tokens)."""
    default_max = 0
    if cfg is None:
        sub = None
    elif any(k in cfg for k in ("rewards", "sampling", "model", "stage")):  # the full config
        sub = cfg.rewards if "rewards" in cfg else None
        if "sampling" in cfg and "max_new_tokens" in cfg.sampling:
            default_max = int(cfg.sampling.max_new_tokens)
    else:
        sub = cfg
    out = rewards_config()
    if sub is not None:
        for k in sub.keys():
            v = sub[k]
            if k == "weights":
                out.weights = config_dict.ConfigDict(dict(v.items()) if hasattr(v, "items") else v)
            else:
                if k not in out:
                    raise ValueError(f"config.rewards.{k}: unknown field (known: {sorted(out.keys())})")
                if isinstance(out[k], tuple) and isinstance(v, (list, str)):
                    v = tuple(x.strip() for x in v.split(",")) if isinstance(v, str) else tuple(v)
                out[k] = v
    return out, default_max


# ---------------------------------------------------------------------------------------------------------
# reward components
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RewardContext:
    text: str
    case: Any
    gold: tuple[str, ...]
    verification: Verification
    length: int
    truncated: bool
    cfg: config_dict.ConfigDict
    length_max: int


REWARDS: dict[str, Callable[[RewardContext], float]] = {}
#: (lowest, highest) value each registered component can return; the ``gated`` alignment check reads them.
REWARD_BOUNDS: dict[str, tuple[float, float]] = {}
COMBINES = ("gated", "sum")


def register_reward(name: str, bounds: tuple[float, float] = (-1.0, 1.0)):
    """Decorator: ``@register_reward("my_reward", bounds=(0, 1)) def f(ctx: RewardContext) -> float``.

    ``bounds`` are the values the function can return; :class:`RewardFn` uses them to prove that shaping terms
    can never lift a wrong first answer above a right one.
    """

    def deco(fn):
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        lo, hi = float(bounds[0]), float(bounds[1])
        if lo > hi:
            raise ValueError(f"reward {name!r}: bounds {bounds} are not (low, high)")
        REWARDS[name] = fn
        REWARD_BOUNDS[name] = (lo, hi)
        return fn

    return deco


def answer_count_ok(ctx: RewardContext) -> bool:
    """Whether the answer lists no more entries than the prompt allows (payload ``max_answers``; 0 = any)."""
    limit = int(getattr(ctx.case, "max_answers", 0) or 0)
    return not (ctx.cfg.enforce_answer_count and limit and ctx.verification.answers > limit)


@register_reward("diagnosis", bounds=(0.0, 1.0))
def _diagnosis(ctx: RewardContext) -> float:
    if ctx.cfg.diagnosis_requires_format and not ctx.verification.format_ok:
        return 0.0
    if not answer_count_ok(ctx):
        return 0.0
    reward = rank_reward(ctx.verification.rank, ctx.cfg.top_k, ctx.cfg.decay, ctx.cfg.geometric_base)
    if reward and ctx.cfg.diagnosis_requires_grounding and not grounded(ctx):
        return 0.0
    return reward


def grounded(ctx: RewardContext) -> bool:
    """Whether the completion cites the case's note (:func:`leak_check` with the ``leak_*`` settings)."""
    note, name = getattr(ctx.case, "text", None), getattr(ctx.case, "diagnosis_name", None)
    if isinstance(ctx.case, dict):
        note, name = ctx.case.get("text"), ctx.case.get("diagnosis_name", "")
    if not note:
        raise ValueError("rewards.diagnosis_requires_grounding needs cases with a note (Case.text); got "
                         f"{type(ctx.case).__name__}")
    return leak_check(ctx.text, note, name or "", phrases=ctx.cfg.leak_phrases,
                      min_findings=int(ctx.cfg.leak_min_findings), min_overlap=float(ctx.cfg.leak_min_overlap))[0]


@register_reward("format", bounds=(0.0, 1.0))
def _format(ctx: RewardContext) -> float:
    return format_reward(ctx.text, prefix=ctx.cfg.format_prefix, tolerance=ctx.cfg.format_tolerance)


@register_reward("length", bounds=(-1.0, 0.0))
def _length(ctx: RewardContext) -> float:
    return length_penalty(ctx.length, ctx.length_max, ctx.cfg.length_cache, ctx.truncated)


def gold_ids(case: Any) -> tuple[str, ...]:
    """Gold ids of a Case (``.diagnosis``), a dict with ``"diagnosis"``, or a plain id / tuple of ids."""
    if isinstance(case, str):
        return (case,)
    if isinstance(case, dict):
        g = case["diagnosis"]
    elif hasattr(case, "diagnosis"):
        g = case.diagnosis
    else:
        g = case
    return (g,) if isinstance(g, str) else tuple(g)


class RewardFn:
    """Reward of a batch of completions: ``RewardFn(linker, config)(completions, cases) -> dict of arrays``.

    config: the full ConfigDict (reads ``rewards`` and ``sampling.max_new_tokens``) or ``config.rewards``.
    """

    def __init__(self, linker: Any, cfg: Any = None):
        self.linker = linker
        self.cfg, default_max = _resolve(cfg)
        self.length_max = int(self.cfg.length_max) or default_max
        self.weights = {k: float(v) for k, v in self.cfg.weights.items()}
        for k in self.weights:
            if k not in REWARDS:
                raise ValueError(f"config.rewards.weights.{k}: no such reward (registered: {sorted(REWARDS)})")
        if self.cfg.combine not in COMBINES:
            raise ValueError(f"config.rewards.combine={self.cfg.combine!r}: expected one of {COMBINES}")
        self.right_min, self.wrong_max = self.score_bounds()
        self.aligned = self.right_min > self.wrong_max
        if self.cfg.combine == "gated" and not self.aligned:
            raise ValueError(
                f"config.rewards: with these weights and decay={self.cfg.decay!r} a completion whose first answer is "
                f"wrong can score {self.wrong_max:.3f} and one whose first answer is right as little as "
                f"{self.right_min:.3f}; lower the negative shaping weights below weights.diagnosis "
                f"({self.weights.get('diagnosis', 0.0)}) times (1 - the rank-2 reward), or use decay=top1")
        if not self.aligned:
            log.warning("rewards.combine=%s: a wrong first answer can score %.3f, a right one as little as %.3f "
                        "(the reward does not follow top-1)", self.cfg.combine, self.wrong_max, self.right_min)

    def score_bounds(self) -> tuple[float, float]:
        """(lowest total of a completion whose first answer is right, highest total of one whose first answer is
        wrong), from the weights, the decay and each component's registered bounds."""
        w_d = self.weights.get("diagnosis", 0.0)
        top_k = int(self.cfg.top_k)
        partial = max((rank_reward(r, top_k, self.cfg.decay, self.cfg.geometric_base) for r in range(2, top_k + 1)),
                      default=0.0)
        lowest = sum(w * (REWARD_BOUNDS[k][0] if w > 0 else REWARD_BOUNDS[k][1])
                     for k, w in self.weights.items() if k != "diagnosis")
        highest = sum(w * (REWARD_BOUNDS[k][1] if w > 0 else REWARD_BOUNDS[k][0])
                      for k, w in self.weights.items() if k != "diagnosis")
        right_min = w_d * 1.0 + lowest
        # gated: a wrong first answer gets no shaping at all
        wrong_max = w_d * partial + (highest if self.cfg.combine == "sum" else 0.0)
        if w_d <= 0:
            right_min, wrong_max = lowest, highest
        return float(right_min), float(wrong_max)

    def __call__(
        self,
        completions: Sequence[str],
        cases: Sequence[Any],
        lengths: Sequence[int] | None = None,
        truncated: Sequence[bool] | None = None,
    ) -> dict[str, np.ndarray]:
        """completions[i] answers cases[i]; or ``len(cases)`` prompts each with G contiguous completions.

        lengths: completion lengths in tokens (the length penalty's unit); default: whitespace word counts.
        truncated: whether each completion hit the generation limit; default: ``lengths >= length_max``.
        """
        n = len(completions)
        if len(cases) == 0 or n % len(cases):
            raise ValueError(f"{n} completions for {len(cases)} cases: need completions = cases x G")
        g = n // len(cases)
        if lengths is None:
            lengths = [len((t or "").split()) for t in completions]
        if len(lengths) != n:
            raise ValueError(f"lengths has {len(lengths)} entries for {n} completions")
        if truncated is None:
            truncated = [bool(self.length_max) and int(length) >= self.length_max for length in lengths]
        comps: dict[str, list[float]] = {k: [] for k in self.weights}
        rank, passed, earned, fmt_ok, answers = [], [], [], [], []
        for i, text in enumerate(completions):
            case = cases[i // g]
            gold = gold_ids(case)
            ver = verify(text or "", gold, self.linker, top_k=int(self.cfg.top_k))
            ctx = RewardContext(
                text=text or "", case=case, gold=gold, verification=ver, length=int(lengths[i]),
                truncated=bool(truncated[i]), cfg=self.cfg, length_max=self.length_max,
            )
            for k in self.weights:
                comps[k].append(float(REWARDS[k](ctx)))
            rank.append(float(ver.rank or 0))
            passed.append(1.0 if ver.rank == 1 else 0.0)
            # the gate of the shaping terms: a right first answer that also earned the diagnosis reward
            earned.append(1.0 if ver.rank == 1 and (comps["diagnosis"][-1] > 0 if "diagnosis" in comps else True)
                          else 0.0)
            fmt_ok.append(1.0 if ver.format_ok else 0.0)
            answers.append(float(ver.answers))
        out = {k: np.asarray(v, np.float32) for k, v in comps.items()}
        pass_arr = np.asarray(passed, np.float32)
        earned_arr = np.asarray(earned, np.float32)
        total = np.zeros(n, np.float32)
        for k, w in self.weights.items():
            gate = earned_arr if (self.cfg.combine == "gated" and k != "diagnosis") else np.float32(1.0)
            total += np.float32(w) * out[k] * gate
        out["total"] = total
        out["rank"] = np.asarray(rank, np.float32)
        out["pass"] = pass_arr
        out["format_ok"] = np.asarray(fmt_ok, np.float32)
        out["answers"] = np.asarray(answers, np.float32)
        return out


def compute_rewards(
    completions: Sequence[str],
    cases: Sequence[Any],
    linker: Any,
    cfg: Any = None,
    lengths: Sequence[int] | None = None,
    truncated: Sequence[bool] | None = None,
) -> dict[str, np.ndarray]:
    """Functional form of :class:`RewardFn`."""
    return RewardFn(linker, cfg)(completions, cases, lengths=lengths, truncated=truncated)


# ---------------------------------------------------------------------------------------------------------
# RERS leak check
# ---------------------------------------------------------------------------------------------------------

_STOP = frozenset(
    """a an the and or but of in on at to for from by with without into onto over under as is are was were be
    been being has have had do does did this that these those his her their its he she they it who whom which
    what when where while also both either neither not no nor very than then there here such some any all each
    other per about after before since during until patient patients year years yr yrs old month months week
    weeks day days age aged boy girl man woman male female child children infant toddler adolescent adult
    baby son daughter mother father presents presented presenting presentation history noted notes shows
    showed showing reports reported reveals revealed revealing exam examination findings finding include
    includes including included evaluation referred seen clinic features feature signs sign symptoms symptom
    currently recently now new further additional well present time times since""".split()
)
_SPLIT_PHRASES = re.compile(
    r"[.;:,!?()\[\]\n\r]+|\b(?:and|with|without|but|plus|as well as|along with|also|including|who|which)\b",
    re.IGNORECASE,
)


def _normalise(s: str) -> str:
    s = s.lower().replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    return re.sub(r"\s+", " ", s)


def _stem(w: str) -> str:
    if len(w) > 6:
        return w[:6]
    if len(w) > 3 and w.endswith("s"):
        return w[:-1]
    return w


def _content_stems(s: str, exclude: frozenset[str] = frozenset()) -> list[str]:
    words = re.findall(r"[a-z][a-z0-9]+", s.lower())
    return [_stem(w) for w in words if w not in _STOP and _stem(w) not in exclude and len(w) > 2]


def note_findings(note: str, exclude: frozenset[str] = frozenset()) -> list[frozenset[str]]:
    """Candidate findings of a note: phrases (split at punctuation and conjunctions) as sets of word stems."""
    out, seen = [], set()
    for ph in _SPLIT_PHRASES.split(note or ""):
        stems = frozenset(_content_stems(ph, exclude))
        if stems and stems not in seen:
            seen.add(stems)
            out.append(stems)
    return out


def leak_check(
    reasoning: str,
    note: str,
    gold_name: str,
    phrases: Sequence[str] | None = None,
    min_findings: int = 2,
    min_overlap: float = 0.5,
) -> tuple[bool, str]:
    """RERS acceptance test of a reflected trajectory: (ok, reason).

    Rejects ``reasoning`` (pass the whole completion) when it contains a leak phrase (case-insensitive, word
    bounded; default :data:`DEFAULT_LEAK_PHRASES`), or when it mentions fewer than ``min_findings`` findings of
    the note (capped at the number of findings the note has). A note finding is a phrase of the note (split at
    punctuation and conjunctions) whose content words (stop words and the words of ``gold_name`` removed,
    crudely stemmed) appear in the reasoning for at least ``min_overlap`` of them.
    """
    text = _normalise(reasoning or "")
    if not text.strip():
        return False, "empty reasoning"
    for p in DEFAULT_LEAK_PHRASES if phrases is None else phrases:
        pn = _normalise(p).strip()
        if pn and re.search(r"(?<![a-z0-9])" + re.escape(pn) + r"(?![a-z0-9])", text):
            return False, f"leak phrase {p!r}"
    exclude = frozenset(_content_stems(gold_name or ""))
    findings = note_findings(note, exclude)
    have = set(_content_stems(text))
    hits = [f for f in findings if len(f & have) / len(f) >= min_overlap]
    need = min(min_findings, len(findings))
    if len(hits) < need:
        return False, f"mentions {len(hits)} finding(s) of the note, need {need}"
    return True, f"ok ({len(hits)} note findings)"


__all__ = [
    "RewardFn", "RewardContext", "REWARDS", "REWARD_BOUNDS", "COMBINES", "register_reward", "answer_count_ok",
    "compute_rewards", "rewards_config", "gold_ids",
    "grounded", "leak_check", "note_findings", "DEFAULT_LEAK_PHRASES",
]
