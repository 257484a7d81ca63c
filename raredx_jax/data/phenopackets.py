"""GA4GH Phenopacket v2 I/O through the official schema (the `phenopackets` package's protobuf classes).

Why: the schema, not hand-written JSON walking, decides what a valid phenopacket is. `parse_phenopacket` reads a
JSON value into a ``Phenopacket`` message with ``google.protobuf.json_format``; when that fails it finds the failing
field by walking the schema's descriptors, so the error names the schema's field path (``subject.sex``,
``phenotypicFeatures[2].type.id``) beside protobuf's own message, for the importers' one-line
file/record/field report. `case_to_phenopacket` goes the other way: a `Case` (imported, JSONL or simulated) becomes
a valid Phenopacket with its diagnosis, its HPO terms (when known), sex and age, and nothing of the note text.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.timestamp_pb2 import Timestamp
from phenopackets import (
    Age,
    Diagnosis,
    Disease,
    ExternalReference,
    GestationalAge,
    Individual,
    Interpretation,
    MetaData,
    OntologyClass,
    Phenopacket,
    PhenotypicFeature,
    Resource,
    Sex,
    TimeElement,
)

from raredx_jax.data.case import Case
from raredx_jax.fileio import atomic_file

__all__ = ["PhenopacketSchemaError", "parse_phenopacket", "phenopacket_to_json", "case_to_phenopacket",
           "write_phenopacket", "SCHEMA_VERSION"]

SCHEMA_VERSION = "2.0"
_SEX_NAME = {"female": "FEMALE", "male": "MALE", "unknown": "UNKNOWN_SEX"}


class PhenopacketSchemaError(ValueError):
    """A JSON value that is not a valid Phenopacket: ``field`` is the schema path, ``message`` protobuf's reason."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field {field}: {message}")
        self.field, self.message = field, message


def _reason(err: Exception) -> str:
    """protobuf's innermost reason, without its 'Failed to parse x field:' chain and trailing location."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    while True:
        m = re.match(r"Failed to parse \w+ field: ", text)
        if not m:
            break
        text = text[m.end():]
    text = re.sub(r"\.?\s+at \"?[A-Z]\w*[\w.\[\]]*\"?\.*$", "", text)  # "... at MetaData.created."
    return text.rstrip(".") or "invalid value"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _locate(obj: Any, descriptor: Descriptor, path: str, err: Exception) -> PhenopacketSchemaError:
    """The deepest field of ``obj`` (a JSON value for ``descriptor``) that the schema refuses.

    Each field is parsed on its own into a fresh message; the first that fails is descended into (per element for
    a repeated message field) until the failing value is a scalar, an enum, a well-known type or a oneof clash.
    """
    if not isinstance(obj, dict):
        return PhenopacketSchemaError(path or "<root>", f"must be an object (message {descriptor.name}), got "
                                                        f"{type(obj).__name__}")
    cls = message_factory.GetMessageClass(descriptor)
    by_name: dict[str, FieldDescriptor] = {}
    for f in descriptor.fields:
        by_name[f.json_name] = f
        by_name[f.name] = f
    for key, value in obj.items():
        field = by_name.get(key)
        here = _join(path, key)
        if field is None:
            return PhenopacketSchemaError(here, f"no such field in {descriptor.full_name} (schema v{SCHEMA_VERSION})")
        try:
            json_format.ParseDict({key: value}, cls())
            continue
        except (json_format.ParseError, TypeError, ValueError, RecursionError) as e:
            sub_err: Exception = e
        msg_type = field.message_type
        nested = msg_type is not None and not msg_type.full_name.startswith("google.protobuf.") \
            and not msg_type.GetOptions().map_entry
        if nested and field.label == FieldDescriptor.LABEL_REPEATED and isinstance(value, list):
            sub_cls = message_factory.GetMessageClass(msg_type)
            for i, item in enumerate(value):
                try:
                    json_format.ParseDict(item, sub_cls())
                except (json_format.ParseError, TypeError, ValueError, RecursionError) as e:
                    return _locate(item, msg_type, f"{here}[{i}]", e)
        elif nested and field.label != FieldDescriptor.LABEL_REPEATED and isinstance(value, dict):
            return _locate(value, msg_type, here, sub_err)
        return PhenopacketSchemaError(here, _reason(sub_err))
    return PhenopacketSchemaError(path or "<root>", _reason(err))  # e.g. two fields of one oneof


def _json_type(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number" if isinstance(v, (int, float)) else type(v).__name__)


def _enums_by_name(obj: Any, descriptor: Descriptor, path: str) -> None:
    """Enum values must be written by name, as the Phenopacket JSON form (and phenopacket-store) writes them.

    proto3's JSON mapping also reads an integer (``"sex": 2`` is MALE); a number there is far more likely a data
    error than a deliberate enum index, so it is refused, naming the field. Walks only what the schema parsed.
    """
    stack = [(obj, descriptor, path)]
    while stack:
        node, desc, where = stack.pop()
        if not isinstance(node, dict):
            continue
        fields = {f.json_name: f for f in desc.fields} | {f.name: f for f in desc.fields}
        for key, value in node.items():
            f = fields.get(key)
            if f is None or value is None:
                continue
            here = _join(where, key)
            items = list(enumerate(value)) if f.label == FieldDescriptor.LABEL_REPEATED and isinstance(
                value, list) else [(None, value)]
            for i, item in items:
                at = here if i is None else f"{here}[{i}]"
                if f.enum_type is not None and not isinstance(item, str):
                    raise PhenopacketSchemaError(at, f"must be string, got {_json_type(item)}")
                if f.message_type is not None and not f.message_type.full_name.startswith("google.protobuf."):
                    stack.append((item, f.message_type, at))


def parse_phenopacket(obj: Any) -> Phenopacket:
    """A JSON value (as ``json.loads`` gives it) -> ``Phenopacket``; PhenopacketSchemaError naming the field path.

    Unknown fields are errors, as in the schema (a misspelt ``phenotypicFeature`` must not read as "no findings");
    so are enum values given as numbers (`_enums_by_name`).
    """
    packet = Phenopacket()
    try:
        json_format.ParseDict(obj, packet)
    except (json_format.ParseError, TypeError, ValueError, RecursionError) as e:
        raise _locate(obj, Phenopacket.DESCRIPTOR, "", e) from None
    _enums_by_name(obj, Phenopacket.DESCRIPTOR, "")
    return packet


def phenopacket_to_json(packet: Phenopacket) -> dict:
    """Message -> JSON value in the schema's camelCase form (what phenopacket-store files hold)."""
    return json_format.MessageToDict(packet)


