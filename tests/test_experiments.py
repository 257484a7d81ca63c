"""The GRPO-arms experiment's report: arms paired against their starting checkpoints, per seed and pooled."""
import json
import os

import pytest

from raredx_jax.experiments import grpo_arms


def _write_eval(path, hits, levels):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cases = [{"case_id": f"c{i}", "llm_rank": 1 if h else None, "level": levels[i % len(levels)]}
             for i, h in enumerate(hits)]
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"sets": {"simulated:test": {"cases": cases}}}, f)


def test_report_pairs_each_arm_with_its_start_and_pools_seeds(tmp_path):
    root = str(tmp_path)
    lv = ["sparse", "hard"]
    n = 40
    for seed in (0, 1):
        base = os.path.join(root, f"s{seed}")
        _write_eval(os.path.join(base, "knowledge_sft", "eval", "eval.json"), [i < 10 for i in range(n)], lv)
        _write_eval(os.path.join(base, "rers_sft", "eval", "eval.json"), [i < 20 for i in range(n)], lv)
        # b: GRPO gains cases 20..25, loses case 0
        _write_eval(os.path.join(base, "grpo", "eval", "eval.json"), [0 < i < 26 for i in range(n)], lv)
        # a: from knowledge SFT, gains 10..29
        _write_eval(os.path.join(base + "-a", "grpo", "eval", "eval.json"), [i < 30 for i in range(n)], lv)
        # c: rejection-sampling SFT, unchanged from RERS-SFT
        _write_eval(os.path.join(base + "-c", "rers_sft", "eval", "eval.json"), [i < 20 for i in range(n)], lv)
    assert grpo_arms.main(["--root", root, "--seeds", "0,1", "--report-only"]) == 0
    with open(os.path.join(root, "grpo_arms.json"), encoding="utf-8") as f:
        rep = json.load(f)
    b = rep["per_seed"]["0"]["b"]["sets"]["simulated:test"]["all"]
    assert (b["before"], b["after"], b["gained"], b["lost"]) == (20, 25, 6, 1)
    assert b["diff"] == pytest.approx(5 / 40) and b["ci_low"] < b["diff"] < b["ci_high"]
    a = rep["per_seed"]["1"]["a"]["sets"]["simulated:test"]["all"]
    assert (a["gained"], a["lost"], a["p_value"]) == (20, 0, pytest.approx(2 / 2 ** 20))
    assert rep["per_seed"]["0"]["c"]["sets"]["simulated:test"]["all"]["gained"] == 0
    pooled = rep["pooled"]["b"]["simulated:test"]
    assert (pooled["seeds"], pooled["n"], pooled["gained"], pooled["lost"]) == (2, 80, 12, 2)
    md = open(os.path.join(root, "grpo_arms.md"), encoding="utf-8").read()
    assert "positive control" in md and "pooled over seeds" in md and "+6/-1" in md


def test_unknown_arm_is_one_clear_error(capsys):
    assert grpo_arms.main(["--arms", "b,z", "--report-only"]) == 2
    assert "--arms: unknown ['z']" in capsys.readouterr().err
