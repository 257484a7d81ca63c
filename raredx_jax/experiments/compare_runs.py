"""Are two pipeline runs the same? `python -m raredx_jax.experiments.compare_runs RUN_A RUN_B`

Why: a change that claims not to alter what the recipe computes (a refactor, a rename, a new code path that
should be equivalent) shows it by running the embedded-default pipeline before and after and comparing what
every stage produced, not only the final table: every metrics record of every training step, every RERS
journal line (samples, ranks, kept trajectories), every evaluated case (rank, linked ids, tokens, finish),
the knowledge probe, the stage summaries and the results table. Wall times, throughput, compile times and the
run directory's own path are left out (they differ between any two runs); everything else must be equal to the
last digit. Exit 0 when every item is equal, 1 otherwise (the first difference of each item is printed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

#: Keys that measure time or speed, never what was computed (any key ending in `_seconds` or `_per_s` too).
VOLATILE = frozenset({
    "seconds", "compile_seconds", "tokens_per_s", "mfu", "step_time_s", "rollout_s", "update_s",
    "sample_tokens_per_s", "train_tokens_per_s", "cases_per_s", "time", "wall_s", "wall_seconds",
})
STAGES = ("knowledge_sft", "rers", "rers_sft", "grpo", "export")
#: Per stage directory: the files compared (JSON or JSONL), when the first run has them.
FILES = ("metrics.jsonl", "summary.json", "probe.json", "eval/eval.json", "journal/shard-00000-of-00001.jsonl",
         "curriculum.json")


def _clean(value: Any, root: str) -> Any:
    """`value` without volatile keys, with the run root in strings replaced by `<run>`."""
    if isinstance(value, dict):
        return {k: _clean(v, root) for k, v in value.items()
                if k not in VOLATILE and not k.endswith(("_seconds", "_per_s"))}
    if isinstance(value, list):
        return [_clean(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(root, "<run>")
    return value


def _load(path: str, root: str) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [_clean(json.loads(line), root) for line in f if line.strip()]
        return [_clean(json.load(f), root)]


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    if type(a) is not type(b):
        return f"{where or '.'}: {a!r} != {b!r}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}.{k}: only in {'B' if k not in a else 'A'}"
            d = _first_difference(a[k], b[k], f"{where}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where or '.'}: {len(a)} != {len(b)} entries"
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{where}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{where or '.'}: {a!r} != {b!r}"


def compare_runs(run_a: str, run_b: str) -> list[tuple[str, str, str]]:
    """(item, "same" | "different" | "missing in B", first difference) for every item the first run has."""
    root_a, root_b = os.path.abspath(run_a), os.path.abspath(run_b)
    items = [("results.json", "results.json")] + [
        (f"{stage}/{name}", os.path.join(stage, name)) for stage in STAGES for name in FILES]
    out = []
    for label, rel in items:
        pa, pb = os.path.join(root_a, rel), os.path.join(root_b, rel)
        if not os.path.isfile(pa):
            continue
        if not os.path.isfile(pb):
            out.append((label, "missing in B", ""))
            continue
        diff = _first_difference(_load(pa, root_a), _load(pb, root_b))
        out.append((label, "different" if diff else "same", diff or ""))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a", help="a pipeline run directory (e.g. runs/pipeline of the commit before)")
    ap.add_argument("run_b", help="the run directory to compare with it")
    args = ap.parse_args(argv)
    for path in (args.run_a, args.run_b):
        if not os.path.isdir(path):
            print(f"compare_runs: error: {path}: not a directory", file=sys.stderr)
            return 2
    rows = compare_runs(args.run_a, args.run_b)
    if not rows:
        print(f"compare_runs: error: {args.run_a} holds no pipeline outputs", file=sys.stderr)
        return 2
    for label, status, diff in rows:
        print(f"{label:45s} {status}" + (f"  ({diff})" if diff else ""))
    same = all(status == "same" for _, status, _ in rows)
    print(f"{sum(s == 'same' for _, s, _ in rows)} of {len(rows)} items identical" + ("" if same else "; NOT the same"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
