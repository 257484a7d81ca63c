"""Importers: real phenopackets import or are reported, malformed input gets one named error each, and notes
rendered from phenopackets never carry the answer (gene, variant, cohort, file name, PMID, disease name)."""
from __future__ import annotations

import collections
import copy
import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from raredx_jax.data import importers
from raredx_jax.data.case import Case
from raredx_jax.data.hpo import load_ontology
from raredx_jax.data.importers import (
    ImportIssue,
    ImportResult,
    load_cases,
    load_jsonl_notes,
    load_phenopackets,
    parse_iso8601_age,
    phenopacket_case_id,
    write_report,
)
from raredx_jax.data.linking import DiseaseLinker
from raredx_jax.data.simulate import find_leaks

DEV_ARCHIVE = Path("/work/shared/data/phenopacket-store-dev.tar.gz")


@pytest.fixture(scope="module")
def ontology():
    return load_ontology()


@pytest.fixture(scope="module")
def linker(ontology):
    return DiseaseLinker(ontology.diseases())


# ---------------------------------------------------------------------------------------------------------------
# fixture writers


def good_packet(pid: str = "PMID_12345678_P1", gene: str = "FBN1") -> dict:
    """A valid Phenopacket v2 for Marfan syndrome, with a gene and variants that must never reach the note."""
    return {
        "id": pid,
        "subject": {"id": "P1", "sex": "FEMALE", "timeAtLastEncounter": {"age": {"iso8601duration": "P14Y6M"}}},
        "phenotypicFeatures": [
            {"type": {"id": "HP:0001166", "label": "Arachnodactyly"}},
            {"type": {"id": "HP:0001083", "label": "Ectopia lentis"}, "onset": {"age": {"iso8601duration": "P6Y"}}},
            {"type": {"id": "HP:0002616", "label": "Aortic root aneurysm"}},
            {"type": {"id": "HP:0001519", "label": "Disproportionate tall stature"}},  # synonym: Marfanoid habitus
            {"type": {"id": "HP:0001250", "label": "Seizure"}, "excluded": True},
        ],
        "interpretations": [{
            "id": "i1", "progressStatus": "SOLVED",
            "diagnosis": {
                "disease": {"id": "OMIM:154700", "label": "Marfan syndrome"},
                "genomicInterpretations": [{
                    "subjectOrBiosampleId": "P1", "interpretationStatus": "CAUSATIVE",
                    "variantInterpretation": {"variationDescriptor": {
                        "id": f"c1585CtoT_{gene}_NM_000138v5",
                        "geneContext": {"valueId": "HGNC:3603", "symbol": gene},
                        "expressions": [{"syntax": "hgvs.c", "value": "NM_000138.5:c.1585C>T"},
                                        {"syntax": "hgvs.p", "value": "NP_000129.3:p.(Arg529Ter)"}],
                    }},
                }],
            },
        }],
        "diseases": [{"term": {"id": "OMIM:154700", "label": "Marfan syndrome"},
                      "onset": {"ontologyClass": {"id": "HP:0011463", "label": "Childhood onset"}}}],
        "metaData": {"externalReferences": [{"id": "PMID:12345678", "description": "FBN1 variants in Marfan"}]},
    }


def _mutate(fn):
    p = good_packet()
    fn(p)
    return json.dumps(p)


