"""The whole RareDxR1 recipe in one command, resumable stage by stage.

  python -m raredx_jax.train --config=configs/pipeline.py

data build -> knowledge SFT -> RERS -> RERS-SFT -> GRPO curriculum -> HF export, with an evaluation after
each training stage (held-out simulated notes and real phenopacket cases of the trained diseases, the HPO
baseline beside it). Each stage runs with its own config file (configs/<stage>.py) in `<run_dir>/<stage>`,
receives the pipeline's shared sections (seed, data, tokenizer, model shape, rewards, eval) and starts from
the previous stage's checkpoint. A finished stage leaves `stage_done.json`; rerunning skips it, and an
interrupted stage resumes from its own checkpoints / journal.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import time
from typing import Any

import jax
import numpy as np
from ml_collections import config_dict

from raredx_jax.data.build import build_all
from raredx_jax.data.hpo import load_ontology, select_diseases
from raredx_jax.data.importers import load_phenopackets
from raredx_jax.evaluate import evaluate_checkpoint
from raredx_jax.evaluation.metrics import paired_top1_change
from raredx_jax.evaluation.report import plot_stages

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# stage name -> (config file, function "module:fn"), in order.
STAGE_SPECS: dict[str, tuple[str, str]] = {
    "knowledge_sft": ("knowledge_sft.py", "raredx_jax.training.sft:run_sft"),
    "rers": ("rers.py", "raredx_jax.training.rers:run_rers"),
    "rers_sft": ("rers_sft.py", "raredx_jax.training.sft:run_sft"),
    "grpo": ("rl_curriculum.py", "raredx_jax.training.grpo:run_grpo"),
    "export": ("export.py", "raredx_jax.export:run_export"),
}
# sections / fields every stage takes from the pipeline config
SHARED = ("seed", "hardware", "data", "tokenizer", "mesh", "distributed", "rewards", "eval",
          "model.preset", "model.hf_path", "model.vocab_size", "model.max_seq_len", "model.dtype",
          "model.param_dtype", "model.remat", "model.attention", "model.scan_layers")
DONE = "stage_done.json"

# Per-stage overrides (dotted field -> value) of each scale; "pipeline" applies to the shared sections.
SCALES: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    "smoke": {
        "pipeline": {"data.diseases.n": 6, "data.notes_per_disease": 4, "data.knowledge_passages_per_disease": 4,
                     "data.knowledge_exemplars_per_disease": 2,
                     "data.eval_notes_per_disease": 2, "data.test_notes_per_disease": 0,
                     "pipeline.case_diseases": 2, "eval.max_cases": 6},
        "knowledge_sft": {"train.steps": 6, "train.eval_every": 3, "train.checkpoint_every": 3,
                          "train.batch_size": 8, "train.seq_len": 128, "probe.n": 8},
        "rers": {"rers.num_samples": 2, "rers.reflection_tries": 2, "sampling.max_new_tokens": 24},
        "rers_sft": {"train.steps": 4, "train.eval_every": 2, "train.checkpoint_every": 2,
                     "train.batch_size": 8, "train.seq_len": 128},
        "grpo": {"grpo.steps": 2, "grpo.prompts_per_step": 2, "grpo.group_size": 2, "grpo.eval_cases": 4,
                 "sampling.max_new_tokens": 24},
        "export": {},
    },
}


def _split_items(text: str) -> list[str]:
    """Split on the commas that separate items: not those inside quotes or brackets, so a value may be a tuple
    (`curriculum.lessons=('open:typical','open:hard')`) or a quoted list (`grpo.train_split='train,rl'`)."""
    items, cur, depth, quote = [], [], 0, ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    items.append("".join(cur))
    return [t.strip() for t in items if t.strip()]


def parse_overrides(text: str, where: str) -> dict[str, Any]:
    """'train.steps=100, optim.lr=1e-5' -> {"train.steps": 100, "optim.lr": 1e-05} (values as Python literals;
    commas inside quotes or brackets belong to the value)."""

    out: dict[str, Any] = {}
    for item in _split_items(text):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"{where}: expected field=value, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = raw.strip()
    return out


def stage_overrides(config: Any, stage: str) -> dict[str, Any]:
    """The scale's overrides for a stage, then the user's (`--config.pipeline.overrides.<stage>=...`)."""
    scale = config.pipeline.scale
    if scale not in SCALES:
        raise ValueError(f"pipeline.scale: unknown {scale!r}; one of {sorted(SCALES)}")
    user = parse_overrides(config.pipeline.overrides.get(stage, ""), f"pipeline.overrides.{stage}")
    return {**SCALES[scale].get(stage, {}), **user}


def apply_scale(config: Any) -> None:
    """Apply the shared-section ("pipeline") overrides to the pipeline config itself."""
    for key, value in stage_overrides(config, "pipeline").items():
        _set(config, key, value)


def _load_stage_config(filename: str, hardware: str) -> config_dict.ConfigDict:
    path = os.path.join(_REPO, "configs", filename)
    spec = importlib.util.spec_from_file_location(f"raredx_stage_{filename[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(hardware)


def _get(c: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        c = c[part]
    return c


def _set(c: Any, dotted: str, value: Any) -> None:
    """Set an existing field (KeyError for a typo: no field is created silently)."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        c = c[part]
    if leaf not in c:
        raise KeyError(dotted)
    with c.ignore_type():
        c[leaf] = value


