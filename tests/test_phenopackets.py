"""Phenopackets through the official schema (the `phenopackets` package): a schema-invalid packet is reported with
the schema's field path as one file/record/field line; a Case exports to a valid Phenopacket and comes back as the
same Case (note byte for byte), on a fixture and on a sample of the real development archive."""
from __future__ import annotations

import copy
import json
import re
import tarfile
from pathlib import Path

import pytest
from google.protobuf import json_format
from phenopackets import Phenopacket
from test_data_importers import DEV_ARCHIVE, good_packet

from raredx_jax.data import importers
from raredx_jax.data.case import Case
from raredx_jax.data.hpo import load_ontology
from raredx_jax.data.importers import load_jsonl_notes, load_phenopackets
from raredx_jax.data.phenopackets import (
    PhenopacketSchemaError,
    case_to_phenopacket,
    parse_phenopacket,
    phenopacket_to_json,
    write_phenopacket,
)


@pytest.fixture(scope="module")
def ontology():
    return load_ontology()


def _set(path: list, value):
    """A copy of the good packet with the value at `path` (keys and list indexes) replaced."""
    p = copy.deepcopy(good_packet())
    node = p
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return p


# (where to change, bad value, the schema field path the error must name, words of protobuf's reason)
SCHEMA_ERRORS = [
    (["phenotypicFeatures", 1, "typ"], {"id": "HP:0001083"}, "phenotypicFeatures[1].typ", "no such field"),
    (["phenotypicFeatures", 4, "excluded"], "yes", "phenotypicFeatures[4].excluded", "true or false"),
    (["subject", "sex"], "F", "subject.sex", "Invalid enum value F"),
    (["subject", "sex"], 2, "subject.sex", "must be string, got number"),
    (["subject", "timeAtLastEncounter", "age", "iso8601duration"], 14, "subject.timeAtLastEncounter.age"
     ".iso8601duration", "expected string"),
    (["subject", "timeAtLastEncounter", "ageRange"], {"start": {"iso8601duration": "P1Y"}},
     "subject.timeAtLastEncounter", "oneof"),
    (["interpretations", 0, "diagnosis", "disease", "id"], 154700, "interpretations[0].diagnosis.disease.id",
     "expected string"),
    (["interpretations", 0, "diagnosis", "genomicInterpretations", 0, "interpretationStatus"], "MAYBE",
     "interpretations[0].diagnosis.genomicInterpretations[0].interpretationStatus", "Invalid enum value MAYBE"),
    (["diseases", 0, "onset", "ontologyClass"], "HP:0011463", "diseases[0].onset.ontologyClass", ""),
    (["metaData", "created"], "yesterday", "metaData.created", ""),
    (["phenotypicFeatures"], {"type": {"id": "HP:0001166"}}, "phenotypicFeatures", "repeated field"),
]


@pytest.mark.parametrize("where,value,field,reason", SCHEMA_ERRORS, ids=[e[2] for e in SCHEMA_ERRORS])
def test_schema_error_names_the_schema_field_path(where, value, field, reason):
    bad = _set(where, value)
    if isinstance(value, int) and where[-1] == "sex":
        # proto3's JSON mapping reads an integer enum (2 = MALE); the Phenopacket JSON form writes names, and we
        # refuse a number there as a data error (parse_phenopacket's one check on top of the schema)
        assert json_format.ParseDict(bad, Phenopacket()).subject.sex == 2
    else:
        with pytest.raises(json_format.ParseError):  # the official parser refuses it: the schema decides
            json_format.ParseDict(bad, Phenopacket())
    with pytest.raises(PhenopacketSchemaError) as exc:
        parse_phenopacket(bad)
    assert exc.value.field == field
    assert reason in exc.value.message and not re.match(r"Failed to parse \w+ field", exc.value.message)
    assert not re.search(r" at \S+$", exc.value.message)  # the location is in .field, not repeated