# file name -> (content, the field the single error must name)
MALFORMED = {
    "bad_json.json": ('{"id": "x", "subject": ', "<json>"),
    "root_is_array.json": ("[1, 2, 3]", "<root>"),
    "missing_diagnosis.json": (_mutate(lambda p: (p.__setitem__("interpretations", []),
                                                  p.__setitem__("diseases", []))), "interpretations"),
    # every observed term unknown to the release: nothing usable remains (one unknown term alone is dropped with
    # a warning and the case kept: test_unknown_and_obsolete_terms_are_dropped_or_mapped_case_kept)
    "unknown_hpo.json": (_mutate(lambda p: [f["type"].__setitem__("id", f"HP:999999{k}")
                                            for k, f in enumerate(p["phenotypicFeatures"])]), "phenotypicFeatures"),
    # issue 18 item 3: nesting deep enough to exhaust the parser's recursion, and deep but parseable nesting
    "deep_nesting.json": ("[" * 200_000 + "]" * 200_000, "<json>"),
    "deep_field.json": (_mutate(lambda p: p["subject"].__setitem__("extra", json.loads("[" * 300 + "]" * 300))),
                        "<json>"),
    "not_an_hpo_id.json": (_mutate(lambda p: p["phenotypicFeatures"][0]["type"].__setitem__("id", "Arachnodactyly")),
                           "phenotypicFeatures[0].type.id"),
    "features_is_string.json": (_mutate(lambda p: p.__setitem__("phenotypicFeatures", "tall, long fingers")),
                                "phenotypicFeatures"),
    "feature_is_number.json": (_mutate(lambda p: p["phenotypicFeatures"].__setitem__(2, 42)),
                               "phenotypicFeatures[2]"),
    "excluded_not_bool.json": (_mutate(lambda p: p["phenotypicFeatures"][4].__setitem__("excluded", "yes")),
                               "phenotypicFeatures[4].excluded"),
    "sex_is_number.json": (_mutate(lambda p: p["subject"].__setitem__("sex", 2)), "subject.sex"),
    "sex_is_list.json": (_mutate(lambda p: p["subject"].__setitem__("sex", ["MALE"])), "subject.sex"),
    "sex_unknown_value.json": (_mutate(lambda p: p["subject"].__setitem__("sex", "F")), "subject.sex"),
    "bad_age.json": (_mutate(lambda p: p["subject"]["timeAtLastEncounter"]["age"].__setitem__(
        "iso8601duration", "six years")), "subject.timeAtLastEncounter.age.iso8601duration"),
    "unknown_disease.json": (_mutate(lambda p: p["interpretations"][0]["diagnosis"]["disease"].__setitem__(
        "id", "OMIM:999999")), "interpretations[0].diagnosis.disease.id"),
    "disease_id_number.json": (_mutate(lambda p: p["interpretations"][0]["diagnosis"]["disease"].__setitem__(
        "id", 154700)), "interpretations[0].diagnosis.disease.id"),
    "only_excluded.json": (_mutate(lambda p: [f.__setitem__("excluded", True) for f in p["phenotypicFeatures"]]),
                           "phenotypicFeatures"),
    "not_utf8.json": (b'{"id": "\xff\xfe"}', "<json>"),
}


def write_malformed(folder: Path) -> Path:
    """The good packet plus each malformed file (and a hidden AppleDouble file, which is not a record)."""
    (folder / "cohortA" / "phenopackets").mkdir(parents=True)
    (folder / "cohortA" / "phenopackets" / "good.json").write_text(json.dumps(good_packet()))
    for name, (content, _) in MALFORMED.items():
        data = content if isinstance(content, bytes) else content.encode()
        (folder / name).write_bytes(data)
    (folder / "._good.json").write_bytes(b"\x00\x05\x16\x07 resource fork")
    return folder


# ---------------------------------------------------------------------------------------------------------------
# the real dev archive


@pytest.fixture(scope="module")
def dev_packets():
    """member name -> parsed packet, read independently of the importer."""
    out = {}
    with tarfile.open(DEV_ARCHIVE, "r:gz") as tar:
        for m in tar:
            if m.isfile() and m.name.endswith(".json"):
                out[m.name] = json.load(tar.extractfile(m))
    return out


@pytest.fixture(scope="module")
def dev_result(ontology):
    return load_phenopackets(DEV_ARCHIVE, ontology, on_error="skip")