def stage_config(pipeline: Any, stage: str) -> config_dict.ConfigDict:
    """The config one stage runs with: its own file, then the shared fields, chaining, and overrides."""
    filename, _ = STAGE_SPECS[stage]
    c = _load_stage_config(filename, pipeline.hardware)
    c.unlock()
    for key in SHARED:
        value = _get(pipeline, key)
        _set(c, key, config_dict.ConfigDict(value.to_dict()) if isinstance(value, config_dict.ConfigDict)
             else value)
    root = pipeline.run_dir
    c.run_dir = os.path.join(root, stage)
    prev = {"rers": "knowledge_sft", "rers_sft": "knowledge_sft", "grpo": "rers_sft", "export": "grpo"}
    if stage in prev:
        c.model.init_from = os.path.join(root, prev[stage])
    if stage == "rers_sft":
        c.train.data_dir = os.path.join(root, "rers", "trajectories")
        if _rers_kept(root) == 0:  # nothing to train on: carry the knowledge-SFT model forward (reported)
            c.model.init_from = os.path.join(root, "knowledge_sft")
    if stage == "grpo" and _rers_kept(root) == 0:
        c.model.init_from = os.path.join(root, "knowledge_sft")
    if stage == "grpo":  # the case-level curriculum starts from the pass rates RERS measured, when RERS ran here
        rers_dir = os.path.join(root, "rers")
        c.curriculum.prior_from = rers_dir if os.path.isdir(os.path.join(rers_dir, "journal")) else ""
    if stage == "export":
        c.export.hf_dir = os.path.join(root, "hf")
    for key, value in stage_overrides(pipeline, stage).items():
        try:
            _set(c, key, value)
        except (KeyError, AttributeError):
            raise ValueError(f"pipeline.overrides.{stage}: {key!r} is not a field of configs/"
                             f"{STAGE_SPECS[stage][0]}") from None
    return c


def _rers_kept(root: str) -> int | None:
    done = _done(os.path.join(root, "rers"))
    if done is None or not isinstance(done.get("summary"), dict):
        return None
    return int(done["summary"].get("kept", 0))


def _run_fn(spec: str):

    module, _, fn = spec.partition(":")
    return getattr(importlib.import_module(module), fn)


def _done(path: str) -> dict | None:
    try:
        with open(os.path.join(path, DONE), encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _mark_done(path: str, payload: dict) -> None:

    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, DONE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, os.path.join(path, DONE))


def _eval_rows(stage: str, report: dict) -> list[dict]:
    rows = []
    for name, s in report["sets"].items():
        o = s["overall"]
        rows.append({"stage": stage, "set": name, "n": o["n"], "llm_top1": o["llm"]["top1"],
                     "llm_top10": o["llm"]["top10"], "llm_mrr": o["llm"]["mrr"], "format_ok": o["format_ok"],
                     "baseline_top1": o["baseline"]["top1"], "baseline_top10": o["baseline"]["top10"],
                     # per-case top-1 hits (case ids only, never note text): the paired stage comparison
                     "hits": {c["case_id"]: c["llm_rank"] == 1 for c in s.get("cases", [])}})
    return rows


def compare_stages(rows: list[dict]) -> None:
    """Add to each row the paired change in top-1 against the previous evaluated stage on the same case set
    (gained / lost cases, exact McNemar p): a difference of a few points on ~100 cases is often noise."""

    last: dict[str, dict] = {}
    for r in rows:
        prev = last.get(r["set"])
        if prev is not None and r.get("hits") and prev.get("hits"):
            r["vs_previous"] = {"stage": prev["stage"], **paired_top1_change(prev["hits"], r["hits"])}
        last[r["set"]] = r


def results_markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# RareDxR1 pipeline: stage-by-stage results", "",
             f"Model preset `{meta['preset']}`, {meta['n_diseases']} diseases, seed {meta['seed']}. "
             "Top-k recall in % on held-out cases; baseline = Phrank-style HPO similarity over the same "
             "candidate diseases (structured HPO terms where the case has them, dictionary-matched note text "
             "otherwise).", "",
             "| stage | case set | n | LLM top-1 | LLM top-10 | LLM MRR | format ok | baseline top-1 | "
             "baseline top-10 | top-1 vs previous stage: +gained / -lost (McNemar p) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r.get("vs_previous")
        change = f"+{v['gained']} / -{v['lost']} (p={v['p_value']:.2f})" if v else "-"
        lines.append(f"| {r['stage']} | {r['set']} | {r['n']} | {100 * r['llm_top1']:.1f} | "
                     f"{100 * r['llm_top10']:.1f} | {r['llm_mrr']:.3f} | {100 * r['format_ok']:.0f} | "
                     f"{100 * r['baseline_top1']:.1f} | {100 * r['baseline_top10']:.1f} | {change} |")
    lines += ["", "The last column compares each stage with the one evaluated before it on the same cases: cases "
              "it now gets right (+) and gets wrong that the previous stage got right (-), with the exact "
              "two-sided McNemar p-value. Small differences are within noise at these case counts.",
              "", f"Wall time: {meta['seconds']:.0f} s ({meta['hardware']})."]
    return "\n".join(lines) + "\n"


