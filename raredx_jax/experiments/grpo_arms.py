"""Does GRPO earn its place? Three arms per training seed, each a repo command, compared paired on the same cases.

    python -m raredx_jax.experiments.grpo_arms --root=runs/grpo_arms --seeds=0,1,2 [--arms=b,a,c] [--config.*=...]

Per seed ``s`` (``config.seed``; the data, and so every held-out case, are the same for every seed):

* **b, the pipeline default**: ``python -m raredx_jax.train --config=configs/pipeline.py
  --config.run_dir=ROOT/s<s> --config.seed=s``: knowledge SFT -> RERS -> RERS-SFT -> GRPO, each evaluated on the
  pipeline's held-out sets. GRPO is compared with the RERS-SFT checkpoint it started from.
* **a, positive control**: GRPO alone from the *knowledge-SFT* checkpoint (a weaker start, where most groups
  have mixed outcomes), in ``ROOT/s<s>-a`` beside copies of ``data/ knowledge_sft/ rers/``. If GRPO cannot raise
  top-1 here, the RL stage does not learn; if it can here but not in b, the gain does not transfer past RERS-SFT.
* **c, matched control**: rejection-sampling SFT with as many fresh samples as GRPO drew (RERS's direct round
  from the RERS-SFT checkpoint at GRPO's temperature, no reflection, then RERS-SFT on the kept trajectories),
  in ``ROOT/s<s>-c``. Does RL add anything beyond filtering the policy's own right answers? Matched in samples
  (from arm b's resolved GRPO config), not in updates: the SFT runs ``configs/rers_sft.py``'s own schedule.

Every arm's checkpoint is evaluated by the pipeline on the same sets (``eval.json`` per stage). Written to
``ROOT/grpo_arms.md`` / ``.json``: per seed, per arm, per case set and difficulty level, top-1 before -> after,
cases gained / lost, exact McNemar p and the 95% interval of the paired change; over the seeds, the mean change
with its range and whether every seed shows a gain with p < 0.05 (the seeds share the cases, so no pooled test);
and
``grpo_arms_lessons.png``, each GRPO run's rollout pass rate per lesson within the steps it was the lesson.
Arms already finished are not rerun (each stage resumes), so the command can be repeated until it completes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Sequence

from raredx_jax.evaluation.compare import compare_reports
from raredx_jax.fileio import atomic_directory

ARMS = ("b", "a", "c")
ARM_TITLES = {"a": "GRPO from knowledge SFT (positive control)", "b": "GRPO from RERS-SFT (pipeline default)",
              "c": "rejection-sampling SFT from RERS-SFT, matched samples (control)"}


def _train(args: Sequence[str], log_path: str) -> None:
    """One pipeline command; its console goes to ``log_path`` (it never holds note text)."""
    cmd = [sys.executable, "-m", "raredx_jax.train", "--config=configs/pipeline.py", *args]
    print(f"[grpo_arms] {' '.join(cmd[2:])}  (log {log_path})", flush=True)
    with open(log_path, "a", encoding="utf-8") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if rc:
        raise SystemExit(f"grpo_arms: command failed with exit {rc}; see {log_path}")


def _copy(src_root: str, dst_root: str, names: Sequence[str]) -> None:
    """Copy arm b's finished stage dirs into an arm's run dir (each published whole, never half-copied; an
    existing copy is kept, so a rerun resumes the arm)."""

    for name in names:
        src, dst = os.path.join(src_root, name), os.path.join(dst_root, name)
        if not os.path.isdir(dst):
            os.makedirs(dst_root, exist_ok=True)
            with atomic_directory(dst, what="grpo_arms copy") as tmp:
                shutil.copytree(src, tmp, dirs_exist_ok=True)


def _resolved_grpo(base: str) -> dict:
    """The GRPO stage's resolved config in arm b's run (what it actually ran with, overrides included)."""
    path = os.path.join(base, "grpo", "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise SystemExit(f"grpo_arms: {path} missing: arm c matches arm b's GRPO, so run arm b first") from None


def run_seed(root: str, seed: int, arms: Sequence[str], extra: Sequence[str]) -> None:
    base = os.path.join(root, f"s{seed}")
    os.makedirs(root, exist_ok=True)
    common = [f"--config.seed={seed}", *extra]
    if "b" in arms or "a" in arms or "c" in arms:  # every arm starts from b's earlier stages
        _train([f"--config.run_dir={base}", *common], os.path.join(root, f"s{seed}.log"))
    if "a" in arms:
        arm = base + "-a"
        _copy(base, arm, ("data", "knowledge_sft", "rers"))  # rers: the journal the curriculum prior reads
        _train([f"--config.run_dir={arm}", *common, "--config.pipeline.stages=('grpo',)",
                f"--config.pipeline.overrides.grpo=model.init_from={os.path.abspath(arm)}/knowledge_sft"],
               os.path.join(root, f"s{seed}-a.log"))
    if "c" in arms:
        arm = base + "-c"
        _copy(base, arm, ("data", "knowledge_sft"))
        g = _resolved_grpo(base)
        with open(os.path.join(base, "data", "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        n_train = _train_cases(manifest)
        drawn = int(g["grpo"]["steps"]) * int(g["grpo"]["prompts_per_step"]) * int(g["grpo"]["group_size"])
        samples = max(1, round(drawn / max(n_train, 1)))  # per training case, as many as GRPO drew in all
        start = os.path.abspath(os.path.join(base, "rers_sft"))
        _train([f"--config.run_dir={arm}", *common, "--config.pipeline.stages=('rers','rers_sft')",
                f"--config.pipeline.overrides.rers=model.init_from={start},rers.reflection_tries=0,"
                f"rers.num_samples={samples},sampling.temperature={g['sampling']['temperature']}",
                f"--config.pipeline.overrides.rers_sft=model.init_from={start}"],
               os.path.join(root, f"s{seed}-c.log"))


def _train_cases(manifest: dict) -> int:
    """Training notes in the data manifest (the simulated train split)."""
    n = (manifest.get("datasets") or {}).get("raredx_simulated_cases", {}).get("train")
    if not isinstance(n, int):
        raise SystemExit("grpo_arms: data/manifest.json names no simulated training notes")
    return n


def _report(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def arm_comparisons(root: str, seed: int) -> dict[str, dict]:
    """{arm: {"vs": stage, "sets": compare_reports(...)}} for every arm whose reports exist."""
    base = os.path.join(root, f"s{seed}")
    ev = lambda run, stage: _report(os.path.join(run, stage, "eval", "eval.json"))  # noqa: E731
    pairs = {"b": (ev(base, "rers_sft"), ev(base, "grpo"), "rers_sft"),
             "a": (ev(base, "knowledge_sft"), ev(base + "-a", "grpo"), "knowledge_sft"),
             "c": (ev(base, "rers_sft"), ev(base + "-c", "rers_sft"), "rers_sft"),
             "b_vs_c": (ev(base + "-c", "rers_sft"), ev(base, "grpo"), "arm c")}
    out = {}
    for arm, (before, after, vs) in pairs.items():
        if before and after:
            out[arm] = {"vs": vs, "sets": compare_reports(before, after)}
    return out


def pooled(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """Gained / lost summed over the seeds, per arm and case set, with the mean change and its range over seeds.
    The seeds share the cases, so no pooled p or interval is given (they would treat repeated cases as new)."""
    out: dict[str, dict[str, dict]] = {}
    for comps in per_seed.values():
        for arm, c in comps.items():
            for name, rows in c["sets"].items():
                acc = out.setdefault(arm, {}).setdefault(name, {"n": 0, "gained": 0, "lost": 0, "seeds": 0})
                acc["n"] += rows["all"]["n"]
                acc["gained"] += rows["all"]["gained"]
                acc["lost"] += rows["all"]["lost"]
                acc["seeds"] += 1
    for arm, sets in out.items():
        for name, acc in sets.items():
            acc["diff"] = (acc["gained"] - acc["lost"]) / max(acc["n"], 1)
            diffs = [per_seed[s][arm]["sets"][name]["all"]["diff"] for s in per_seed
                     if arm in per_seed[s] and name in per_seed[s][arm]["sets"]]
            acc["diff_min"], acc["diff_max"] = min(diffs), max(diffs)
            # every seed's own p below 0.05 with the same sign: the issue's "holds across seeds"
            ps = [per_seed[s][arm]["sets"][name]["all"] for s in per_seed
                  if arm in per_seed[s] and name in per_seed[s][arm]["sets"]]
            acc["every_seed_gain_p05"] = all(r["p_value"] < 0.05 and r["gained"] > r["lost"] for r in ps)
    return out


def _fmt(rows: dict) -> str:
    r = rows["all"]
    return (f"{100 * r['before'] / r['n']:.1f} -> {100 * r['after'] / r['n']:.1f} "
            f"({100 * r['diff']:+.1f}, 95% CI {100 * r['ci_low']:+.1f} to {100 * r['ci_high']:+.1f}; "
            f"+{r['gained']}/-{r['lost']}, p={r['p_value']:.3f})")


def markdown(per_seed: dict[int, dict[str, dict]], pool: dict[str, dict[str, dict]], command: str) -> str:
    lines = ["# GRPO arms: paired top-1 against each arm's starting checkpoint", "",
             f"Command: `{command}`. Top-1 in % before -> after on the same held-out cases, the paired change "
             "with its 95% interval, cases gained / lost and the exact McNemar p.", ""]
    for seed, comps in sorted(per_seed.items()):
        lines += [f"## seed {seed}", "", "| arm | vs | case set | top-1 | per level (+gained/-lost) |",
                  "|---|---|---|---|---|"]
        for arm, c in comps.items():
            for name, rows in c["sets"].items():
                levels = ", ".join(f"{lv} +{r['gained']}/-{r['lost']}" for lv, r in rows.items() if lv != "all")
                lines.append(f"| {ARM_TITLES.get(arm, 'GRPO (b) vs control (c)')} | {c['vs']} | {name} | "
                             f"{_fmt(rows)} | {levels or '-'} |")
        lines.append("")
    if pool:
        lines += ["## over seeds (the seeds share the cases: no pooled test; a claim holds if every seed shows it)",
                  "", "| arm | case set | seeds | mean change (range over seeds) | +gained/-lost summed | "
                  "gain with p < 0.05 on every seed |", "|---|---|---|---|---|---|"]
        for arm, sets in pool.items():
            for name, a in sets.items():
                lines.append(f"| {arm} | {name} | {a['seeds']} | {100 * a['diff']:+.1f} ({100 * a['diff_min']:+.1f} "
                             f"to {100 * a['diff_max']:+.1f}) | +{a['gained']}/-{a['lost']} | "
                             f"{'yes' if a['every_seed_gain_p05'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot_lessons(root: str, seeds: Sequence[int], path: str) -> bool:
    """Rollout pass rate of each lesson's own samples per step, within the steps it was the current lesson."""
    import matplotlib  # noqa: PLC0415 - backend: Agg is selected just before pyplot loads, not on import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - backend: pyplot loads after matplotlib.use("Agg")

    runs = [(f"s{s} {arm}", os.path.join(root, f"s{s}" + suffix, "grpo"))
            for s in seeds for arm, suffix in (("b", ""), ("a", "-a"))]
    runs = [(name, d) for name, d in runs if os.path.isfile(os.path.join(d, "summary.json"))]
    if not runs:
        return False
    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 2.4 * len(runs)), squeeze=False)
    for ax, (name, d) in zip(axes[:, 0], runs):
        with open(os.path.join(d, "summary.json"), encoding="utf-8") as f:
            trends = json.load(f).get("lesson_trends", {})
        recs = [json.loads(x) for x in open(os.path.join(d, "metrics.jsonl"), encoding="utf-8")]
        recs = [r for r in recs if r.get("kind", "train") == "train"]
        for lesson, t in trends.items():
            a, b = t["steps"]
            pts = [(r["step"], r[f"reward/lesson/{lesson}/pass"]) for r in recs
                   if a <= r["step"] <= b and f"reward/lesson/{lesson}/pass" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=lesson)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("rollout pass")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(fontsize=7, loc="lower right")
    axes[-1, 0].set_xlabel("GRPO step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="runs/grpo_arms")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--arms", default="b,a,c")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report from finished arms")
    a, extra = p.parse_known_args(argv)
    bad_extra = [x for x in extra if not x.startswith("--config.")]
    if bad_extra:
        print(f"grpo_arms: error: unknown arguments {bad_extra} (only --config.* flags pass to the pipeline)",
              file=sys.stderr)
        return 2
    a.extra = extra
    seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    bad = [x for x in arms if x not in ARMS]
    if bad:
        print(f"grpo_arms: error: --arms: unknown {bad}; expected some of {ARMS}", file=sys.stderr)
        return 2
    t0 = time.time()
    if not a.report_only:
        for s in seeds:
            run_seed(a.root, s, arms, a.extra)
    per_seed = {s: arm_comparisons(a.root, s) for s in seeds}
    per_seed = {s: c for s, c in per_seed.items() if c}
    pool = pooled(per_seed) if len(per_seed) > 1 else {}
    command = "python -m raredx_jax.experiments.grpo_arms " + " ".join(argv if argv is not None else sys.argv[1:])
    md = markdown(per_seed, pool, command.strip())
    with open(os.path.join(a.root, "grpo_arms.md"), "w", encoding="utf-8") as f:
        f.write(md)
    with open(os.path.join(a.root, "grpo_arms.json"), "w", encoding="utf-8") as f:
        json.dump({"per_seed": per_seed, "pooled": pool}, f, indent=1)
    plot_lessons(a.root, seeds, os.path.join(a.root, "grpo_arms_lessons.png"))
    print(md)
    print(f"[grpo_arms] {time.time() - t0:.0f} s; report {os.path.join(a.root, 'grpo_arms.md')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
