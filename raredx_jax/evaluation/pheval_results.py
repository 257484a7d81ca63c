"""PhEval disease results: raredx-jax's ranked differentials in the file format PhEval benchmarks.

Why: the field compares rare-disease tools with PhEval (monarch-initiative/pheval): each tool's runner writes, per
phenopacket, a ranked disease result, and `pheval benchmark` scores every tool's results the same way. This module
writes those files for the LLM and for the HPO baseline, without PhEval installed (it is heavy and optional).

The format is that of **pheval 0.7.14** (pinned; read from its source, files named below):

* what a runner hands to PhEval (`pheval/post_processing/validate_result_format.py`,
  ``ResultSchema.DISEASE_RESULT_SCHEMA``): ``disease_identifier`` (String), ``score`` (Float64);
* what PhEval then writes and benchmarks (`pheval/post_processing/post_processing.py`, ``generate_disease_result``
  -> ``_rank_results`` -> ``PhenopacketTruthSet.merge_disease_results`` -> ``_write_disease_result``):
  ``pheval_disease_results/<phenopacket stem>-disease_result.parquet`` (zstd), columns ``rank`` (Int64),
  ``score`` (Float64), ``disease_identifier`` (String), ``mondo_identifier`` (String), ``true_positive``
  (Boolean), i.e. Arrow int64, double, large_string, large_string, bool; rank = PhEval's
  ``score.rank(method="max", descending=True)`` (tied scores share the worse rank); every
  gold disease the tool did not return is appended with rank 0 and score 0 (a miss PhEval can count).

What differs from PhEval's own post-processing: ``mondo_identifier`` is the disease id itself. PhEval maps ids to
MONDO with the SSSOM table it ships (12 MB); for an id it cannot map it keeps the id, exactly as here. Gold and
predictions are both OMIM/ORPHA ids of one ontology release, so a hit is the same id, as in eval.json; but an ORPHA
prediction for an OMIM gold of the same MONDO disease (or the reverse) is a hit for PhEval and not here. With all
annotated diseases as candidates (OMIM and ORPHA entries of one disease both ranked) that changes real cases: 6 of
the 20 real phenopackets of the check README records (same Arrow schema and file names on all 20; the same rows on
all 20 once ids were MONDO-mapped as PhEval maps them). The PhEval runner
(`raredx_jax.pheval`) hands its scores to PhEval's own ``generate_disease_result`` instead, MONDO mapping included.

The LLM gives a ranked list, not scores: the score of the entry at position k is 1/k (PhEval's ranks from it are
the positions; an unlinked entry keeps its position, as in eval.json's ``llm_rank``).
"""
from __future__ import annotations

import bisect
import hashlib
import re
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from raredx_jax.data.phenopackets import case_to_phenopacket, write_phenopacket
from raredx_jax.fileio import atomic_file

PHEVAL_VERSION = "0.7.14"
# (column, Arrow type) of the file PhEval benchmarks, in its order (post_processing.py, _write_disease_result)
# (polars writes its String as Arrow large_string: the type PhEval's own files carry, checked against PhEval 0.7.14)
DISEASE_RESULT_COLUMNS = (("rank", "int64"), ("score", "double"), ("disease_identifier", "large_string"),
                          ("mondo_identifier", "large_string"), ("true_positive", "bool"))
# what a runner passes to pheval's generate_disease_result (validate_result_format.py, DISEASE_RESULT_SCHEMA)
RUNNER_RESULT_COLUMNS = (("disease_identifier", "string"), ("score", "double"))
RESULTS_DIR = "pheval_disease_results"
BASELINE_TOP = 100  # baseline diseases written per case (the ranking goes on past what any metric reads)


def disease_result_file(stem: str) -> str:
    """PhEval's name for one case's disease result (post_processing.py, generate_disease_result)."""
    return f"{stem}-disease_result.parquet"


def safe_stem(case_id: str) -> str:
    """A case id usable as a file stem; any other id (from a user's JSONL) becomes a hash of itself."""
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,120}", case_id) and not case_id.endswith(".json"):
        return case_id
    return "case-" + hashlib.sha256(case_id.encode("utf-8")).hexdigest()[:16]


def scores_from_ranking(ids: Sequence[str | None]) -> list[tuple[str, float]]:
    """A ranked list (best first, None = an entry not linked to a disease) -> [(id, 1/position)], first
    occurrence of each id only."""
    out: list[tuple[str, float]] = []
    seen: set[str] = set()
    for k, did in enumerate(ids, start=1):
        if did is None or did in seen:
            continue
        seen.add(did)
        out.append((did, 1.0 / k))
    return out