def choose_diseases(pipeline: Any) -> None:
    """Fix the disease subset once for every stage: some diseases of the real case archive (so real cases of
    trained diseases exist to evaluate on) plus seeded random others. Writes data.diseases kind=ids."""

    d = pipeline.data.diseases
    if d.kind == "ids":
        return
    ontology = load_ontology()
    n_case = int(pipeline.pipeline.case_diseases)
    ids: list[str] = []
    if n_case and pipeline.data.phenopackets and os.path.exists(pipeline.data.phenopackets):


        res = load_phenopackets(pipeline.data.phenopackets, ontology, on_error="skip")
        counts: dict[str, int] = {}
        for case in res.cases:
            for did in case.diagnosis:
                counts[did] = counts.get(did, 0) + 1
        eligible = sorted(k for k, v in counts.items() if v >= int(pipeline.pipeline.min_cases_per_disease)
                          and _phenotype_count(ontology, k) >= int(d.min_phenotypes))
        rng = np.random.default_rng(int(d.seed))
        ids = [eligible[i] for i in sorted(rng.choice(len(eligible), min(n_case, len(eligible)), replace=False))]
    rest = select_diseases(ontology, config_dict.ConfigDict(
        {"kind": "random", "n": int(d.n) + len(ids), "seed": int(d.seed), "ids": "",
         "min_phenotypes": int(d.min_phenotypes)}))
    for dis in rest:
        if len(ids) >= int(d.n):
            break
        if dis.id not in ids:
            ids.append(dis.id)
    d.kind, d.ids = "ids", ",".join(ids)


def _phenotype_count(ontology: Any, disease_id: str) -> int:
    try:
        return len(ontology.disease(disease_id).phenotypes)
    except KeyError:
        return 0


def run_pipeline(config: Any) -> dict[str, Any]:


    t0 = time.time()
    config.unlock()
    apply_scale(config)
    if not config.data.dir:
        config.data.dir = os.path.join(config.run_dir, "data")
    choose_diseases(config)
    root = config.run_dir
    os.makedirs(root, exist_ok=True)
    print(f"[pipeline] run dir {root}; {len(config.data.diseases.ids.split(','))} diseases; "
          f"stages: data, {', '.join(config.pipeline.stages)}", flush=True)
    data_cfg = stage_config(config, "knowledge_sft")
    build_all(data_cfg)
    specs = [s for s in config.pipeline.eval_cases.split(",") if s]
    if config.data.phenopackets or config.data.jsonl_notes:
        specs.append("imported:test")
    rows: list[dict] = []
    summaries: dict[str, Any] = {}
    for stage in config.pipeline.stages:
        sc = stage_config(config, stage)
        done = _done(sc.run_dir)
        if done is not None:
            print(f"[pipeline] {stage}: already done, skipping ({os.path.join(sc.run_dir, DONE)})", flush=True)
        else:
            print(f"[pipeline] === {stage} ===", flush=True)
            ts = time.time()
            if stage == "rers_sft" and _rers_kept(root) == 0:
                print("[pipeline] rers_sft: RERS kept no trajectory, so there is nothing to fine-tune on; "
                      "skipping it and starting GRPO from the knowledge-SFT checkpoint", flush=True)
                _mark_done(sc.run_dir, {"summary": {"skipped": "RERS kept 0 trajectories"}, "seconds": 0})
                summaries[stage] = {"skipped": "RERS kept 0 trajectories"}
                continue
            summary = _run_fn(STAGE_SPECS[stage][1])(sc)
            done = {"summary": summary, "seconds": round(time.time() - ts, 1)}
            if stage in config.pipeline.eval_after:
                report = evaluate_checkpoint(sc, sc.run_dir, specs, os.path.join(sc.run_dir, "eval"),
                                             title=f"Evaluation after {stage}")
                done["eval_rows"] = _eval_rows(stage, report)
            _mark_done(sc.run_dir, done)
        summaries[stage] = done.get("summary")
        rows += done.get("eval_rows", [])
    compare_stages(rows)
    meta = {"preset": config.model.preset, "n_diseases": len(config.data.diseases.ids.split(",")),
            "seed": config.seed, "seconds": time.time() - t0, "hardware": config.hardware}
    if jax.process_index() == 0:
        with open(os.path.join(root, "results.json"), "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "meta": meta, "stages": summaries}, f, indent=1, default=str)
        with open(os.path.join(root, "results.md"), "w", encoding="utf-8") as f:
            f.write(results_markdown(rows, meta))
        plot_stages(rows, os.path.join(root, "stages.png"))
        print(results_markdown(rows, meta), flush=True)
    # the per-case hits stay in results.json; the printed summary keeps the table's numbers
    return {"rows": [{k: v for k, v in r.items() if k != "hits"} for r in rows],
            "results": os.path.join(root, "results.md")}