def test_dev_archive_every_packet_imports_or_is_reported(dev_result, dev_packets, tmp_path):
    r = dev_result
    reasons = collections.Counter(i.field.split("[")[0] + ": " + i.message.split("'")[0].strip() for i in r.issues)
    print(f"\ndev archive: {r.summary()}; skipped by reason: {dict(reasons)}")
    assert len(dev_packets) == 2594
    assert r.n_seen == len(dev_packets) == len(r.cases) + len(r.issues)
    # every skipped record is named (member), and no record is both imported and skipped
    skipped = {i.record for i in r.issues}
    assert len(skipped) == len(r.issues) and skipped <= set(dev_packets)
    imported_ids = {c.id for c in r.cases}
    assert len(imported_ids) == len(r.cases)
    by_id = {phenopacket_case_id(p): name for name, p in dev_packets.items()}
    assert {by_id[c.id] for c in r.cases}.isdisjoint(skipped)
    assert {by_id[c.id] for c in r.cases} | skipped == set(dev_packets)
    assert all(i.file == str(DEV_ARCHIVE) and i.field and i.message for i in r.issues)
    assert len(r.cases) > 0.8 * len(dev_packets)  # measured 2,306 imported, 288 skipped
    # issue 18 item 12: the two AK2 cases with HPO terms newer than the shipped release are kept, each dropped
    # term reported with file, record and field
    assert not [i for i in r.issues if "not in HPO release" in i.message]
    dropped = sorted((Path(w.record).name, w.message.split()[0]) for w in r.warnings)
    assert dropped == [("PMID_19043417_F5P1.json", "HP:5210141"), ("PMID_42039167_Patient.json", "HP:5210041"),
                       ("PMID_42039167_Patient.json", "HP:5210056"), ("PMID_42039167_Patient.json", "HP:5210100"),
                       ("PMID_42039167_Patient.json", "HP:5210140")]
    assert all(w.field.startswith("phenotypicFeatures[") and "term dropped, case kept" in w.message
               for w in r.warnings)
    rep = write_report(r, tmp_path / "report.json")
    data = json.loads(rep.read_text())
    assert data["n_seen"] == 2594 and len(data["skipped"]) == len(r.issues)
    assert len(data["warnings"]) == 5 and "HP:5210141" in write_report(r, tmp_path / "report.md").read_text()


def _packet_secrets(packet: dict, member: str) -> list[tuple[str, bool]]:
    """(string, case_sensitive) that must not occur in a note: gene symbols, variant strings, cohort, file, PMID."""
    out = []
    for interp in packet.get("interpretations", []):
        for gi in interp.get("diagnosis", {}).get("genomicInterpretations", []):
            vd = gi.get("variantInterpretation", {}).get("variationDescriptor", {})
            for sym in (vd.get("geneContext", {}).get("symbol"), gi.get("gene", {}).get("symbol")):
                if sym:
                    out.append((sym, True))
            for e in vd.get("expressions", []):
                out.append((e["value"], False))
                out += [(part, False) for part in re.findall(r"c\.[^\s,;]+|p\.[^\s,;]+", e["value"])]
            if vd.get("id"):
                out.append((vd["id"], False))
    parts = Path(member).parts
    cohort = parts[1]
    out += [(cohort, True), (cohort.replace("_", " "), False), (Path(member).stem, False)]
    for ref in packet.get("metaData", {}).get("externalReferences", []):
        out.append((ref["id"].split(":")[-1], False))
    return out


def test_dev_archive_notes_do_not_leak(dev_result, dev_packets, ontology):
    by_id = {phenopacket_case_id(p): (name, p) for name, p in dev_packets.items()}
    n_genes = 0
    for case in dev_result.cases:
        member, packet = by_id[case.id]
        cohort = Path(member).parts[1]
        for s, case_sensitive in _packet_secrets(packet, member):
            if case_sensitive:
                hit = re.search(rf"(?<![A-Za-z0-9]){re.escape(s)}(?![A-Za-z0-9])", case.text)
                n_genes += 1
            else:
                hit = re.search(rf"(?<![A-Za-z0-9]){re.escape(s)}(?![A-Za-z0-9])", case.text, re.I)
            assert not hit, f"{member}: note contains a leak string ({len(s)} chars, case-sensitive={case_sensitive})"
        assert cohort.lower() not in case.id.lower() and "PMID" not in case.id
        meta = json.dumps(case.meta)
        assert cohort not in meta.replace("PMID", "")
        for d in case.diagnosis:
            assert not find_leaks(case.text, ontology.disease(d)), f"{member}: note names the diagnosis"
        # the diagnosis is the packet's, and the phenotypes are the packet's (minus withheld ones)
        want = [i["diagnosis"]["disease"]["id"] for i in packet["interpretations"]]
        assert list(case.diagnosis) == list(dict.fromkeys(want))
        observed = {ontology.resolve_term(f["type"]["id"])[0] for f in packet["phenotypicFeatures"]
                    if not f.get("excluded")} - {None}  # terms unknown to the release are dropped (reported)
        assert set(case.present_hpo) <= observed and set(case.present_hpo) | set(case.meta["withheld_hpo"]) >= observed
        assert case.source == "phenopacket" and case.level == "real" and case.sex in ("female", "male", "unknown")
    assert n_genes >= len(dev_result.cases)  # every imported packet had at least one gene checked


