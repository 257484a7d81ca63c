"""`benchmarks/accelerator_check.py --cpu-dry`: every section of the one-shot accelerator check runs at tiny shapes
on CPU (the AOT plan in its CPU subprocess, as on an accelerator), and the numbers it reports are right where CPU
can judge them: logits equal transformers (fp32) and are as close as transformers' own bf16 (bf16), attention
implementations agree, the train steps, sampler and GRPO step ran and produced finite values."""
from __future__ import annotations

import json
import math

from benchmarks import accelerator_check as ac


def test_cpu_dry_runs_every_section(tmp_path):
    rc = ac.main(["--cpu-dry", f"--out={tmp_path}"])
    report = json.loads((tmp_path / "accelerator_check.json").read_text())
    md = (tmp_path / "accelerator_check.md").read_text()
    sec = report["sections"]
    errors = {k: v["error"] for k, v in sec.items() if "error" in v}
    assert rc == 0 and not errors, errors
    assert set(sec) == {"logits", "attention", "plan", "sft_dots", "sft_torch", "sampler", "grpo"}
    lg = sec["logits"]
    assert lg["fp32_ok"] and lg["fp32_rel_l2"] < ac.FP32_REL_TOL, lg
    assert lg["bf16_ok"] and lg["bf16_rel_l2_vs_hf_fp32"] > 0, lg  # bf16 really ran in bf16
    impls = sec["attention"]["impls"]
    assert set(impls) == {"xla", "dot_product"} and all(v["ok"] for v in impls.values()), impls
    assert sec["plan"]["dots"]["planned_total"] > sec["plan"]["dots"]["params"] > 0
    for k in ("sft_dots", "sft_torch"):
        assert sec[k]["tokens_per_s"] > 0 and math.isfinite(sec[k]["loss"]), sec[k]
    row = sec["sampler"]["rows"][0]
    assert row["ours_decode_tok_s"] > 0 and row["hf_decode_tok_s"] > 0
    g = sec["grpo"]
    assert g["finite"] and g["warm"]["rollout_s"] > 0 and g["warm"]["update_s"] > 0, g
    for heading in ("Logits vs transformers", "Attention implementations", "SFT train step", "Sampler decode",
                    "One GRPO step"):
        assert heading in md
