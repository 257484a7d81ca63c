"""Real cases -> `Case`: GA4GH Phenopacket v2 JSON (a folder or a .tar.gz) and JSONL notes.

Why the care: a phenopacket carries its answer in several places besides the diagnosis field: the gene and the
variants (`interpretations[].diagnosis.genomicInterpretations`), the cohort folder and the file name (which
name the gene or the disease), the PMID. The note we build from a phenopacket therefore uses only the
phenotypes (observed and excluded), sex, age and onset, rendered by the same renderer as the simulated notes
(`simulate.render_note`), and it is checked afterwards: it must not contain the disease name/synonyms/ids,
gene symbols, variant strings, cohort or file-name parts. A finding whose label itself would leak (it contains
the disease name, a distinctive word of it, by the simulator's policy, or a gene symbol) is withheld and
listed in ``meta["withheld_hpo"]``. Case ids are hashes (no cohort, no PMID); the PMID is kept in `meta` only.

Schema: a phenopacket is first read by the official GA4GH schema (the `phenopackets` package's protobuf classes,
`data/phenopackets.py`): a schema error (unknown field, wrong type, bad enum value, two forms of one TimeElement)
names the schema's field path, e.g. ``phenotypicFeatures[2].type.id``; the walk below reads the parsed message and
checks what the schema leaves open (ids known to the HPO release, a diagnosis, an observed finding, plausible ages).

Validation: every bad record becomes one `ImportIssue(file, record, field, message)`. With
``on_error="raise"`` the first one raises a ValueError naming file, record and field; with ``"skip"`` they are
collected (`write_report` lists each skipped record and why) and ``n_seen == len(cases) + len(issues)``
always holds: nothing is dropped silently. Messages never quote note text. A record nested deeper than
`MAX_JSON_DEPTH` (or too deep for the JSON parser) is one bad record like any other, never a crash.

Kept with a warning (``ImportResult.warnings``, listed in the report, never raised): a case one of whose HPO
terms is obsolete (mapped to its ``replaced_by`` term) or unknown to the shipped release (dropped); the case
is skipped only when no usable observed finding remains. Files that are not records (any name not ending in
``.json``, case-insensitive, and hidden files) are listed in ``ImportResult.ignored``, the same for a folder and
for an archive; so are symbolic links in a folder that point to a folder or outside the folder (not followed; a
link to a file inside the folder is read). A UTF-8 byte-order mark is read as absent. A record (file, archive
member or JSONL line) over `MAX_RECORD_BYTES` is one bad record refused by its size, never read whole.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from phenopackets import Phenopacket, Sex, TimeElement, VitalStatus

from raredx_jax.data import simulate
from raredx_jax.data.case import Case
from raredx_jax.data.hpo import Disease, Ontology
from raredx_jax.data.linking import DiseaseLinker, parse_disease_id
from raredx_jax.data.phenopackets import PhenopacketSchemaError, parse_phenopacket, phenopacket_to_json

__all__ = ["ImportIssue", "ImportResult", "load_phenopackets", "load_jsonl_notes", "load_cases", "write_report",
           "parse_iso8601_age", "phenopacket_to_case", "phenopacket_case_id"]

ON_ERROR = ("raise", "skip")
_HPO_RE = re.compile(r"HP:\d{7}")
_SEX = {"FEMALE": "female", "MALE": "male", "UNKNOWN_SEX": "unknown", "OTHER_SEX": "unknown"}
_ISO_DURATION = re.compile(r"P(?!$)(?:(\d+(?:\.\d+)?)Y)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)W)?(?:(\d+(?:\.\d+)?)D)?"
                           r"(?:T(?=\d)(?:\d+(?:\.\d+)?H)?(?:\d+(?:\.\d+)?M)?(?:\d+(?:\.\d+)?S)?)?")
RENDER_TRIES = 5
MAX_JSON_DEPTH = 100  # real phenopackets nest ~10 deep; deeper input is refused per record, not by a crash
# One record (a phenopacket file or archive member, one JSONL line) larger than this is refused by its size before
# it is read: a real phenopacket or note is a few KB, and a stray multi-GB file must be one bad record, never a
# MemoryError that ends the import (issue 18's bad-input corpus: the 50 MB file).
MAX_RECORD_BYTES = 16 * 2**20


# --------------------------------------------------------------------------------------------------------------
# results and errors
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImportIssue:
    """Why one record was not imported: where (file, record = member name / line number) and which field."""

    file: str
    record: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: record {self.record}: field {self.field}: {self.message}"


@dataclasses.dataclass
class ImportResult:
    """Imported cases plus one issue per skipped record; ``n_seen == len(cases) + len(issues)`` by construction."""

    cases: list[Case]
    issues: list[ImportIssue]
    n_seen: int
    warnings: list[ImportIssue] = dataclasses.field(default_factory=list)  # kept records: terms dropped/mapped
    ignored: list[ImportIssue] = dataclasses.field(default_factory=list)  # files that are not records

    def __post_init__(self) -> None:
        if self.n_seen != len(self.cases) + len(self.issues):
            raise RuntimeError(f"import bookkeeping broken: {self.n_seen} records seen but {len(self.cases)} "
                               f"imported + {len(self.issues)} skipped")

    @property
    def n_skipped(self) -> int:
        return len(self.issues)

    def __add__(self, other: "ImportResult") -> "ImportResult":
        return ImportResult(self.cases + other.cases, self.issues + other.issues, self.n_seen + other.n_seen,
                            self.warnings + other.warnings, self.ignored + other.ignored)

    def summary(self) -> str:
        """One line for logs (counts only, never note text)."""
        out = f"{self.n_seen} records: {len(self.cases)} imported, {len(self.issues)} skipped"
        if self.warnings:
            out += f", {len(self.warnings)} HPO terms dropped or mapped in kept records"
        if self.ignored:
            out += f", {len(self.ignored)} files of unknown kind ignored"
        return out


class _RecordError(ValueError):
    """One record is bad; carries the field path for the ImportIssue (a ValueError for direct callers)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