def test_folder_and_archive_give_the_same_cases(dev_packets, ontology, tmp_path):
    names = sorted(dev_packets)[::97][:20]
    for n in names:
        f = tmp_path / n
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(dev_packets[n]))
    a = load_phenopackets(tmp_path, ontology, on_error="skip")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for n in names:
            data = json.dumps(dev_packets[n]).encode()
            ti = tarfile.TarInfo(n)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    arc = tmp_path / "sub.tar.gz"
    arc.write_bytes(buf.getvalue())
    b = load_phenopackets(arc, ontology, on_error="skip")
    assert a.n_seen == b.n_seen == 20
    assert [(c.id, c.text) for c in a.cases] == [(c.id, c.text) for c in b.cases]  # deterministic rendering


# ---------------------------------------------------------------------------------------------------------------
# malformed input


def test_malformed_folder_one_named_error_each(ontology, tmp_path):
    folder = write_malformed(tmp_path / "in")
    r = load_phenopackets(folder, ontology, on_error="skip")
    assert r.n_seen == 1 + len(MALFORMED) == len(r.cases) + len(r.issues)
    assert len(r.cases) == 1 and r.cases[0].diagnosis == ("OMIM:154700",)
    by_file = collections.defaultdict(list)
    for i in r.issues:
        by_file[Path(i.file).name].append(i)
    assert set(by_file) == set(MALFORMED)
    for name, (_, field) in MALFORMED.items():
        (issue,) = by_file[name]  # exactly one error per bad file
        assert issue.field == field, (name, issue)
        assert issue.record == name and issue.message
    # the skip report lists every skipped record and why
    md = write_report(r, tmp_path / "report.md").read_text()
    js = json.loads(write_report(r.issues, tmp_path / "report.json").read_text())
    assert len(js["skipped"]) == len(MALFORMED)
    for name, (_, field) in MALFORMED.items():
        assert name in md and field in md
    assert "| good.json" not in md and "/good.json" not in md  # the good record is not in the report
    assert [(Path(i.file).name, i.field) for i in r.ignored] == [("._good.json", "<file>")]  # hidden: listed


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_raise_names_file_record_and_field(ontology, tmp_path, name):
    content, field = MALFORMED[name]
    f = tmp_path / "cohortB" / name
    f.parent.mkdir(parents=True)
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as exc:
        load_phenopackets(tmp_path, ontology)  # on_error="raise" is the default
    msg = str(exc.value)
    assert str(f) in msg and f"record {name}" in msg and f"field {field}" in msg, msg


def test_malformed_archive_names_members(ontology, tmp_path):
    folder = write_malformed(tmp_path / "in")
    arc = tmp_path / "bad.tar.gz"
    with tarfile.open(arc, "w:gz") as tar:
        tar.add(folder, arcname="bad")
    r = load_phenopackets(arc, ontology, on_error="skip")
    assert r.n_seen == 1 + len(MALFORMED) and len(r.cases) == 1
    assert {i.record for i in r.issues} == {f"bad/{n}" for n in MALFORMED}
    assert all(i.file == str(arc) for i in r.issues)
    with pytest.raises(ValueError, match=re.escape(str(arc)) + r": record bad/\S+\.json: field "):
        load_phenopackets(arc, ontology, on_error="raise")


def test_on_error_and_paths_are_validated(ontology, tmp_path):
    with pytest.raises(ValueError, match="on_error"):
        load_phenopackets(tmp_path, ontology, on_error="ignore")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_phenopackets(tmp_path / "nope", ontology)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="x.csv"):
        load_cases(tmp_path / "x.csv", ontology)


# ---------------------------------------------------------------------------------------------------------------
# leak guard on a packet built to tempt it


