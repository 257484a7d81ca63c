"""Time one evaluation stage as the pipeline runs it: the run's own saved config, its checkpoint, one case set.

    python -m benchmarks.eval_stage --run=runs/exp/s0/grpo --cases=imported:test --out=/tmp/ev [--static]

Prints the wall time; the set's own `seconds` (LLM generation + scoring) is in <out>/eval.json. `--static` turns
continuous batching off (`sampling.continuous=False`) to compare the two paths on the same checkpoint and cases.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from ml_collections import ConfigDict

from raredx_jax.evaluate import evaluate_checkpoint


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a stage's run dir holding config.json and checkpoints/")
    ap.add_argument("--cases", default="imported:test")
    ap.add_argument("--out", required=True)
    ap.add_argument("--static", action="store_true")
    a = ap.parse_args(argv)
    with open(os.path.join(a.run, "config.json"), encoding="utf-8") as f:
        cfg = ConfigDict(json.load(f))
    if a.static:
        cfg.sampling.continuous = False
    t = time.time()
    evaluate_checkpoint(cfg, a.run, a.cases.split(","), a.out, progress=False)
    print(f"seconds {time.time() - t:.1f}; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
