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
    assert "p_value" not in pooled and pooled["diff_min"] == pooled["diff_max"] == pytest.approx(5 / 40)
    assert rep["pooled"]["a"]["simulated:test"]["every_seed_gain_p05"]  # +20/-0 on each seed
    assert not pooled["every_seed_gain_p05"]  # +6/-1: p = 0.125
    md = open(os.path.join(root, "grpo_arms.md"), encoding="utf-8").read()
    assert "positive control" in md and "over seeds" in md and "+6/-1" in md


def test_arm_commands_chain_the_pipeline_and_match_samples(tmp_path, monkeypatch):
    """The commands each arm runs: b the pipeline; a GRPO alone from the copied knowledge-SFT checkpoint; c RERS
    without reflection from b's RERS-SFT checkpoint at b's GRPO temperature, as many samples per case as b's
    GRPO drew, then RERS-SFT from the same checkpoint. Extra --config flags reach every command."""
    root = str(tmp_path)
    base = os.path.join(root, "s3")
    for d in ("data", "knowledge_sft", "rers", "rers_sft", "grpo"):
        os.makedirs(os.path.join(base, d))
    with open(os.path.join(base, "data", "manifest.json"), "w", encoding="utf-8") as f:
        json.dump({"datasets": {"raredx_simulated_cases": {"train": 192}}}, f)
    with open(os.path.join(base, "grpo", "config.json"), "w", encoding="utf-8") as f:
        json.dump({"grpo": {"steps": 32, "prompts_per_step": 8, "group_size": 4}, "sampling": {"temperature": 0.5}},
                  f)
    calls = []
    monkeypatch.setattr(grpo_arms, "_train", lambda args, log: calls.append(list(args)))
    assert grpo_arms.main(["--root", root, "--seeds", "3", "--config.pipeline.scale=smoke"]) == 0
    b, a, c = calls
    assert b == [f"--config.run_dir={base}", "--config.seed=3", "--config.pipeline.scale=smoke"]
    assert a[:3] == [f"--config.run_dir={base}-a", "--config.seed=3", "--config.pipeline.scale=smoke"]
    assert "--config.pipeline.stages=('grpo',)" in a and a[-1].endswith(f"model.init_from={base}-a/knowledge_sft")
    assert os.path.isdir(base + "-a/rers") and os.path.isdir(base + "-c/knowledge_sft")
    rers = next(x for x in c if x.startswith("--config.pipeline.overrides.rers="))
    # 32 steps x 8 prompts x 4 samples over 192 training notes = 5.33 -> 5 per case
    assert rers == (f"--config.pipeline.overrides.rers=model.init_from={base}/rers_sft,rers.reflection_tries=0,"
                    "rers.num_samples=5,sampling.temperature=0.5")
    assert c[-1] == f"--config.pipeline.overrides.rers_sft=model.init_from={base}/rers_sft"
    assert grpo_arms.main(["--root", root, "--bogus"]) == 2


def test_unknown_arm_is_one_clear_error(capsys):
    assert grpo_arms.main(["--arms", "b,z", "--report-only"]) == 2
    assert "--arms: unknown ['z']" in capsys.readouterr().err


def test_compare_runs_ignores_timings_and_paths_but_not_values(tmp_path, capsys):
    """Two runs equal but for wall times and their own paths are the same; one changed loss is a difference."""
    from raredx_jax.experiments import compare_runs as cr

    def run(root, loss):
        os.makedirs(root / "knowledge_sft")
        with open(root / "knowledge_sft" / "metrics.jsonl", "w") as f:
            for step in (1, 2):
                f.write(json.dumps({"kind": "train", "step": step, "loss": loss * step, "tokens_per_s": 100.0 * step
                                    * len(str(root))}) + "\n")
        with open(root / "knowledge_sft" / "summary.json", "w") as f:
            json.dump({"checkpoint": str(root / "knowledge_sft" / "checkpoints" / "2"), "seconds": len(str(root))}, f)
        return str(root)

    a, b, c = run(tmp_path / "a", 0.5), run(tmp_path / "bb", 0.5), run(tmp_path / "c", 0.25)
    assert [s for _, s, _ in cr.compare_runs(a, b)] == ["same", "same"]
    rows = cr.compare_runs(a, c)
    assert rows[0][:2] == ("knowledge_sft/metrics.jsonl", "different") and "loss: 0.5 != 0.25" in rows[0][2]
    assert cr.main([a, b]) == 0 and cr.main([a, c]) == 1 and cr.main([a, str(tmp_path / "none")]) == 2
    assert "NOT the same" in capsys.readouterr().out