def test_constructed_packet_never_leaks(ontology, tmp_path):
    """30 renderings (ids differ, so styles and wordings differ) of a Marfan packet in a folder named after the
    gene: no gene, variant, cohort, file name, PMID or 'Marfan' (the 'Marfanoid habitus' synonym) in any note."""
    for k in range(30):
        f = tmp_path / "FBN1" / "phenopackets" / f"PMID_12345678_P{k}.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(good_packet(pid=f"PMID_12345678_P{k}")))
    r = load_phenopackets(tmp_path, ontology)
    assert len(r.cases) == 30 and not r.issues
    styles = set()
    for c in r.cases:
        for bad in ("FBN1", "c.1585C>T", "NM_000138", "p.(Arg529Ter)", "12345678", "PMID", "Marfan", "HGNC"):
            assert bad.lower() not in c.text.lower(), bad
        assert "FBN1" not in c.id and "FBN1" not in json.dumps(c.meta)
        assert c.sex == "female" and c.age == "14 years" and c.diagnosis_name == "Marfan syndrome"
        assert c.present_hpo[:3] == ("HP:0001166", "HP:0001083", "HP:0002616") and c.absent_hpo == ("HP:0001250",)
        assert c.meta["pmid"] == ["PMID:12345678"] and c.meta["onset"] == "childhood"
        styles.add(c.meta["style"])
        assert Case.from_json(json.loads(json.dumps(c.to_json()))) == c
    assert len(styles) >= 3  # the simulator's several note styles are used


def test_diagnosis_falls_back_to_diseases_block(ontology):
    p = good_packet()
    p["interpretations"] = []
    case = importers.phenopacket_to_case(p, ontology)
    assert case.diagnosis == ("OMIM:154700",)
    p2 = copy.deepcopy(p)
    p2["diseases"][0]["excluded"] = True
    with pytest.raises(ValueError, match="no diagnosis") as exc:
        importers.phenopacket_to_case(p2, ontology)
    assert exc.value.field == "interpretations"


@pytest.mark.parametrize("text,years", [("P6Y3M", 6.25), ("P6Y", 6.0), ("P4M", 4 / 12), ("P2W", 14 / 365.25),
                                        ("P10D", 10 / 365.25), ("P1Y6M15D", 1.5 + 15 / 365.25), ("P0D", 0.0)])
def test_iso8601_ages(text, years):
    assert parse_iso8601_age(text) == pytest.approx(years)


@pytest.mark.parametrize("bad", ["", "P", "6Y", "P6.Y", "six years", "PY", "P-1Y"])
def test_iso8601_rejects(bad):
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_iso8601_age(bad)


def test_time_elements(ontology):
    p = good_packet()
    p["subject"]["timeAtLastEncounter"] = {"gestationalAge": {"weeks": 22, "days": 3}}
    c = importers.phenopacket_to_case(p, ontology)
    assert c.age == "fetus at 22 weeks 3 days of gestation"
    p["subject"]["timeAtLastEncounter"] = {"ontologyClass": {"id": "HP:0003593", "label": "Infantile onset"}}
    assert importers.phenopacket_to_case(p, ontology).age == "infantile"
    p["subject"]["timeAtLastEncounter"] = {"timestamp": "2020-01-01T00:00:00Z"}
    assert importers.phenopacket_to_case(p, ontology).age == ""
    p["subject"]["timeAtLastEncounter"] = {"when": "yesterday"}  # the schema names the unknown field
    with pytest.raises(ValueError, match="TimeElement") as exc:
        importers.phenopacket_to_case(p, ontology)
    assert exc.value.field == "subject.timeAtLastEncounter.when"
    p["subject"]["timeAtLastEncounter"] = {}
    with pytest.raises(ValueError, match="empty TimeElement") as exc:
        importers.phenopacket_to_case(p, ontology)
    assert exc.value.field == "subject.timeAtLastEncounter"


# ---------------------------------------------------------------------------------------------------------------
# JSONL notes