class _TooLarge(Exception):
    """A record over MAX_RECORD_BYTES, refused by its size before it is read."""

    def __init__(self, size: int):
        super().__init__(f"{size / 2**20:.1f} MB, over the {MAX_RECORD_BYTES // 2**20} MB limit for one record "
                         "(a phenopacket or note is a few KB): not read")


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")


def _json_depth_error(obj: Any) -> str | None:
    """None when `obj` nests at most MAX_JSON_DEPTH deep, else why (iterative: deep input cannot recurse here)."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return f"nested deeper than {MAX_JSON_DEPTH} levels (not a phenopacket or note record)"
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return None


def _parse_json(raw: bytes, jsonl: bool = False) -> Any:
    """Bytes -> JSON value; every way it can fail (encoding, syntax, nesting, number limits) -> _RecordError."""
    try:
        # utf-8-sig: a leading byte-order mark (Windows editors write one) is read as absent; plain "utf-8" left it
        # in and json refused the whole record ("Unexpected UTF-8 BOM")
        obj = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise _RecordError("<json>", f"not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        where = f"at column {e.colno}" if jsonl else f"at line {e.lineno} column {e.colno}"
        # json's "Invalid control character at" already ends in "at": without the trim the message read "at at"
        raise _RecordError("<json>", f"invalid JSON: {e.msg.removesuffix(' at')} {where}") from None
    except RecursionError:
        raise _RecordError("<json>", "nested too deeply to parse (not a phenopacket or note record)") from None
    except ValueError as e:  # e.g. an integer literal beyond Python's digit limit
        raise _RecordError("<json>", f"invalid JSON: {str(e).splitlines()[0][:200]}") from None
    why = _json_depth_error(obj)
    if why:
        raise _RecordError("<json>", why)
    return obj


class _Collector:
    """Runs the per-record conversions and applies the raise/skip policy in one place.

    `make(warn)` builds one Case; it may call ``warn(field, message)`` for what it dropped or mapped in a record
    it keeps (collected in ``warnings``; dropped with the record when the record is skipped after all).
    """

    def __init__(self, on_error: str):
        _check_on_error(on_error)
        self.on_error = on_error
        self.cases: list[Case] = []
        self.issues: list[ImportIssue] = []
        self.warnings: list[ImportIssue] = []
        self.ignored: list[ImportIssue] = []
        self.n_seen = 0
        self._ids: dict[str, str] = {}

    def fail(self, file: str, record: str, field: str, message: str) -> None:
        issue = ImportIssue(str(file), str(record), field, message)
        if self.on_error == "raise":
            raise ValueError(str(issue))
        self.issues.append(issue)

    def add(self, file: str, record: str, make) -> None:
        self.n_seen += 1
        pending: list[ImportIssue] = []

        def warn(field: str, message: str) -> None:
            pending.append(ImportIssue(str(file), str(record), field, message))

        try:
            case = make(warn)
        except _RecordError as e:
            self.fail(file, record, e.field, e.message)
            return
        except RecursionError:  # a structure deep enough to exhaust the stack anywhere in the conversion
            self.fail(file, record, "<json>", "nested too deeply to process (not a phenopacket or note record)")
            return
        if case.id in self._ids:
            self.fail(file, record, "id", f"duplicate case id {case.id!r} (first seen in record {self._ids[case.id]})")
            return
        self._ids[case.id] = str(record)
        self.cases.append(case)
        self.warnings.extend(pending)

    def result(self) -> ImportResult:
        return ImportResult(self.cases, self.issues, self.n_seen, self.warnings, self.ignored)


def write_report(issues: ImportResult | Sequence[ImportIssue], path: str | Path) -> Path:
    """Write the skipped-record report: JSON for a ``.json`` path, Markdown otherwise. Returns the path.

    Pass the ImportResult to include the seen/imported counts; a bare list of issues works too.
    """
    path = Path(path)
    warnings: list[ImportIssue] = []
    ignored: list[ImportIssue] = []
    if isinstance(issues, ImportResult):
        counts = {"n_seen": issues.n_seen, "n_imported": len(issues.cases), "n_skipped": len(issues.issues)}
        items, warnings, ignored = issues.issues, issues.warnings, issues.ignored
        if warnings:
            counts["n_warnings"] = len(warnings)
        if ignored:
            counts["n_ignored_files"] = len(ignored)
    else:
        items = list(issues)
        counts = {"n_skipped": len(items)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        doc: dict[str, Any] = {**counts, "skipped": [dataclasses.asdict(i) for i in items]}
        if warnings:
            doc["warnings"] = [dataclasses.asdict(i) for i in warnings]
        if ignored:
            doc["ignored_files"] = [dataclasses.asdict(i) for i in ignored]
        path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        return path

    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = ["# Import report", "", ", ".join(f"{k.removeprefix('n_')}: {v}" for k, v in counts.items()), ""]
    if items:
        lines += ["| file | record | field | why skipped |", "|---|---|---|---|"]
        lines += [f"| {cell(i.file)} | {cell(i.record)} | {cell(i.field)} | {cell(i.message)} |" for i in items]
    else:
        lines.append("No record was skipped.")
    for title, extra in (("Kept, with a warning (HPO terms dropped or mapped)", warnings),
                         ("Files ignored (not a record of a known kind)", ignored)):
        if extra:
            lines += ["", f"## {title}", "", "| file | record | field | what |", "|---|---|---|---|"]
            lines += [f"| {cell(i.file)} | {cell(i.record)} | {cell(i.field)} | {cell(i.message)} |" for i in extra]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------
# small typed accessors: every failure names the JSON path of the field
# --------------------------------------------------------------------------------------------------------------


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number" if isinstance(v, (int, float)) else type(v).__name__)


def _get(obj: dict, key: str, kind: type | tuple[type, ...], path: str, required: bool = False) -> Any:
    if key not in obj or obj[key] is None:
        if required:
            raise _RecordError(path, "missing")
        return None
    v = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        want = " or ".join(_type_name(k()) if k is not type(None) else "null" for k in kinds)
        raise _RecordError(path, f"must be {want}, got {_type_name(v)}")
    return v


# --------------------------------------------------------------------------------------------------------------
# ages and onsets
# --------------------------------------------------------------------------------------------------------------


def parse_iso8601_age(text: str) -> float:
    """'P6Y3M' -> 6.25 years ('P4W', 'P10D', 'P1Y2M3D' too); ValueError for anything else."""
    m = _ISO_DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"not an ISO 8601 duration: {text!r} (expected e.g. P6Y3M)")
    y, mo, w, d = (float(g) if g else 0.0 for g in m.groups())
    return y + mo / 12.0 + w * 7.0 / 365.25 + d / 365.25


def _onset_years_of_class(hpo_id: str, ontology: Ontology) -> float:
    """A representative age for an HPO onset class ('Infantile onset' -> mid-infancy)."""
    lo, hi = simulate.onset_range(hpo_id, ontology)  # the simulator's onset table: one source of truth
    return (lo + hi) / 2.0


@dataclasses.dataclass(frozen=True)
class _Time:
    years: float | None  # None when not an age (ontology class without a table entry, timestamp)
    text: str  # free text for Case.age / meta
    onset_hpo: str | None = None


Warn = Callable[[str, str], None]


def _no_warn(field: str, message: str) -> None:
    pass


def _parse_time(te: TimeElement, path: str, ontology: Ontology, warn: Warn = _no_warn) -> _Time | None:
    """A Phenopacket TimeElement -> years + text; None for forms that carry no age (timestamp, interval), and for
    an onset class this HPO release does not know (with a warning: the age is left out, the case kept). The schema
    has already checked the types; what is checked here is what the schema leaves open (values, HPO ids)."""
    kind = te.WhichOneof("element")
    if kind == "age":
        dur = te.age.iso8601duration
        if not dur:
            raise _RecordError(f"{path}.age.iso8601duration", "missing")
        try:
            years = parse_iso8601_age(dur)
        except ValueError as e:
            raise _RecordError(f"{path}.age.iso8601duration", str(e)) from None
        return _Time(years, simulate.age_text(years) if years > 0 else "newborn")
    if kind == "age_range":
        if not te.age_range.HasField("start"):
            raise _RecordError(f"{path}.ageRange.start", "missing")
        return _parse_time(TimeElement(age=te.age_range.start), f"{path}.ageRange.start", ontology, warn)
    if kind == "gestational_age":
        weeks, days = te.gestational_age.weeks, te.gestational_age.days
        if not weeks:
            raise _RecordError(f"{path}.gestationalAge.weeks", "missing")
        if not 0 < weeks < 45 or not 0 <= days < 7:
            raise _RecordError(f"{path}.gestationalAge", f"implausible gestational age {weeks}w{days}d")
        return _Time(-((40 - weeks) * 7 - days) / 365.25, f"fetus at {weeks} weeks {days} days of gestation")
    if kind == "ontology_class":
        hid = te.ontology_class.id
        if not hid:
            raise _RecordError(f"{path}.ontologyClass.id", "missing")
        if not _HPO_RE.fullmatch(hid):
            raise _RecordError(f"{path}.ontologyClass.id", f"{hid!r} is not an HPO id (HP:NNNNNNN)")
        current, why = ontology.resolve_term(hid)
        if current is None:
            warn(f"{path}.ontologyClass.id", f"{why}: left out")
            return None
        if why:
            warn(f"{path}.ontologyClass.id", why)
        hid = current
        label = ontology.label(hid)
        text = re.sub(r"\s*onset$", "", label, flags=re.I).lower() or label.lower()
        if ontology.is_onset(hid):
            return _Time(_onset_years_of_class(hid, ontology), text, hid)
        return _Time(None, text)
    if kind in ("timestamp", "interval"):
        return None  # a date, not an age: nothing to say without the birth date
    raise _RecordError(path, "empty TimeElement (none of age, ageRange, gestationalAge, ontologyClass, timestamp, "
                             "interval is set)")


# --------------------------------------------------------------------------------------------------------------
# phenopackets
# --------------------------------------------------------------------------------------------------------------


def _leak_strings(packet: Phenopacket, location: Sequence[str]) -> list[str]:
    """Everything that would give the answer away besides the disease itself: gene symbols and ids, variant
    ids/labels/expressions (HGVS) from genomicInterpretations, PMIDs, and the cohort/file names of the location."""
    out: list[str] = []

    def keep(*values: str) -> list[str]:
        return [v for v in values if len(v) >= 2]

    for interp in packet.interpretations:
        for gi in interp.diagnosis.genomic_interpretations:
            out += keep(gi.gene.symbol, gi.gene.value_id)
            vd = gi.variant_interpretation.variation_descriptor
            out += keep(vd.gene_context.symbol, vd.gene_context.value_id, vd.id, vd.label)
            out += keep(*(e.value for e in vd.expressions))
    for ref in packet.meta_data.external_references:
        for pm in keep(ref.id):
            out += [pm] + re.findall(r"\d{5,}", pm)
    for part in location:
        stem = re.sub(r"\.json$", "", part, flags=re.I)
        words = [t for t in re.split(r"[_\s]+", stem) if t]
        if len(words) >= 2:  # a multi-word cohort / file name ("11q_terminal_deletion") as a phrase
            out.append(" ".join(words))
        # gene-like tokens ("FBN1", "NKX6-2"); single plain words ("patients", "data") leak nothing
        out += [t for t in words if len(t) >= 3 and simulate.is_abbreviation(t) and t != "PMID"
                and not re.fullmatch(r"[IVX]+", t)]
    return list(dict.fromkeys(out))


def _secret_hits(text: str, secrets: Sequence[str]) -> list[str]:
    """Which leak strings occur in the text (names only, never the text)."""
    hits = []
    for s in secrets:
        if simulate.is_abbreviation(s) or re.fullmatch(r"[A-Za-z0-9-]+", s) and any(c.isupper() for c in s[1:]):
            if re.search(rf"(?<![A-Za-z0-9]){re.escape(s)}(?![A-Za-z0-9])", text):
                hits.append(s)
        elif simulate.normalise_text(s).strip() and simulate.normalise_text(s) in simulate.normalise_text(text):
            hits.append(s)
    return hits


_CASE_ID = re.compile(r"pp-[0-9a-f]{16}")


def phenopacket_case_id(packet: dict | Phenopacket) -> str:
    """'pp-' + 16 hex of sha256(packet id) (of the canonical JSON when it has none): stable across runs and
    copies, and free of cohort, gene and PMID, which packet ids and file names may carry. A packet id that already
    has this form (a phenopacket exported from a Case by `phenopackets.case_to_phenopacket`) is the case id itself,
    so Case -> Phenopacket -> Case keeps the id and, with it, the note's rendering seed."""
    if isinstance(packet, Phenopacket):
        pid: Any = packet.id
        canonical = lambda: json.dumps(phenopacket_to_json(packet), sort_keys=True)  # noqa: E731
    else:
        pid = packet.get("id")
        canonical = lambda: json.dumps(packet, sort_keys=True)  # noqa: E731
    if isinstance(pid, str) and _CASE_ID.fullmatch(pid):
        return pid
    key = pid if isinstance(pid, str) and pid else canonical()
    return f"pp-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:16]}"


