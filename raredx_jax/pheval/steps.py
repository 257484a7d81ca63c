"""The PhEval runner's three steps, as plain functions that need no PhEval (so they are tested without it).

`pheval run -r raredxphevalrunner -i <input dir> -t <corpus> -o <out>` calls `RaredxPhEvalRunner` (`runner.py`),
which calls these:

* `prepare`: every phenopacket of the corpus (``<corpus>/phenopackets/*.json``, or the corpus folder itself) ->
  a Case with a leak-safe note, by raredx-jax's importer (schema-checked by the official `phenopackets` package);
  written to ``<tool_input_commands>/raredx_cases.jsonl`` with the phenopacket's file stem; every packet the
  importer refuses is listed with file, record, field and why in ``raredx_import_report.json`` beside it.
* `run`: each note ranked by the model (``checkpoint`` option: an orbax run dir / checkpoint or an exported HF
  dir) or, without one, by the HPO baseline; the tool's raw result per phenopacket,
  ``<raw_results>/<stem>.tsv`` with PhEval's runner columns (disease_identifier, score).
* `post_process`: raw results -> PhEval's disease results. With PhEval installed (the runner's case) through its
  own ``generate_disease_result`` (ranking, MONDO mapping, truth set from the phenopackets); without it through
  `raredx_jax.evaluation.pheval_results` (the same columns and naming; ids not MONDO-mapped, see there).

Options come from the input dir's ``config.yaml``, ``tool_specific_configuration_options``: ``checkpoint``
("" = baseline), ``tokenizer``, ``candidates`` ("all", the default, or a comma-separated list of disease ids),
``hardware`` (a configs/hardware target, default "cpu"), ``hpo_recogniser`` (the baseline's text -> HPO step).
Nothing is downloaded: the ontology is the shipped one.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from raredx_jax.data.case import Case
from raredx_jax.data.importers import ImportResult, load_phenopackets, write_report
from raredx_jax.data.linking import DiseaseLinker
from raredx_jax.data.phenopackets import PhenopacketSchemaError, parse_phenopacket
from raredx_jax.evaluation import pheval_results as pr
from raredx_jax.evaluation.pheval_results import baseline_scores, scores_from_ranking
from raredx_jax.evaluation.runner import Baseline, evaluate_llm

CASES_FILE = "raredx_cases.jsonl"
REPORT_FILE = "raredx_import_report.json"


@dataclasses.dataclass(frozen=True)
class Options:
    """tool_specific_configuration_options of the runner's config.yaml."""

    checkpoint: str = ""
    tokenizer: str = ""
    candidates: str = "all"
    hardware: str = "cpu"
    hpo_recogniser: str = "dictionary"  # text -> HPO for the baseline on notes without terms (hpo_recognition.py)

    @classmethod
    def from_dict(cls, d: Any) -> "Options":
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"config.yaml: tool_specific_configuration_options: unknown option(s) {unknown} "
                             f"(known: {[f.name for f in dataclasses.fields(cls)]})")
        return cls(**{k: "" if v is None else str(v) for k, v in d.items()})


def phenopacket_dir(testdata_dir: str | Path) -> Path:
    """PhEval's corpus layout keeps the phenopackets in ``<corpus>/phenopackets``; a bare folder works too."""
    sub = Path(testdata_dir) / "phenopackets"
    return sub if sub.is_dir() else Path(testdata_dir)


def _candidates(ontology: Any, spec: str) -> list:
    if not spec or spec == "all":
        return ontology.diseases()
    return [ontology.disease(d.strip()) for d in spec.split(",") if d.strip()]