JSONL_LINES = [  # (line, expected field of the error or None when it imports)
    ({"id": "n1", "text": "A 6-year-old girl with long fingers.", "diagnosis": ["OMIM:154700"]}, None),
    ({"id": "n2", "text": "Tall boy, lens dislocation.", "diagnosis": ["Marfan syndrome"], "sex": "male"}, None),
    ({"id": "n3", "text": "Note three.", "diagnosis": ["Marfan syndrom"]}, None),  # typo: fuzzy link
    ({"id": "n4", "text": "Note four.", "diagnosis": ["Bardet-Biedl syndrome type II", "ORPHA:558"]}, None),
    ('{"id": "n5", "text": "broken', "<json>"),
    ({"id": "n6", "diagnosis": ["OMIM:154700"]}, "text"),
    ({"id": "n7", "text": "Note seven.", "diagnosis": "Marfan syndrome"}, "diagnosis"),
    ({"id": "n8", "text": "Note eight.", "diagnosis": ["xyzzy"]}, "diagnosis[0]"),
    ({"id": "n9", "text": "Note nine.", "diagnosis": ["OMIM:154700", "OMIM:999999"]}, "diagnosis[1]"),
    ({"id": "n1", "text": "Duplicate id.", "diagnosis": ["OMIM:154700"]}, "id"),
    ({"id": 10, "text": "Numeric id.", "diagnosis": ["OMIM:154700"]}, "id"),
    ({"id": "n11", "text": "Note.", "diagnosis": []}, "diagnosis"),
    ({"id": "n12", "text": "Note.", "diagnosis": ["OMIM:154700"], "present_hpo": ["HP:99999"]}, "present_hpo[0]"),
    ('["not", "an", "object"]', "<root>"),
    ({"id": "n14", "text": "Note.", "diagnosis": ["OMIM:154700"], "sex": "robot"}, "sex"),
    # issue 18 item 12: a term newer than the release is dropped (a warning), an obsolete one mapped; note kept
    ({"id": "n15", "text": "Note.", "diagnosis": ["OMIM:154700"],
      "present_hpo": ["HP:9999999", "HP:0001166", "HP:0000057"]}, None),
    # issue 18 item 3: a line nested past the parser's recursion limit, and one past MAX_JSON_DEPTH
    ('{"id": "n16", "text": "t", "diagnosis": ["OMIM:154700"], "meta": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "<json>"),
    ('{"id": "n17", "text": "t", "diagnosis": ["OMIM:154700"], "meta": {"x": ' + "[" * 400 + "]" * 400 + "}}",
     "<json>"),
    ({"id": "n18", "text": "Last good line.", "diagnosis": ["OMIM:154700"]}, None),
]


def write_jsonl(path: Path) -> Path:
    lines = [x if isinstance(x, str) else json.dumps(x) for x, _ in JSONL_LINES]
    lines.insert(3, "   ")  # a blank line is not a record (line numbers still count it)
    path.write_text("\n".join(lines) + "\n")
    return path


def _line_of(i: int) -> str:
    return str(i + 1 + (i >= 3))


def test_jsonl_notes_import_or_report(ontology, linker, tmp_path):
    f = write_jsonl(tmp_path / "notes.jsonl")
    r = load_jsonl_notes(f, ontology, linker, on_error="skip")
    expect_bad = {_line_of(i): field for i, (_, field) in enumerate(JSONL_LINES) if field}
    assert r.n_seen == len(JSONL_LINES) == len(r.cases) + len(r.issues)
    assert {i.record: i.field for i in r.issues} == expect_bad
    cases = {c.id: c for c in r.cases}
    assert cases["n1"].diagnosis == ("OMIM:154700",) and cases["n1"].diagnosis_name == "Marfan syndrome"
    assert cases["n2"].diagnosis[0] in ("OMIM:154700", "ORPHA:558") and cases["n2"].sex == "male"
    assert cases["n3"].diagnosis[0] in ("OMIM:154700", "ORPHA:558")
    assert cases["n3"].meta["diagnosis_links"][0]["how"] == "fuzzy"
    assert cases["n4"].diagnosis == ("OMIM:615981", "ORPHA:558")
    assert all(c.source == "jsonl" for c in r.cases)
    assert set(cases) == {"n1", "n2", "n3", "n4", "n15", "n18"}  # every good line beside the bad ones is kept
    assert cases["n15"].present_hpo == ("HP:0001166", "HP:0008665")  # unknown dropped, obsolete -> replaced_by
    assert [(w.record, w.field, w.message.split()[0]) for w in r.warnings] == [
        (_line_of(15), "present_hpo[0]", "HP:9999999"), (_line_of(15), "present_hpo[2]", "HP:0000057")]
    assert all(w.file == str(f) for w in r.warnings)
    for i in r.issues:  # messages never quote the note text
        assert "Note" not in i.message and "girl" not in i.message


def test_jsonl_raise_names_file_line_and_field(ontology, linker, tmp_path):
    f = write_jsonl(tmp_path / "notes.jsonl")
    with pytest.raises(ValueError) as exc:
        load_jsonl_notes(f, ontology, linker)
    assert str(exc.value).startswith(f"{f}: record {_line_of(4)}: field <json>: invalid JSON")


def test_load_cases_dispatches_and_merges(ontology, linker, tmp_path):
    folder = tmp_path / "pp" / "X" / "phenopackets"
    folder.mkdir(parents=True)
    (folder / "a.json").write_text(json.dumps(good_packet("a")))
    (folder / "b.json").write_text(json.dumps(good_packet("b")))
    notes = tmp_path / "n.jsonl"
    notes.write_text(json.dumps({"id": "n1", "text": "t", "diagnosis": ["OMIM:154700"]}) + "\n")
    arc = tmp_path / "pp.tar.gz"
    with tarfile.open(arc, "w:gz") as tar:
        tar.add(tmp_path / "pp", arcname="pp")
    r = load_cases(f"{tmp_path / 'pp'},{notes}", ontology, linker)
    assert isinstance(r, ImportResult) and r.n_seen == 3 and len(r.cases) == 3
    assert {c.source for c in r.cases} == {"phenopacket", "jsonl"}
    # the same packets twice: the second copies are duplicates, reported, not dropped silently
    r2 = load_cases([tmp_path / "pp", arc], ontology, on_error="skip")
    assert r2.n_seen == 4 and len(r2.cases) == 2 and len(r2.issues) == 2
    assert all(i.field == "id" and "duplicate" in i.message for i in r2.issues)
    with pytest.raises(ValueError, match="duplicate case id"):
        load_cases([tmp_path / "pp", arc], ontology)


def test_issue_and_result_bookkeeping():
    i = ImportIssue("f.json", "3", "subject.sex", "bad")
    assert str(i) == "f.json: record 3: field subject.sex: bad"
    with pytest.raises(RuntimeError, match="bookkeeping"):
        ImportResult([], [i], 2)


# ---------------------------------------------------------------------------------------------------------------
# issue 18: the bad-input corpus (tests/data/bad/) and the reproductions of items 3, 6 and 12

BAD = Path(__file__).parent / "data" / "bad"


def test_upper_case_extension_read_and_unknown_files_listed_folder_and_archive_agree(ontology, tmp_path):
    """Item 6: a folder import read `*.json` only while the archive import read `*.JSON` too, and neither said
    what it left out. Both now read the same records and list the same ignored files."""
    folder = BAD / "phenopackets_mixed"
    a = load_phenopackets(folder, ontology, on_error="skip")
    arc = tmp_path / "mixed.tar.gz"
    with tarfile.open(arc, "w:gz") as tar:
        tar.add(folder, arcname="mixed")
    b = load_phenopackets(arc, ontology, on_error="skip")
    for r in (a, b):
        assert r.n_seen == 4 and len(r.cases) == 3 and len(r.issues) == 1  # .json, .JSON, the newer-term case
        assert r.issues[0].field == "subject.sex" and r.issues[0].record.endswith("case_bad_sex.json")
        assert sorted(Path(i.record).name for i in r.ignored) == ["README.md", "notes.txt"]
        assert all(i.field == "<file>" and "unknown file kind" in i.message for i in r.ignored)
    assert sorted(c.id for c in a.cases) == sorted(c.id for c in b.cases)
    assert phenopacket_case_id({"id": "case-upper"}) in {c.id for c in a.cases}
    # the report lists the ignored files; the summary line counts them
    md = write_report(a, tmp_path / "r.md").read_text()
    assert "README.md" in md and "notes.txt" in md and "2 files of unknown kind ignored" in a.summary()
    assert json.loads(write_report(b, tmp_path / "r.json").read_text())["n_ignored_files"] == 2


def test_unknown_and_obsolete_terms_are_dropped_or_mapped_case_kept(ontology, tmp_path):
    """Item 12: a case with one HPO term newer than the shipped release (HP:5210141) was skipped whole; now the
    term is dropped, an obsolete one (HP:0000057) mapped to its replaced_by term, the case kept, and each term
    reported with file, record and field. Only a case with no usable observed term left is skipped."""
    f = BAD / "phenopackets_mixed" / "cohortA" / "phenopackets" / "case_newer_term.json"
    r = load_phenopackets(f, ontology)  # on_error=raise: a warning never raises
    (case,) = r.cases
    assert "HP:5210141" not in case.present_hpo and "HP:0001166" in case.present_hpo
    assert "HP:0008665" in case.absent_hpo + tuple(case.meta["withheld_hpo"])  # obsolete HP:0000057 -> replaced_by
    assert "obsolete" not in case.text.lower()
    got = {(w.field, w.message.split()[0]) for w in r.warnings}
    assert got == {("phenotypicFeatures[1].type.id", "HP:5210141"), ("phenotypicFeatures[5].type.id", "HP:0000057")}
    assert all(w.file == str(f) and w.record == f.name for w in r.warnings)
    js = json.loads(write_report(r, tmp_path / "r.json").read_text())
    assert js["n_skipped"] == 0 and {w["message"].split()[0] for w in js["warnings"]} == {"HP:5210141", "HP:0000057"}
    # an onset class unknown to the release: the onset is left out, the case kept
    p = good_packet()
    p["diseases"][0]["onset"] = {"ontologyClass": {"id": "HP:5299999", "label": "Some new onset"}}
    warns: list = []
    c = importers.phenopacket_to_case(p, ontology, warn=lambda fld, msg: warns.append((fld, msg)))
    assert c.present_hpo and warns == [("diseases[0].onset.ontologyClass.id", warns[0][1])]
    assert "HP:5299999" in warns[0][1]


def test_deep_json_is_one_bad_record_and_the_rest_is_kept(ontology, linker, tmp_path):
    """Item 3: a deeply nested file aborted the whole import with a RecursionError naming no file, even with
    on_error=skip. Now it is one skipped record (file, record, field <json>) and every good record is kept."""
    folder = tmp_path / "pp"
    folder.mkdir()
    for k in range(3):
        (folder / f"good{k}.json").write_text(json.dumps(good_packet(f"good{k}")))
    (folder / "deep.json").write_text("{\"id\": " + "[" * 150_000 + "]" * 150_000 + "}")
    r = load_phenopackets(folder, ontology, on_error="skip")
    assert len(r.cases) == 3 and [(Path(i.file).name, i.record, i.field) for i in r.issues] == [
        ("deep.json", "deep.json", "<json>")]
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'deep.json'}: record deep.json: field <json>: nested")):
        load_phenopackets(folder, ontology)
    notes = tmp_path / "n.jsonl"
    notes.write_text("\n".join([
        json.dumps({"id": "a", "text": "t", "diagnosis": ["OMIM:154700"]}),
        '{"id": "b", "text": "t", "diagnosis": ["OMIM:154700"], "meta": ' + "{\"k\": " * 120_000 + "1" + "}" * 120_001,
        json.dumps({"id": "c", "text": "t", "diagnosis": ["OMIM:154700"]})]) + "\n")
    r = load_cases([folder, notes], ontology, linker, on_error="skip")
    assert sorted(c.id for c in r.cases if c.source == "jsonl") == ["a", "c"] and r.n_seen == 7
    assert [(i.record, i.field) for i in r.issues] == [("deep.json", "<json>"), ("2", "<json>")]


def test_bad_jsonl_fixture_keeps_every_good_line(ontology, linker):
    r = load_jsonl_notes(BAD / "notes_bad_lines.jsonl", ontology, linker, on_error="skip")
    assert sorted(c.id for c in r.cases) == ["j1", "j4", "j6"]
    assert [(i.record, i.field) for i in r.issues] == [("2", "<json>"), ("3", "diagnosis"), ("5", "diagnosis[0]")]
    assert [(w.record, w.field) for w in r.warnings] == [("4", "present_hpo[0]")]
    with pytest.raises(ValueError, match=r"notes_bad_lines\.jsonl: record 2: field <json>: invalid JSON"):
        load_jsonl_notes(BAD / "notes_bad_lines.jsonl", ontology, linker)