def phenopacket_to_case(packet: Any, ontology: Ontology, diseases: dict[str, Disease] | None = None,
                        location: Sequence[str] = (), warn: Warn = _no_warn) -> Case:
    """One Phenopacket v2 (its JSON value, or a ``Phenopacket`` message) -> Case; a ValueError (with ``.field``,
    the field path) on bad input.

    A JSON value is first read by the official schema (`phenopackets.parse_phenopacket`: a schema error names the
    schema's field path); what the schema leaves open (HPO and disease ids known to this release, a diagnosis and
    an observed finding present, plausible ages) and the leak-safe rendering are checked here.
    ``location`` = path parts (cohort folder, file name) whose words must not appear in the note. ``warn(field,
    message)`` hears of each HPO term mapped (obsolete -> its replacement) or dropped (unknown to this release).
    """
    if isinstance(packet, Phenopacket):
        msg = packet
    else:
        if not isinstance(packet, dict):
            raise _RecordError("<root>", f"a phenopacket must be a JSON object, got {_type_name(packet)}")
        try:
            msg = parse_phenopacket(packet)
        except PhenopacketSchemaError as e:
            raise _RecordError(e.field, e.message) from None
    diseases = diseases if diseases is not None else {d.id: d for d in ontology.diseases()}

    # --- subject: sex, age -------------------------------------------------------------------------------------
    subject = msg.subject
    sex = _SEX.get(Sex.Name(subject.sex), "unknown")
    age = None
    if subject.HasField("time_at_last_encounter"):
        age = _parse_time(subject.time_at_last_encounter, "subject.timeAtLastEncounter", ontology, warn)
    deceased = subject.vital_status.status == VitalStatus.DECEASED

    # --- diagnosis ---------------------------------------------------------------------------------------------
    dx: list[str] = []
    dx_field: dict[str, str] = {}
    for i, interp in enumerate(msg.interpretations):
        p = f"interpretations[{i}]"
        if not interp.HasField("diagnosis"):
            continue
        if not interp.diagnosis.HasField("disease"):
            raise _RecordError(f"{p}.diagnosis.disease", "missing")
        did = interp.diagnosis.disease.id
        if not did:
            raise _RecordError(f"{p}.diagnosis.disease.id", "missing")
        dx_field.setdefault(did, f"{p}.diagnosis.disease.id")
        dx.append(did)
    if not dx:  # fall back to the diseases block (not excluded ones)
        for i, item in enumerate(msg.diseases):
            p = f"diseases[{i}]"
            if item.excluded:
                continue
            if not item.HasField("term"):
                raise _RecordError(f"{p}.term", "missing")
            did = item.term.id
            if not did:
                raise _RecordError(f"{p}.term.id", "missing")
            dx_field.setdefault(did, f"{p}.term.id")
            dx.append(did)
    if not dx:
        raise _RecordError("interpretations", "no diagnosis: neither interpretations[].diagnosis.disease.id nor "
                                              "diseases[].term.id is given")
    gold: list[str] = []
    for did in dict.fromkeys(dx):
        canon = next(iter(parse_disease_id(did)), did)
        if canon not in diseases:
            raise _RecordError(dx_field[did], f"disease {did!r} is not in the ontology's annotated disease set "
                                              f"(HPO release {ontology.version})")
        gold.append(canon)

    # --- phenotypic features -----------------------------------------------------------------------------------
    if not msg.phenotypic_features:
        raise _RecordError("phenotypicFeatures", "missing (no phenotypic feature given)")
    present: list[str] = []
    absent: list[str] = []
    feature_onsets: list[_Time] = []
    dropped: list[str] = []
    for i, f in enumerate(msg.phenotypic_features):
        p = f"phenotypicFeatures[{i}]"
        if not f.HasField("type"):
            raise _RecordError(f"{p}.type", "missing")
        hid = f.type.id
        if not hid:
            raise _RecordError(f"{p}.type.id", "missing")
        if not _HPO_RE.fullmatch(hid):
            raise _RecordError(f"{p}.type.id", f"{hid!r} is not an HPO id (HP:NNNNNNN)")
        excluded = f.excluded
        current, why = ontology.resolve_term(hid)
        if current is None:  # newer than, or withdrawn from, the shipped release: the rest of the case still counts
            warn(f"{p}.type.id", f"{why}: term dropped, case kept")
            dropped.append(hid)
            continue
        if why:
            warn(f"{p}.type.id", f"{why}: mapped, case kept")
        hid = current
        if f.HasField("onset"):
            ft = _parse_time(f.onset, f"{p}.onset", ontology, warn)
            if ft is not None and ft.years is not None and not excluded:
                feature_onsets.append(ft)
        (absent if excluded else present).append(hid)
    present = list(dict.fromkeys(present))
    absent = [h for h in dict.fromkeys(absent) if h not in set(present)]  # observed wins over a contradiction

    # --- onset: the disease's, else the earliest feature's -----------------------------------------------------
    onset: _Time | None = None
    for i, item in enumerate(msg.diseases):
        if item.HasField("onset"):
            onset = _parse_time(item.onset, f"diseases[{i}].onset", ontology, warn)
            if onset is not None and onset.years is not None:
                break
            onset = None
    if onset is None and feature_onsets:
        onset = min(feature_onsets, key=lambda t: t.years)

    # --- what may not appear in the note -----------------------------------------------------------------------
    gold_diseases = [diseases[g] for g in gold]
    names = [s for d in gold_diseases for s in (d.name, *d.synonyms)]
    distinct = [w for d in gold_diseases for w in simulate.distinctive_words(d, ontology)]
    secrets = _leak_strings(msg, location)
    # wordings are filtered against the short strings a phenotype label could contain (names, genes, cohort);
    # variant descriptors/HGVS/PMIDs cannot be HPO wording, so they are only checked in the finished note
    forbidden = (*names, *distinct, *(s for s in secrets if not re.search(r"[.:>]|\d{5,}", s)))
    withheld = [h for h in present + absent if simulate.forbidden_in(ontology.label(h), forbidden, distinct)]
    present = [h for h in present if h not in withheld]
    absent = [h for h in absent if h not in withheld]
    if not present:
        why = f" ({len(withheld)} withheld: their wording would reveal the answer)" if withheld else ""
        if dropped:
            why += f" ({len(dropped)} not in HPO release {ontology.version}: {', '.join(dropped[:5])})"
        raise _RecordError("phenotypicFeatures", f"no observed (non-excluded) phenotypic feature to describe{why}")

    # --- render with the simulator's renderer, then check ------------------------------------------------------
    case_id = phenopacket_case_id(packet)
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:16], "little"))
    age_years = age.years if age is not None and age.years is not None and age.years >= 0 else None
    style = simulate.STYLES[int(rng.integers(len(simulate.STYLES)))]
    text, leaks = "", ["not rendered"]
    for _ in range(RENDER_TRIES):
        text = simulate.render_note(
            ontology, present, absent, rng, sex=sex, age_years=age_years,
            onset_years=onset.years if onset else None, onset_hpo=onset.onset_hpo if onset else None,
            style=style, forbidden=forbidden)
        leaks = [x for d in gold_diseases for x in simulate.find_leaks(text, d, ontology)]
        leaks += [f"leak string {s!r}" for s in _secret_hits(text, secrets)]
        if not leaks:
            break
    if leaks:
        raise _RecordError("phenotypicFeatures", "every rendering of the note would reveal the answer ("
                           + "; ".join(leaks[:3]) + ")")
    pmids = [r.id for r in msg.meta_data.external_references if r.id.upper().startswith("PMID")]
    meta: dict[str, Any] = {"pmid": pmids, "style": style, "onset": onset.text if onset else "",
                            "onset_hpo": onset.onset_hpo or "" if onset else "", "deceased": deceased,
                            "withheld_hpo": withheld}
    return Case(id=case_id, text=text, diagnosis=tuple(gold), diagnosis_name=gold_diseases[0].name,
                present_hpo=tuple(present), absent_hpo=tuple(absent), sex=sex, age=age.text if age else "",
                level="real", source="phenopacket", meta=meta)