def test_schema_error_is_one_file_record_field_line(ontology, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.json").write_text(json.dumps(good_packet()))
    (folder / "bad.json").write_text(json.dumps(_set(["phenotypicFeatures", 2, "type", "lable"], "x")))
    r = load_phenopackets(folder, ontology, on_error="skip")
    assert len(r.cases) == 1 and len(r.issues) == 1
    (issue,) = r.issues
    assert issue.record == "bad.json" and issue.field == "phenotypicFeatures[2].type.lable"
    assert "org.phenopackets.schema.v2.core.OntologyClass" in issue.message
    with pytest.raises(ValueError) as exc:
        load_phenopackets(folder / "bad.json", ontology, on_error="raise")
    line = str(exc.value)
    assert "\n" not in line and line.startswith(f"{folder / 'bad.json'}: record bad.json: field "
                                                "phenotypicFeatures[2].type.lable: no such field")


def test_valid_packet_parses_to_the_message_the_importer_reads(ontology):
    msg = parse_phenopacket(good_packet())
    assert isinstance(msg, Phenopacket) and msg.phenotypic_features[4].excluded
    # the importer gives the same Case from the JSON value and from the message
    assert importers.phenopacket_to_case(msg, ontology) == importers.phenopacket_to_case(good_packet(), ontology)


def _round_trip(case: Case, ontology) -> tuple[dict, Case]:
    packet = case_to_phenopacket(case, ontology)
    as_json = json.loads(json.dumps(phenopacket_to_json(packet)))
    assert json_format.ParseDict(as_json, Phenopacket()) == packet  # valid against the official schema
    return as_json, importers.phenopacket_to_case(as_json, ontology)


def test_case_to_phenopacket_to_case_round_trip(ontology):
    case = importers.phenopacket_to_case(good_packet(), ontology)
    as_json, back = _round_trip(case, ontology)
    assert back == case  # every field, the note byte for byte (same id -> same rendering seed)
    assert as_json["id"] == case.id and as_json["subject"]["sex"] == "FEMALE"
    assert as_json["metaData"]["phenopacketSchemaVersion"] == "2.0"
    assert as_json["interpretations"][0]["diagnosis"]["disease"]["id"] == "OMIM:154700"
    # the export carries what the note was built from, never the gene or the variant the source had
    text = json.dumps(as_json)
    assert "FBN1" not in text and "c.1585C>T" not in text and "HGNC" not in text


# the importer's age texts that name an age (not an onset class's label, e.g. "infantile")
AGE_INVERTIBLE = re.compile(r"|newborn|\d+ (years|months?|days?)|fetus at \d+ weeks \d+ days of gestation")


def test_round_trip_on_real_development_cases(ontology, tmp_path):
    """60 real cases of the archive spread over it: each exports to a valid packet, written atomically, that
    imports back to the same note. An age given as an HPO onset class is kept in the Case only as the class's label
    ("infantile"), which does not name the class: such a case comes back without its age (2 of the 2,306 archive
    cases), so the note is compared only where the age text is invertible."""
    with tarfile.open(DEV_ARCHIVE, "r:gz") as tar:
        names = sorted(m.name for m in tar if m.isfile() and m.name.endswith(".json"))
        step = max(1, len(names) // 60)
        pick = {n: json.load(tar.extractfile(n)) for n in names[::step][:60]}
    out = tmp_path / "export"
    n_cases = n_same = 0
    for name, raw in pick.items():
        try:
            case = importers.phenopacket_to_case(raw, ontology, location=Path(name).parts)
        except ValueError:
            continue  # skipped on import (reported there): nothing to export
        n_cases += 1
        path = write_phenopacket(case_to_phenopacket(case, ontology), out / f"{case.id}.json")
        back = load_phenopackets(path, ontology, on_error="raise").cases[0]
        if AGE_INVERTIBLE.fullmatch(case.age):
            assert back.text == case.text and back.present_hpo == case.present_hpo, name
            assert back.absent_hpo == case.absent_hpo and back.diagnosis == case.diagnosis and back.sex == case.sex
            n_same += 1
    assert n_cases >= 40 and n_same >= n_cases - 2, (n_cases, n_same)
    assert not list(out.glob(".*partial*"))  # nothing half-written left behind


def test_jsonl_note_exports_with_its_hpo_terms(ontology, tmp_path):
    f = tmp_path / "notes.jsonl"
    f.write_text(json.dumps({"id": "n1", "text": "Tall with long fingers.", "diagnosis": ["OMIM:154700"],
                             "sex": "male", "present_hpo": ["HP:0001166", "HP:0001519"],
                             "absent_hpo": ["HP:0001250"]}) + "\n")
    (case,) = load_jsonl_notes(f, ontology).cases
    packet = phenopacket_to_json(case_to_phenopacket(case, ontology))
    parse_phenopacket(packet)
    feats = [(x["type"]["id"], x["type"]["label"], x.get("excluded", False)) for x in packet["phenotypicFeatures"]]
    assert feats == [("HP:0001166", "Arachnodactyly", False), ("HP:0001519", "Disproportionate tall stature", False),
                     ("HP:0001250", "Seizure", True)]
    assert packet["subject"]["sex"] == "MALE" and "Tall with long fingers" not in json.dumps(packet)
    assert packet["diseases"][0]["term"] == {"id": "OMIM:154700", "label": "Marfan syndrome"}
