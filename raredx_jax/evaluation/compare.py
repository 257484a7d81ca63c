"""Paired top-1 comparison of two evaluation reports on the same cases (e.g. a side run against the stage it
started from): `python -m raredx_jax.evaluation.compare BEFORE/eval.json AFTER/eval.json`.

Per case set and per difficulty level: top-1 before -> after, cases gained / lost and the exact McNemar p
(`metrics.paired_top1_change`, the pipeline table's comparison). Reads case ids and ranks only, never notes.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from raredx_jax.evaluation.metrics import paired_top1_change


def _hits(cases: list[dict], level: str | None = None) -> dict[str, bool]:
    return {c["case_id"]: c["llm_rank"] == 1 for c in cases if level is None or c.get("level") == level}


def compare_reports(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{set: {"all": change, "<level>": change, ...}} for every case set both reports hold."""
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(before["sets"]) & set(after["sets"])):
        a, b = before["sets"][name].get("cases", []), after["sets"][name].get("cases", [])
        if not a or not b:
            raise ValueError(f"case set {name!r}: a report has no per-case results to pair")
        rows = {"all": {**paired_top1_change(_hits(a), _hits(b)),
                        "before": sum(_hits(a).values()), "after": sum(_hits(b).values())}}
        for level in sorted({c.get("level") for c in a if c.get("level")}):
            ha, hb = _hits(a, level), _hits(b, level)
            rows[level] = {**paired_top1_change(ha, hb), "before": sum(ha.values()), "after": sum(hb.values())}
        out[name] = rows
    if not out:
        raise ValueError(f"no case set in common: {sorted(before['sets'])} vs {sorted(after['sets'])}")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[1].strip(), file=sys.stderr)
        return 2
    reports = []
    for path in argv:
        with open(path, encoding="utf-8") as f:
            reports.append(json.load(f))
    for name, rows in compare_reports(*reports).items():
        for level, r in rows.items():
            print(f"{name} {level}: top-1 {r['before']} -> {r['after']} of {r['n']} (+{r['gained']} / "
                  f"-{r['lost']}, McNemar p={r['p_value']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