def _is_record_name(name: str) -> bool:
    """A phenopacket record: a name ending in .json, any case (.json, .JSON, .Json), the same for folders and
    archives."""
    return name.lower().endswith(".json")


def _iter_json_records(path: Path, ignored: list[ImportIssue] | None = None
                       ) -> Iterator[tuple[str, str, tuple[str, ...], bytes | Exception]]:
    """(file, record, location parts, raw bytes or read error) for each .json record under ``path``.

    Hidden files (``.*``, e.g. macOS ``._x.json``) are not records; everything else ending in .json (any case)
    is. Every other file met (hidden, another extension, not a regular file) is appended to ``ignored`` with the
    reason, for a folder and for an archive alike. In a folder, a symbolic link to a file inside the folder is
    read like that file; a link to a folder, or to anything outside the folder, is not followed and is listed in
    ``ignored`` (an archive's link members are not followed either). A record over MAX_RECORD_BYTES is not read:
    it comes back as a `_TooLarge` error (one bad record).
    """
    ignored = ignored if ignored is not None else []

    def hidden(name: str) -> bool:
        return any(part.startswith(".") for part in Path(name).parts if part not in (".", ".."))

    def ignore(file: str, record: str, why: str) -> None:
        ignored.append(ImportIssue(file, record, "<file>", why))

    def too_large(size: int) -> "_TooLarge | None":
        return _TooLarge(size) if size > MAX_RECORD_BYTES else None

    if path.is_dir():
        root = path.resolve()
        for f in sorted(path.rglob("*")):
            rel = f.relative_to(path)
            # A symlink used to be followed wherever it pointed (a file anywhere on the machine read silently) and
            # a link to a folder skipped silently (rglob does not descend into it): both are now listed.
            if f.is_symlink() and f.is_dir():
                ignore(str(f), str(rel), "symbolic link to a folder, not followed (list the folder itself)")
                continue
            if f.is_dir():
                continue
            if f.is_symlink() and f.exists() and not f.resolve().is_relative_to(root):
                ignore(str(f), str(rel), "symbolic link to a file outside the folder, not followed (copy the file "
                                         "into the folder to import it)")
                continue
            if hidden(str(rel)):
                ignore(str(f), str(rel), "hidden file, not read as a record")
                continue
            if not _is_record_name(f.name):
                ignore(str(f), str(rel), "unknown file kind (a phenopacket record ends in .json), ignored")
                continue
            if not f.is_file():
                ignore(str(f), str(rel), "not a regular file (dangling link, device or folder), ignored")
                continue
            try:
                raw: bytes | Exception = too_large(f.stat().st_size) or f.read_bytes()
            except OSError as e:
                raw = e
            yield str(f), rel.name, tuple(rel.parts), raw
    elif tarfile.is_tarfile(path):
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                if m.isdir():
                    continue
                if hidden(m.name):
                    ignore(str(path), m.name, "hidden file, not read as a record")
                    continue
                if not _is_record_name(m.name):
                    ignore(str(path), m.name, "unknown file kind (a phenopacket record ends in .json), ignored")
                    continue
                if not m.isfile():
                    ignore(str(path), m.name, "not a regular file (link or device member), ignored")
                    continue
                big = too_large(m.size)
                if big:
                    yield str(path), m.name, tuple(Path(m.name).parts), big
                    continue
                fh = tar.extractfile(m)
                try:
                    raw = fh.read() if fh is not None else OSError("unreadable member")
                except (OSError, tarfile.TarError) as e:
                    raw = e
                yield str(path), m.name, tuple(Path(m.name).parts), raw
    elif path.is_file():
        try:
            raw = too_large(path.stat().st_size) or path.read_bytes()
        except OSError as e:
            raw = e
        yield str(path), path.name, (path.name,), raw
    else:
        raise FileNotFoundError(f"{path}: no such phenopacket file, folder or archive")


