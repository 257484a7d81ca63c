"""Resolve a `--cases` spec to Case records: built simulated/imported splits, phenopackets, JSONL notes.

Specs (comma-separated for several): `simulated:test` / `simulated:validation` (built by data.build),
`imported:test`, a phenopacket folder or `.tar.gz`, or a `.jsonl` notes file. Cases whose diagnosis lies
outside the candidate disease set are counted and reported, never silently dropped. Records an importer skips
(bad JSON, unknown disease, ...) are listed with file, record and field in `import_report_<set>.json` under
`report_dir` (the evaluation's output folder; never the working directory's runs/data), and counted in
`CaseSet.n_import_errors`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

from raredx_jax.data import importers
from raredx_jax.data.case import Case
from raredx_jax.data.hpo import Disease, Ontology
from raredx_jax.data.tfds_builders import data_source, decode_case

_BUILT = {"simulated": "raredx_simulated_cases", "imported": "raredx_imported_cases"}


@dataclasses.dataclass
class CaseSet:
    name: str
    cases: list[Case]
    n_outside_candidates: int = 0
    n_import_errors: int = 0
    report: str = ""


def spread(cases: Sequence[Case], limit: int) -> list[Case]:
    """At most `limit` cases taken round-robin over the gold diagnoses (each disease's cases in their order), so
    a capped evaluation still covers every disease instead of the first few of a sorted archive."""
    by_dx: dict[str, list[Case]] = {}
    for c in cases:
        by_dx.setdefault(c.diagnosis[0], []).append(c)
    queues = list(by_dx.values())
    out: list[Case] = []
    i = 0
    while len(out) < limit and any(i < len(q) for q in queues):
        out.extend(q[i] for q in queues if i < len(q))
        i += 1
    return out[:limit]


def load_case_set(spec: str, data_dir: str, ontology: Ontology, linker: Any,
                  candidates: Sequence[Disease] | None, on_error: str = "skip", limit: int = 0,
                  report_dir: str = "", write: bool = True) -> CaseSet:
    """The cases of one spec. Import issues go to `report_dir` ("" = `data_dir`, for callers without an output
    folder; `write=False`: the path only, for hosts other than the first); only counts and the report path are
    returned, never note text."""

    kind, _, split = spec.partition(":")
    issues: list = []
    res = None
    low = spec.lower()
    if kind in _BUILT and split:
        cases = [decode_case(r) for r in data_source(_BUILT[kind], split, data_dir)]
        name = spec
    elif low.endswith(".jsonl"):
        res = importers.load_jsonl_notes(spec, ontology, linker, on_error=on_error)
        cases, issues, name = list(res.cases), list(res.issues), os.path.basename(spec)
    elif os.path.isdir(spec) or low.endswith((".tar.gz", ".tgz", ".tar", ".json")):
        res = importers.load_phenopackets(spec, ontology, on_error=on_error)
        cases, issues = list(res.cases), list(res.issues)
        base = os.path.basename(spec.rstrip("/"))
        name = base[: -len(".tar.gz")] if base.lower().endswith(".tar.gz") else base
    else:
        raise ValueError(f"--cases: cannot read {spec!r}: expected simulated:<split>, imported:<split>, a "
                         "phenopacket folder / .tar.gz, or a .jsonl notes file")
    report = ""
    if res is not None and (issues or res.warnings or res.ignored):
        out = report_dir or data_dir
        report = os.path.join(out, f"import_report_{name.replace(':', '_').replace(os.sep, '_')}.json")
        if write:
            os.makedirs(out, exist_ok=True)
            importers.write_report(res, report)
    outside = 0
    if candidates is not None:
        ids = {d.id for d in candidates}
        kept = [c for c in cases if set(c.diagnosis) & ids]
        outside = len(cases) - len(kept)
        cases = kept
    if limit:
        cases = spread(cases, limit)
    return CaseSet(name=name, cases=cases, n_outside_candidates=outside, n_import_errors=len(issues),
                   report=report)
