"""Evaluation outputs: JSON (everything, per case), a Markdown report, and PNG plots."""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from raredx_jax.evaluation.metrics import topk_recall


def _fmt(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(report: dict[str, Any], title: str = "Evaluation") -> str:
    lines = [f"# {title}", "", f"Candidate diseases: {report.get('n_candidates', '?')}. "
             "Recall in %, MRR in [0, 1]. Baseline = Phrank-style HPO similarity over the same candidates.", ""]
    for name, s in report["sets"].items():
        lines += [f"## {name}", "",
                  f"{s['overall']['n']} cases; {s['n_outside_candidates']} outside the candidate set (not scored); "
                  f"{s['n_import_errors']} import errors" + (f" (report: `{s['import_report']}`)"
                                                             if s.get("import_report") else "") + ".", "",
                  "| subset | n | LLM top-1 | LLM top-3 | LLM top-10 | LLM MRR | format ok | "
                  "baseline top-1 | baseline top-3 | baseline top-10 | baseline MRR |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        rows = [("all", s["overall"])] + list(s["per_level"].items())
        for label, b in rows:
            l_, bl = b["llm"], b["baseline"]
            lines.append(f"| {label} | {b['n']} | {_fmt(l_['top1'])} | {_fmt(l_['top3'])} | {_fmt(l_['top10'])} | "
                         f"{l_['mrr']:.3f} | {_fmt(b['format_ok'])} | {_fmt(bl['top1'])} | {_fmt(bl['top3'])} | "
                         f"{_fmt(bl['top10'])} | {bl['mrr']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def plot_topk(report: dict[str, Any], path: str, kmax: int = 10) -> None:
    import matplotlib  # noqa: PLC0415 - backend: Agg is selected just before pyplot loads, not on import
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - backend: pyplot loads after matplotlib.use("Agg")

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = list(range(1, kmax + 1))
    for name, s in report["sets"].items():
        for who, style in (("llm", "-o"), ("baseline", "--s")):
            ranks = [c[f"{who}_rank"] for c in s["cases"]]
            ax.plot(ks, [100 * topk_recall(ranks, k) for k in ks], style, label=f"{who} · {name}", ms=3)
    ax.set_xlabel("k")
    ax.set_ylabel("top-k recall (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_levels(report: dict[str, Any], path: str) -> None:
    import matplotlib  # noqa: PLC0415 - backend: Agg is selected just before pyplot loads, not on import
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - backend: pyplot loads after matplotlib.use("Agg")

    bars = [(f"{name}\n{lvl}", b) for name, s in report["sets"].items() for lvl, b in s["per_level"].items()]
    if not bars:
        return
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(bars)), 4))
    x = np.arange(len(bars))
    ax.bar(x - 0.2, [100 * b["llm"]["top1"] for _, b in bars], 0.4, label="LLM top-1")
    ax.bar(x + 0.2, [100 * b["baseline"]["top1"] for _, b in bars], 0.4, label="baseline top-1")
    ax.set_xticks(x, [lbl for lbl, _ in bars], fontsize=7)
    ax.set_ylabel("top-1 recall (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_stages(rows: Sequence[dict[str, Any]], path: str) -> None:
    """Stage-by-stage top-1/top-10 (pipeline table)."""
    import matplotlib  # noqa: PLC0415 - backend: Agg is selected just before pyplot loads, not on import
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - backend: pyplot loads after matplotlib.use("Agg")

    if not rows:
        return
    sets = sorted({r["set"] for r in rows})
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
    for ax, name in zip(axes[0], sets):
        sub = {r["stage"]: r for r in rows if r["set"] == name}
        x = np.arange(len(stages))
        ax.bar(x - 0.2, [100 * sub[s]["llm_top1"] if s in sub else 0 for s in stages], 0.4, label="top-1")
        ax.bar(x + 0.2, [100 * sub[s]["llm_top10"] if s in sub else 0 for s in stages], 0.4, label="top-10")
        base = next(iter(sub.values()))
        ax.axhline(100 * base["baseline_top1"], color="k", ls="--", lw=1, label="baseline top-1")
        ax.set_xticks(x, stages, rotation=20, fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict[str, Any], out_dir: str, title: str = "Evaluation") -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "eval.json"), "markdown": os.path.join(out_dir, "eval.md"),
             "topk_png": os.path.join(out_dir, "topk.png"), "levels_png": os.path.join(out_dir, "levels.png")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(markdown(report, title))
    plot_topk(report, paths["topk_png"])
    plot_levels(report, paths["levels_png"])
    return paths