def load_phenopackets(path: str | Path, ontology: Ontology, on_error: str = "raise") -> ImportResult:
    """Every .json phenopacket (any case of the extension) in a folder (recursive), a .tar.gz/.tar archive (read
    in memory) or one file. Other files are listed in the result's ``ignored``."""
    _check_on_error(on_error)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such phenopacket file, folder or archive")
    diseases = {d.id: d for d in ontology.diseases()}
    col = _Collector(on_error)
    for file, record, location, raw in _iter_json_records(path, col.ignored):
        def make(warn, raw=raw, location=location) -> Case:
            if isinstance(raw, _TooLarge):
                raise _RecordError("<file>", str(raw))
            if isinstance(raw, Exception):
                raise _RecordError("<file>", f"cannot read: {raw}")
            packet = _parse_json(raw)
            return phenopacket_to_case(packet, ontology, diseases, location, warn)

        col.add(file, record, make)
    return col.result()


# --------------------------------------------------------------------------------------------------------------
# JSONL notes
# --------------------------------------------------------------------------------------------------------------


def _jsonl_case(obj: Any, ontology: Ontology, linker: DiseaseLinker, diseases: dict[str, Disease],
                warn: Warn = _no_warn) -> Case:
    if not isinstance(obj, dict):
        raise _RecordError("<root>", f"each line must be a JSON object, got {_type_name(obj)}")
    cid = _get(obj, "id", str, "id", required=True)
    if not cid.strip():
        raise _RecordError("id", "is empty")
    text = _get(obj, "text", str, "text", required=True)
    if not text.strip():
        raise _RecordError("text", "is empty")
    raw_dx = _get(obj, "diagnosis", list, "diagnosis", required=True)
    if not raw_dx:
        raise _RecordError("diagnosis", "is an empty list")
    gold: list[str] = []
    links: list[dict] = []
    for i, entry in enumerate(raw_dx):
        if not isinstance(entry, str) or not entry.strip():
            raise _RecordError(f"diagnosis[{i}]", f"must be a non-empty string (id or name), got {_type_name(entry)}")
        ids = parse_disease_id(entry)
        if ids and re.fullmatch(r"\s*[A-Za-z]+\s*[:_# -]?\s*#?\s*\d+\s*", entry):  # the entry is just an id
            if ids[0] not in diseases:
                raise _RecordError(f"diagnosis[{i}]", f"disease id {entry!r} is not in the ontology's annotated "
                                                      "disease set")
            did, how, score = ids[0], "id", 1.0
        else:
            hits = linker.link(entry, top=1)
            if not hits:
                raise _RecordError(f"diagnosis[{i}]", f"disease name {entry!r} could not be linked to an ontology "
                                                      f"id (no match scoring >= {linker.fuzzy_threshold})")
            did, how, score = hits[0].id, hits[0].how, hits[0].score
            if did not in diseases:
                raise _RecordError(f"diagnosis[{i}]", f"{entry!r} linked to {did}, which is not in the ontology's "
                                                      "annotated disease set")
        if did not in gold:
            gold.append(did)
        links.append({"mention": entry, "id": did, "how": how, "score": score})
    sex = _get(obj, "sex", str, "sex") or "unknown"
    sex = _SEX.get(sex.upper(), sex.lower())
    if sex not in ("female", "male", "unknown"):
        raise _RecordError("sex", f"unknown value {obj['sex']!r} (expected female, male or unknown)")
    age = _get(obj, "age", (str, int, float), "age")
    hpo: dict[str, list[str]] = {}
    for name in ("present_hpo", "absent_hpo"):
        vals = _get(obj, name, list, name) or []
        kept: list[str] = []
        for j, h in enumerate(vals):
            if not isinstance(h, str) or not _HPO_RE.fullmatch(h):
                raise _RecordError(f"{name}[{j}]", f"{h!r} is not an HPO id (HP:NNNNNNN)")
            current, why = ontology.resolve_term(h)
            if current is None:
                warn(f"{name}[{j}]", f"{why}: term dropped, note kept")
                continue
            if why:
                warn(f"{name}[{j}]", f"{why}: mapped, note kept")
            kept.append(current)
        hpo[name] = list(dict.fromkeys(kept))  # an obsolete id and its replacement both listed: one term
    hpo["absent_hpo"] = [h for h in hpo["absent_hpo"] if h not in set(hpo["present_hpo"])]  # observed wins
    meta = _get(obj, "meta", dict, "meta") or {}
    return Case(id=cid, text=text, diagnosis=tuple(gold), diagnosis_name=diseases[gold[0]].name,
                present_hpo=tuple(hpo["present_hpo"]), absent_hpo=tuple(hpo["absent_hpo"]), sex=sex,
                age="" if age is None else str(age), level="real", source="jsonl",
                meta={**meta, "diagnosis_links": links})