def prepare(testdata_dir: str | Path, tool_input_dir: str | Path, ontology: Any) -> dict[str, int]:
    """Import each phenopacket (one record per file: its stem names PhEval's result) and write the cases.
    Returns counts; the report lists every refused packet."""

    src = phenopacket_dir(testdata_dir)
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() == ".json"
                   and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{src}: no phenopacket (.json) files")
    total = ImportResult([], [], 0)
    rows = []
    for f in files:
        res = load_phenopackets(f, ontology, on_error="skip")
        total = total + res
        rows += [{"stem": f.stem, "case": c.to_json()} for c in res.cases]
    out = Path(tool_input_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_text(out / CASES_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    write_report(total, out / REPORT_FILE)
    return {"n_phenopackets": len(files), "n_cases": len(rows), "n_skipped": len(total.issues)}


def read_prepared(tool_input_dir: str | Path) -> list[tuple[str, Case]]:
    path = Path(tool_input_dir) / CASES_FILE
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        out.append((r["stem"], Case.from_json(r["case"])))
    return out


def run(tool_input_dir: str | Path, raw_results_dir: str | Path, ontology: Any, options: Options) -> int:
    """Rank every prepared case; one raw result TSV per phenopacket. Returns the number written."""

    prepared = read_prepared(tool_input_dir)
    candidates = _candidates(ontology, options.candidates)
    if options.checkpoint:
        scored = _llm_scores([c for _, c in prepared], candidates, options)
        results = [scores_from_ranking(ids) for ids in scored]
    else:
        baseline = Baseline(ontology, candidates, options.hpo_recogniser)
        results = [baseline_scores(baseline, c) for _, c in prepared]
    out = Path(raw_results_dir)
    out.mkdir(parents=True, exist_ok=True)
    for (stem, _), rows in zip(prepared, results):
        lines = ["disease_identifier\tscore"] + [f"{d}\t{s!r}" for d, s in rows]
        _atomic_text(out / f"{stem}.tsv", "\n".join(lines) + "\n")
    return len(prepared)


def _load_config(hardware: str) -> Any:
    path = Path(__file__).resolve().parents[2] / "configs" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("raredx_pheval_eval_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(hardware or None)


def _llm_scores(cases: list[Case], candidates: list, options: Options) -> list[list[str | None]]:
    """The model's ranked, linked disease ids per case (greedy, as `evaluate` decodes)."""
    from raredx_jax.parallel.mesh import make_mesh  # noqa: PLC0415 - heavy: JAX ~1 s, LLM arm only
    from raredx_jax.policy import load_policy  # noqa: PLC0415 - heavy: JAX+Flax ~1.2 s, LLM arm only

    config = _load_config(options.hardware)
    mesh = make_mesh(config.mesh)
    model, tokenizer = load_policy(options.checkpoint, mesh, tokenizer_dir=options.tokenizer,
                                   dtype=config.model.dtype)
    out = evaluate_llm(model, tokenizer, cases, DiseaseLinker(candidates), config, mesh, progress=False)
    return [ids for _, _, ids, _, _ in out]


def read_raw_result(path: str | Path) -> list[tuple[str, float]]:
    """One raw result TSV -> [(disease id, score)]; a bad row is a one-line error naming file, row and column."""
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        if reader.fieldnames != ["disease_identifier", "score"]:
            raise ValueError(f"{path}: header {reader.fieldnames} is not ['disease_identifier', 'score']")
        for i, r in enumerate(reader, start=2):
            try:
                rows.append((r["disease_identifier"], float(r["score"])))
            except (TypeError, ValueError):
                raise ValueError(f"{path}: row {i}: field score: not a number") from None
    return rows


def post_process(raw_results_dir: str | Path, output_dir: str | Path, testdata_dir: str | Path,
                 tool_input_dir: str | Path, use_pheval: bool | None = None) -> int:
    """Raw results -> ``<output_dir>/pheval_disease_results/<stem>-disease_result.parquet``. ``use_pheval``: None =
    PhEval's own post-processing when it is importable. Returns the number of results written."""

    if use_pheval is None:
        use_pheval = importlib.util.find_spec("pheval") is not None
    gold = {stem: case.diagnosis for stem, case in read_prepared(tool_input_dir)}
    raw = sorted(Path(raw_results_dir).glob("*.tsv"))
    if not use_pheval:  # as PhEval's create_empty_pheval_result: a packet with no result is its gold at rank 0
        have = {p.stem for p in raw}
        for packet in sorted(phenopacket_dir(testdata_dir).glob("*.json")):
            dx = _packet_gold(packet) if packet.stem not in have else ()
            if dx:
                pr.write_disease_result(pr.disease_result_rows([], dx),
                                        Path(output_dir) / pr.RESULTS_DIR / pr.disease_result_file(packet.stem))
    for path in raw:
        rows = read_raw_result(path)
        if use_pheval:
            import polars as pl  # noqa: PLC0415 - optional: [pheval] extra
            from pheval.post_processing.post_processing import (  # noqa: PLC0415 - optional: [pheval] extra
                SortOrder,
                generate_disease_result,
            )

            frame = pl.DataFrame({"disease_identifier": [d for d, _ in rows], "score": [s for _, s in rows]},
                                 schema={"disease_identifier": pl.String, "score": pl.Float64})
            generate_disease_result(frame, SortOrder.DESCENDING, Path(output_dir), path,
                                    phenopacket_dir(testdata_dir))
        else:
            pr.write_disease_result(pr.disease_result_rows(rows, gold.get(path.stem, ())),
                                    Path(output_dir) / pr.RESULTS_DIR / pr.disease_result_file(path.stem))
    return len(raw)


def _packet_gold(path: Path) -> tuple[str, ...]:
    """The diagnosed disease ids of a phenopacket the importer refused (PhEval's truth set: interpretations'
    diagnoses); () when even the schema refuses it."""

    try:
        packet = parse_phenopacket(json.loads(path.read_text(encoding="utf-8-sig")))
    except (ValueError, PhenopacketSchemaError, OSError, RecursionError):
        return ()
    ids = [i.diagnosis.disease.id for i in packet.interpretations if i.diagnosis.disease.id]
    return tuple(dict.fromkeys(ids))


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