def pheval_ranks(scores: Sequence[float]) -> list[int]:
    """PhEval's rank of each score: polars ``rank(method="max", descending=True)`` = how many scores are >= it."""
    ordered = sorted(scores, reverse=True)

    neg = [-s for s in ordered]  # ascending
    return [bisect.bisect_right(neg, -s) for s in scores]


def disease_result_rows(scored: Sequence[tuple[str, float]], gold: Sequence[str]) -> dict[str, list]:
    """The columns PhEval writes for one case: the results sorted by score (best first) and ranked as PhEval
    ranks them, ``true_positive`` where the id is a gold id, then each gold disease not returned (rank 0, score 0)."""
    rows = sorted(scored, key=lambda x: -x[1])  # stable: equal scores keep the tool's order, as polars' sort does
    ranks = pheval_ranks([s for _, s in rows])
    gold_set = set(gold)
    cols: dict[str, list] = {name: [] for name, _ in DISEASE_RESULT_COLUMNS}
    for (did, score), rank in zip(rows, ranks):
        for name, value in (("rank", rank), ("score", float(score)), ("disease_identifier", did),
                            ("mondo_identifier", did), ("true_positive", did in gold_set)):
            cols[name].append(value)
    returned = {d for d, _ in rows}
    for g in dict.fromkeys(gold):
        if g not in returned:
            for name, value in (("rank", 0), ("score", 0.0), ("disease_identifier", g), ("mondo_identifier", g),
                                ("true_positive", True)):
                cols[name].append(value)
    return cols


def write_disease_result(cols: dict[str, list], path: str | Path) -> Path:
    """One case's result as PhEval's parquet (zstd), atomically (a temporary sibling renamed into place)."""
    arrow = {"int64": pa.int64(), "double": pa.float64(), "large_string": pa.large_string(), "bool": pa.bool_()}
    schema = pa.schema([(name, arrow[t]) for name, t in DISEASE_RESULT_COLUMNS])
    table = pa.Table.from_pydict({name: cols[name] for name, _ in DISEASE_RESULT_COLUMNS}, schema=schema)
    path = Path(path)
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def baseline_scores(baseline: Any, case: Any, top: int = BASELINE_TOP) -> list[tuple[str, float]]:
    """The HPO baseline's scored diseases for one case, from the same input `runner.Baseline.rank` uses (the
    case's HPO terms, or terms matched in its text for notes)."""
    if case.present_hpo and case.source != "jsonl":
        present, absent = list(case.present_hpo), list(case.absent_hpo)
    else:
        present, absent = baseline.matcher.match(case.text)
    return [(d, float(s)) for d, s in baseline.ranker.rank(present, absent, top=top)]


def write_pheval_results(report: dict[str, Any], case_sets: Sequence[Any], baseline: Any, out_dir: str,
                         ontology: Any = None) -> dict[str, str]:
    """For each case set: ``<out_dir>/pheval/<set>/phenopackets/<stem>.json`` (each case as a Phenopacket: the
    truth set PhEval reads) and ``<out_dir>/pheval/<set>/<tool>/pheval_disease_results/<stem>-disease_result
    .parquet`` for tool ``raredx_llm`` (when the report scored a model) and ``raredx_baseline``. Returns
    {set name: its folder}."""

    written: dict[str, str] = {}
    for cs in case_sets:
        folder = Path(out_dir) / "pheval" / re.sub(r"[^A-Za-z0-9._-]+", "_", cs.name).strip("_")
        results = {r["case_id"]: r for r in report["sets"][cs.name]["cases"]}
        llm_scored = any(r["llm_ids"] or r["finish_reason"] for r in results.values())
        stems: dict[str, str] = {}
        for case in cs.cases:
            stem = safe_stem(case.id)
            if stem in stems.values():
                raise ValueError(f"case set {cs.name}: two cases map to the PhEval file stem {stem!r}")
            stems[case.id] = stem
            write_phenopacket(case_to_phenopacket(case, ontology), folder / "phenopackets" / f"{stem}.json")
            write_disease_result(disease_result_rows(baseline_scores(baseline, case), case.diagnosis),
                                 folder / "raredx_baseline" / RESULTS_DIR / disease_result_file(stem))
            if llm_scored:
                rows = disease_result_rows(scores_from_ranking(results[case.id]["llm_ids"]), case.diagnosis)
                write_disease_result(rows, folder / "raredx_llm" / RESULTS_DIR / disease_result_file(stem))
        written[cs.name] = str(folder)
    return written