def load_jsonl_notes(path: str | Path, ontology: Ontology, linker: DiseaseLinker | None = None,
                     on_error: str = "raise") -> ImportResult:
    """JSONL notes, one ``{"id", "text", "diagnosis": [ids or names]}`` per line (blank lines are not records).

    Names are linked with ``linker`` (default: one over every ontology disease). Optional fields: ``sex``,
    ``age``, ``present_hpo``, ``absent_hpo``, ``meta``; the record number in issues is the 1-based line number.
    """
    _check_on_error(on_error)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such JSONL file")
    diseases = {d.id: d for d in ontology.diseases()}
    linker = linker if linker is not None else DiseaseLinker(list(diseases.values()))
    col = _Collector(on_error)
    with open(path, "rb") as fh:
        lineno = 0
        while True:
            # readline with a limit: one huge line is read at most MAX_RECORD_BYTES + 1 at a time and refused,
            # never held whole in memory; the good lines after it are still read
            raw = fh.readline(MAX_RECORD_BYTES + 1)
            if not raw:
                break
            lineno += 1
            if len(raw) > MAX_RECORD_BYTES:  # skip the rest of the line in chunks, counting its size
                size = len(raw)
                while not raw.endswith(b"\n"):
                    raw = fh.readline(MAX_RECORD_BYTES + 1)
                    if not raw:
                        break
                    size += len(raw)

                def too_large(warn, size=size) -> Case:
                    raise _RecordError("<line>", str(_TooLarge(size)))

                col.add(str(path), str(lineno), too_large)
                continue
            if not raw.strip():
                continue

            def make(warn, raw=raw) -> Case:
                return _jsonl_case(_parse_json(raw, jsonl=True), ontology, linker, diseases, warn)

            col.add(str(path), str(lineno), make)
    return col.result()