_AGE_TEXT = re.compile(r"(\d+) (day|month|year)s?")
_GESTATION_TEXT = re.compile(r"fetus at (\d+) weeks (\d+) days of gestation")


def _age_element(text: str) -> TimeElement | None:
    """The importer's age texts ('6 years', '8 months', '3 days', 'newborn', 'fetus at 22 weeks 3 days of
    gestation') -> a TimeElement; None for the others (an onset class's label: not invertible from its text)."""
    if text == "newborn":
        return TimeElement(age=Age(iso8601duration="P0D"))
    g = _GESTATION_TEXT.fullmatch(text.strip())
    if g:
        return TimeElement(gestational_age=GestationalAge(weeks=int(g.group(1)), days=int(g.group(2))))
    m = _AGE_TEXT.fullmatch(text.strip())
    if not m:
        return None
    unit = {"day": "D", "month": "M", "year": "Y"}[m.group(2)]
    return TimeElement(age=Age(iso8601duration=f"P{int(m.group(1))}{unit}"))


def case_to_phenopacket(case: Case, ontology: Any = None, created_by: str = "raredx-jax") -> Phenopacket:
    """A Case -> a valid Phenopacket v2: diagnosis (interpretation + disease), HPO terms observed and excluded,
    sex, age at last encounter, onset class, PMIDs; never the note text.

    The packet id is the case id, which the importer keeps as the case id when it already has the ``pp-<hex>``
    form (so Case -> Phenopacket -> Case returns the same case and note). ``ontology`` adds term labels and the
    HPO version; without it labels are left empty.
    """
    def label(hpo_id: str) -> str:
        return ontology.label(hpo_id) if ontology is not None and ontology.has_term(hpo_id) else ""

    def disease_label(did: str, i: int) -> str:
        if i == 0:
            return case.diagnosis_name
        if ontology is not None:
            try:
                return ontology.disease(did).name
            except KeyError:
                return ""
        return ""

    subject = Individual(id=case.id, sex=Sex.Value(_SEX_NAME.get(case.sex, "UNKNOWN_SEX")))
    age = _age_element(case.age) if case.age else None
    if age is not None:
        subject.time_at_last_encounter.CopyFrom(age)
    if case.meta.get("deceased"):
        subject.vital_status.status = subject.vital_status.DECEASED
    features = [PhenotypicFeature(type=OntologyClass(id=h, label=label(h))) for h in case.present_hpo]
    features += [PhenotypicFeature(type=OntologyClass(id=h, label=label(h)), excluded=True) for h in case.absent_hpo]
    diseases, interpretations = [], []
    onset_hpo = case.meta.get("onset_hpo") or ""
    for i, did in enumerate(case.diagnosis):
        term = OntologyClass(id=did, label=disease_label(did, i))
        d = Disease(term=term)
        if i == 0 and onset_hpo:
            d.onset.CopyFrom(TimeElement(ontology_class=OntologyClass(id=onset_hpo, label=label(onset_hpo))))
        elif i == 0 and _age_element(str(case.meta.get("onset") or "")) is not None:
            d.onset.CopyFrom(_age_element(str(case.meta["onset"])))
        diseases.append(d)
        interpretations.append(Interpretation(
            id=f"{case.id}-interpretation-{i}", progress_status=Interpretation.ProgressStatus.SOLVED,
            diagnosis=Diagnosis(disease=OntologyClass(id=did, label=term.label))))
    created = Timestamp()
    created.GetCurrentTime()
    hpo_version = str(getattr(ontology, "version", "") or "")
    resources = [Resource(id="hp", name="human phenotype ontology", namespace_prefix="HP",
                          url="http://purl.obolibrary.org/obo/hp.owl", version=hpo_version,
                          iri_prefix="http://purl.obolibrary.org/obo/HP_")]
    prefixes = sorted({d.split(":")[0] for d in case.diagnosis})
    for p in prefixes:
        resources.append(Resource(id=p.lower(), name={"OMIM": "Online Mendelian Inheritance in Man",
                                                      "ORPHA": "Orphanet"}.get(p, p), namespace_prefix=p,
                                  version=hpo_version))
    refs = [ExternalReference(id=p) for p in case.meta.get("pmid", []) if isinstance(p, str)]
    meta = MetaData(created=created, created_by=created_by, phenopacket_schema_version=SCHEMA_VERSION,
                    resources=resources, external_references=refs)
    return Phenopacket(id=case.id, subject=subject, phenotypic_features=features, diseases=diseases,
                       interpretations=interpretations, meta_data=meta)


def write_phenopacket(packet: Phenopacket, path: str | Path) -> Path:
    """Write one phenopacket as JSON, atomically (a temporary sibling renamed into place)."""
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(phenopacket_to_json(packet), indent=2) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return path
