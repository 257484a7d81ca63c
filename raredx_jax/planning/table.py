"""The README's plan table: one `python -m raredx_jax.plan` run per preset x target (each in its own process, as
each target forces its own device count), rendered as markdown.

    python -m raredx_jax.planning.table --stage=configs/knowledge_sft.py \
        --presets=qwen2.5-0.5b,qwen2.5-7b --targets=gpu1,h100x8,tpu_v5p_128 [--trainable=full,lora] [--json=plans.json]

`--trainable=lora` plans the config with `lora.enabled=True` (its `lora.*` settings: rank, targets, quantize).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

GiB = float(1 << 30)


def run_one(stage: str, target: str, preset: str, extra: list[str]) -> dict[str, Any]:
    """The plan's JSON (exit 0 fits, 4 does not) plus the refusal line and the wall time of the run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "plan.json")
        cmd = [sys.executable, "-m", "raredx_jax.plan", f"--config={stage}:{target}",
               f"--config.model.preset={preset}", f"--json={out}", *extra]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode not in (0, 4) or not os.path.exists(out):
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        with open(out, encoding="utf-8") as f:
            plan = json.load(f)
    plan["refusal"] = next((ln for ln in proc.stderr.splitlines() if ln.startswith("plan: error:")), "")
    plan["plan_seconds"] = round(time.time() - t0, 1)
    return plan


def _g(x: float) -> str:
    return f"{x / GiB:.1f}" if x >= GiB / 10 or x == 0 else f"{x / GiB:.3f}"  # LoRA's adapter state: tens of MiB


def trained(plan: dict[str, Any]) -> str:
    """What the row trains: `full` or the LoRA set (rank, quantised base) and its trainable parameter count."""
    n = plan["trainable_params"]
    count = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    name = plan["trainable"].split(" (", 1)[0]
    rank = plan["trainable"].split("(r=", 1)[1].split(",", 1)[0] if "(r=" in plan["trainable"] else ""
    return f"{name}{' r=' + rank if rank else ''}, {count}"


def row(plan: dict[str, Any]) -> str:
    acc = plan["accelerator"] or {}
    train = next((p for p in plan["phases"] if p["name"] in ("train_step", "update")), None)
    t = mfu = "n/a"
    if train and train.get("time_s"):
        t = f"{train['time_s'] * 1e3:,.0f} ms"
        if train.get("model_flops") and acc:
            lo = train["model_flops"] / (train["time_upper_s"] * acc["peak_flops"])
            hi = train["model_flops"] / (train["time_s"] * acc["peak_flops"])
            mfu = f"{lo:.0%} – {hi:.0%}"
    verdict = "fits" if plan["fits"] else "**no**: " + plan["refusal"].split(": ", 2)[-1].split("; ", 1)[-1]
    return (f"| {plan['preset']} | {plan['target']} ({plan['num_devices']}) | {_g(plan['params'])} | "
            f"{_g(plan['optimizer'])} | {_g(plan['gradients'])} | {_g(plan['activations'])} | "
            f"{_g(plan['total'])} / {_g(plan['hbm_bytes'])} | {verdict} | {t} | {mfu} | {trained(plan)} |")


HEADER = ("| preset | target (devices) | params | optimiser | gradients | activations + temps | total / HBM | fits? | "
          "roofline step | implied MFU | trained (parameters) |\n|---|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", default="configs/knowledge_sft.py")
    ap.add_argument("--presets", default="qwen2.5-0.5b,qwen2.5-7b")
    ap.add_argument("--targets", default="gpu1,h100x8,tpu_v5p_128")
    ap.add_argument("--trainable", default="full", help="comma-separated: full, lora (lora.enabled=True)")
    ap.add_argument("--json", default="")
    ap.add_argument("extra", nargs="*", help="further flags for every plan run (after --)")
    a = ap.parse_args(argv)
    plans, lines = [], [HEADER]
    for preset in a.presets.split(","):
        for target in a.targets.split(","):
            for kind in a.trainable.split(","):
                if kind not in ("full", "lora"):
                    ap.error(f"--trainable: {kind!r} is not one of full, lora")
                extra = [*a.extra, *(["--config.lora.enabled=True"] if kind == "lora" else [])]
                p = run_one(a.stage, target, preset, extra)
                plans.append(p)
                lines.append(row(p))
                print(lines[-1], flush=True)
    print("\n".join(lines))
    if a.json:
        with open(a.json + ".tmp", "w", encoding="utf-8") as f:
            json.dump(plans, f, indent=2)
        os.replace(a.json + ".tmp", a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
