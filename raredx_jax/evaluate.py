"""Evaluate a checkpoint on held-out cases beside the classic HPO baseline.

  python -m raredx_jax.evaluate --checkpoint=DIR --cases=simulated:test,/path/phenopackets.tar.gz [--out=DIR]
      [--tokenizer=DIR] [--format=json|pheval]

Writes eval.json (per case), eval.md and PNG plots (top-k curves, per-difficulty bars); `--format=pheval` also
writes each case as a Phenopacket and PhEval disease result files for the LLM and the baseline under `pheval/`
(`raredx_jax/evaluation/pheval_results.py`). As a stage
(`config.stage=evaluate`) it reads `config.eval.checkpoint`, `config.eval.cases`, `config.eval.out_dir`.
The candidate diseases (for the linker and the baseline) are the run's disease subset (`config.data.diseases`)
or all annotated diseases with `--config.eval.candidates=all`.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from raredx_jax.checkpoints.orbax import resolve_model_checkpoint
from raredx_jax.data.hpo import load_ontology, select_diseases
from raredx_jax.data.linking import DiseaseLinker
from raredx_jax.evaluation.cases import load_case_set
from raredx_jax.evaluation.pheval_results import write_pheval_results
from raredx_jax.evaluation.report import write_report
from raredx_jax.evaluation.runner import Baseline, run_evaluation
from raredx_jax.parallel.mesh import make_mesh
from raredx_jax.policy import load_policy

FORMATS = ("json", "pheval")
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "evaluate.py")


def candidate_diseases(config: Any, ontology: Any) -> list:
    if config.eval.get("candidates", "trained") == "all":
        return ontology.diseases()
    # the full annotations (not the data.diseases.max_phenotypes core the model trained on): the baseline
    # scores with everything the ontology knows, as existing tools do
    return [ontology.disease(d.id) for d in select_diseases(ontology, config.data.diseases)]


def evaluate_checkpoint(config: Any, checkpoint: str, case_specs: list[str], out_dir: str,
                        title: str = "Evaluation", progress: bool = True, tokenizer_dir: str = "",
                        fmt: str = "json") -> dict[str, Any]:
    """Load the policy, score it and the baseline on each case set, write the report; returns the report.
    `tokenizer_dir` overrides the tokenizer found beside the checkpoint (as diagnose's --tokenizer); `fmt` "pheval"
    adds PhEval's per-case disease result files."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")

    ontology = load_ontology()
    candidates = candidate_diseases(config, ontology)
    linker = DiseaseLinker(candidates)
    mesh = make_mesh(config.mesh)
    model = tokenizer = None
    if checkpoint:
        model, tokenizer = load_policy(checkpoint, mesh, tokenizer_dir=tokenizer_dir, dtype=config.model.dtype)

    sets = [load_case_set(s, config.data.dir, ontology, linker, candidates, on_error="skip",
                          limit=config.eval.get("max_cases", 0),
                          report_dir=out_dir, write=jax.process_index() == 0) for s in case_specs]
    if jax.process_index() == 0:
        for cs in sets:  # counts and the report path only: a skip message never quotes note text
            if cs.n_import_errors:
                print(f"[eval] {cs.name}: skipped {cs.n_import_errors} bad records (file, record, field and why "
                      f"each: {cs.report}); evaluating {len(cs.cases)} cases", flush=True)
            elif cs.report:
                print(f"[eval] {cs.name}: no record skipped; dropped or mapped HPO terms and ignored files are "
                      f"listed in {cs.report}", flush=True)
    report = run_evaluation(model, tokenizer, sets, ontology, candidates, linker, config, mesh, progress)
    report["checkpoint"] = checkpoint
    if jax.process_index() == 0:
        paths = write_report(report, out_dir, title)
        print(f"[eval] wrote {paths['markdown']}", flush=True)
        if fmt == "pheval":
            folders = write_pheval_results(
                report, sets, Baseline(ontology, candidates, config.eval.get("hpo_recogniser", "dictionary")),
                out_dir, ontology)
            print(f"[eval] wrote PhEval disease results under {os.path.join(out_dir, 'pheval')} "
                  f"({len(folders)} case sets)", flush=True)
    return report


def run_evaluate_stage(config: Any) -> dict[str, Any]:
    ckpt = config.eval.get("checkpoint", "") or resolve_model_checkpoint(config.run_dir)
    specs = [s for s in str(config.eval.cases).split(",") if s]
    out = config.eval.get("out_dir", "") or os.path.join(config.run_dir, "eval")
    return evaluate_checkpoint(config, ckpt, specs, out)


def _define_flags() -> Any:
    """CLI flags, defined only when run as a program (stages import this module under train.py's flags)."""
    flags.DEFINE_string("checkpoint", "", "Orbax checkpoint / run dir / exported HF dir. Empty: baseline only.")
    flags.DEFINE_string("cases", "simulated:test", "Comma-separated case specs.")
    flags.DEFINE_string("out", "", "Output directory (default <run_dir>/eval).")
    flags.DEFINE_string("tokenizer", "", "Tokenizer directory if not the one stored with the checkpoint's run.")
    flags.DEFINE_enum("format", "json", list(FORMATS), "json: eval.json/eval.md/plots; pheval: those plus PhEval "
                      "disease result files per case (LLM and baseline) and the cases as phenopackets.")
    return config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file (data subset, sampling, mesh).")


def main(argv: list[str], config_flag: Any = None) -> None:
    del argv

    logging.set_verbosity(logging.WARNING)
    config = config_flag.value
    F = flags.FLAGS
    out = F.out or os.path.join(config.run_dir, "eval")
    try:
        evaluate_checkpoint(config, F.checkpoint, [s for s in F.cases.split(",") if s], out,
                            tokenizer_dir=F.tokenizer, fmt=F.format)
    except (FileNotFoundError, ValueError, KeyError) as e:  # bad input: one line, exit 2 (README, Troubleshooting)
        print(f"evaluate: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _flag = _define_flags()
    app.run(lambda argv: main(argv, _flag))
