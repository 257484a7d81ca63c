"""Ranking metrics over gold ranks: top-k recall and MRR (rank None = the gold was not in the list)."""
from __future__ import annotations

import math
from typing import Iterable, Sequence


def topk_recall(ranks: Sequence[int | None], k: int) -> float:
    """Fraction of cases whose gold diagnosis is within the first k predictions."""
    if not ranks:
        return 0.0
    return sum(1 for r in ranks if r is not None and r <= k) / len(ranks)


def mean_reciprocal_rank(ranks: Sequence[int | None]) -> float:
    if not ranks:
        return 0.0
    return sum(1.0 / r for r in ranks if r is not None) / len(ranks)


def rank_of(predicted_ids: Sequence[str | None], gold_ids: Iterable[str]) -> int | None:
    """1-based position of the first prediction that is a gold id."""
    gold = set(gold_ids)
    for i, pid in enumerate(predicted_ids, 1):
        if pid is not None and pid in gold:
            return i
    return None


def summarize(ranks: Sequence[int | None], ks: Sequence[int] = (1, 3, 10)) -> dict[str, float]:
    out = {f"top{k}": topk_recall(ranks, k) for k in ks}
    out["mrr"] = mean_reciprocal_rank(ranks)
    out["n"] = float(len(ranks))
    return out


def paired_top1_change(before: dict[str, bool], after: dict[str, bool]) -> dict[str, float | int]:
    """Top-1 hits of two models on the same cases (case id -> hit): cases gained and lost, and the exact
    two-sided McNemar p-value (binomial on the discordant pairs), so a stage-to-stage difference on a few dozen
    cases is reported with how likely it is under no change. Only cases present in both are compared."""
    common = sorted(set(before) & set(after))
    gained = sum(1 for k in common if after[k] and not before[k])
    lost = sum(1 for k in common if before[k] and not after[k])
    return {"n": len(common), "gained": gained, "lost": lost, "p_value": mcnemar_exact_p(gained, lost),
            **paired_difference_ci(gained, lost, len(common))}


def mcnemar_exact_p(gained: int, lost: int) -> float:
    """Exact two-sided McNemar p: a binomial(gained + lost, 1/2) test on the discordant pairs."""
    n = gained + lost
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2 ** n) if n else 1.0


def paired_difference_ci(gained: int, lost: int, n: int, z: float = 1.959964) -> dict[str, float]:
    """The change in top-1 (after - before) on n paired cases and its 95% Wald interval for paired
    proportions: d = (gained - lost) / n, se = sqrt(gained + lost - (gained - lost)^2 / n) / n."""
    if n <= 0:
        return {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    d = (gained - lost) / n
    se = math.sqrt(max(gained + lost - (gained - lost) ** 2 / n, 0.0)) / n
    return {"diff": d, "ci_low": d - z * se, "ci_high": d + z * se}