# --------------------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------------------


def load_cases(spec: str | Path | Sequence[str | Path], ontology: Ontology, linker: DiseaseLinker | None = None,
               on_error: str = "raise") -> ImportResult:
    """Import from one or several paths (a comma-separated string works too), dispatching on the path type:
    a folder, ``.tar.gz``/``.tgz``/``.tar`` or ``.json`` -> phenopackets; ``.jsonl`` -> JSONL notes.
    Case ids must be unique across all sources (a repeat is an issue on the later record)."""
    _check_on_error(on_error)
    if isinstance(spec, (str, os.PathLike)):
        paths = [p.strip() for p in str(spec).split(",") if p.strip()]
    else:
        paths = [str(p) for p in spec]
    if not paths:
        raise ValueError("load_cases: no input path given")
    total = ImportResult([], [], 0)
    for p in paths:
        path = Path(p)
        name = path.name.lower()
        if name.endswith(".jsonl"):
            if linker is None:
                linker = DiseaseLinker(ontology.diseases())
            res = load_jsonl_notes(path, ontology, linker, on_error)
        elif path.is_dir() or name.endswith((".tar.gz", ".tgz", ".tar", ".json")):
            res = load_phenopackets(path, ontology, on_error)
        elif not path.exists():
            raise FileNotFoundError(f"{path}: no such input (expected a folder, .tar.gz, .json or .jsonl)")
        else:
            raise ValueError(f"{path}: cannot tell the input format (expected a folder, .tar.gz, .json or .jsonl)")
        seen = {c.id for c in total.cases}
        dups = [c for c in res.cases if c.id in seen]
        if dups:
            col = _Collector(on_error)  # reuse the raise/skip policy for cross-source duplicates
            for c in dups:
                col.fail(str(path), c.id, "id", f"duplicate case id {c.id!r} (already imported from an earlier input)")
            res = ImportResult([c for c in res.cases if c.id not in seen], res.issues + col.issues, res.n_seen,
                               res.warnings, res.ignored)
        total = total + res
    return total
