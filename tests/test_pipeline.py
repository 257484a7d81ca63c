"""The whole recipe at smoke scale in one command, resume-by-rerun, and the diagnose CLI on its checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("knowledge_sft", "rers", "rers_sft", "grpo", "export")


def _train(args, timeout=1500):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "raredx_jax.train", "--config=configs/pipeline.py", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("pipeline"))
    r = _train(["--config.pipeline.scale=smoke", f"--config.run_dir={run_dir}"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run_dir, r.stdout


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_writes_the_table(smoke_run):
    run_dir, out = smoke_run
    for stage in STAGES:
        assert os.path.isfile(os.path.join(run_dir, stage, "stage_done.json")), stage
    results = json.load(open(os.path.join(run_dir, "results.json")))
    rows = results["rows"]
    evaluated = {r["stage"] for r in rows}
    assert {"knowledge_sft", "grpo"} <= evaluated
    for r in rows:
        assert 0.0 <= r["llm_top1"] <= r["llm_top10"] <= 1.0
        assert 0.0 <= r["baseline_top1"] <= r["baseline_top10"] <= 1.0 and r["n"] > 0
    sets = {r["set"] for r in rows}
    assert "simulated:test" in sets
    if os.path.exists(os.path.join(os.path.dirname(REPO), "shared", "data", "phenopacket-store-dev.tar.gz")):
        assert "imported:test" in sets  # real cases of the trained diseases, beside the baseline
    table = open(os.path.join(run_dir, "results.md")).read()
    assert "| knowledge_sft | simulated:test |" in table and "| grpo | simulated:test |" in table
    # every later stage is compared case by case with the stage evaluated before it, on the same cases
    for r in rows:
        if r["stage"] != "knowledge_sft":
            v = r["vs_previous"]
            assert v["n"] == r["n"] and 0.0 <= v["p_value"] <= 1.0 and v["gained"] + v["lost"] <= r["n"]
    assert "McNemar" in table
    assert os.path.isfile(os.path.join(run_dir, "stages.png"))
    assert os.path.isfile(os.path.join(run_dir, "hf", "config.json"))
    assert os.path.isfile(os.path.join(run_dir, "knowledge_sft", "eval", "eval.md"))


@pytest.mark.slow
def test_rerun_resumes_instead_of_repeating(smoke_run):
    run_dir, _ = smoke_run
    before = {s: os.path.getmtime(os.path.join(run_dir, s, "stage_done.json")) for s in STAGES}
    r = _train(["--config.pipeline.scale=smoke", f"--config.run_dir={run_dir}"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in STAGES:
        assert f"[pipeline] {stage}: already done, skipping" in r.stdout
        assert os.path.getmtime(os.path.join(run_dir, stage, "stage_done.json")) == before[stage]


@pytest.mark.slow
def test_diagnose_cli_on_the_exported_model(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    note = tmp_path / "note.txt"
    note.write_text("A 7-year-old boy with short stature, seizures and intellectual disability. No hearing loss.")
    for ckpt in (os.path.join(run_dir, "grpo"), os.path.join(run_dir, "hf")):
        r = subprocess.run([sys.executable, "-m", "raredx_jax.diagnose", f"--checkpoint={ckpt}", f"--note={note}",
                            "--json", "--max_new_tokens=24"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout)
        assert set(out) >= {"differential", "reasoning", "format_ok", "finish_reason"}
        assert "short stature" not in r.stderr  # the note is not logged
    r = subprocess.run([sys.executable, "-m", "raredx_jax.diagnose", f"--checkpoint={run_dir}/grpo",
                        f"--note={tmp_path}/missing.txt"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no such file" in r.stderr


def test_differential_lines_link_to_ontology_ids():
    """The diagnose CLI's rendering path on a fixed completion (the text is test input, not model output)."""
    from raredx_jax.data.hpo import load_ontology
    from raredx_jax.data.linking import DiseaseLinker
    from raredx_jax.diagnose import differential_from_completion

    ont = load_ontology()
    marfan, ehlers = ont.disease("OMIM:154700"), ont.disease("OMIM:130000")
    linker = DiseaseLinker([marfan, ehlers])
    text = ("<think>Tall stature, lens dislocation and aortic root dilatation.</think>\n<answer>\n"
            f"1. {marfan.name}\n2. {ehlers.name} (OMIM:130000)\n3. Something unheard of\n</answer>")
    out = differential_from_completion(text, linker)
    assert out["format_ok"] and out["reasoning"].startswith("Tall stature")
    assert [d["id"] for d in out["differential"]] == ["OMIM:154700", "OMIM:130000", None]
    assert out["differential"][0]["name"] == marfan.name


def test_overrides_keep_commas_inside_quotes_and_brackets():
    from raredx_jax.pipeline import parse_overrides

    got = parse_overrides("grpo.steps=30, grpo.train_split='train,rl', "
                          "curriculum.lessons=('open:typical', 'open:hard'),optim.lr=1e-4", "pipeline.overrides.grpo")
    assert got == {"grpo.steps": 30, "grpo.train_split": "train,rl",
                   "curriculum.lessons": ("open:typical", "open:hard"), "optim.lr": 1e-4}
    with pytest.raises(ValueError, match="pipeline.overrides.grpo: expected field=value, got 'rl'"):
        parse_overrides("grpo.train_split=train,rl", "pipeline.overrides.grpo")
