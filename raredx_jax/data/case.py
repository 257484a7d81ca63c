"""The Case record: one clinical note with its verified diagnosis, shared by simulation, import, RERS and eval.

The note text is sensitive (real cases) and is the model's only input: never log it whole. Structured fields
(HPO ids, sex, age) are kept beside the text so tests and analyses never need to re-parse the note.
"""
from __future__ import annotations

import dataclasses
from typing import Any

SEXES = ("female", "male", "unknown")


@dataclasses.dataclass(frozen=True)
class Case:
    """A clinical note plus gold diagnosis; `diagnosis_name` feeds the RERS reflection prompt (label only)."""

    id: str
    text: str = dataclasses.field(repr=False)  # sensitive: kept out of repr, logs and test failure output
    diagnosis: tuple[str, ...]
    diagnosis_name: str
    present_hpo: tuple[str, ...] = ()
    absent_hpo: tuple[str, ...] = ()
    sex: str = "unknown"
    age: str = ""
    level: str = "typical"
    source: str = "simulated"
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # Accept lists from JSON/callers but store tuples, so cases stay immutable and comparable.
        for name in ("diagnosis", "present_hpo", "absent_hpo"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (tuple, list)):
                raise TypeError(f"Case {self.id!r}: field {name!r} must be a list of ids, got {type(value).__name__}")
            object.__setattr__(self, name, tuple(value))
        if self.sex not in SEXES:
            raise ValueError(f"Case {self.id!r}: field 'sex' must be one of {SEXES}, got {self.sex!r}")
        if not self.diagnosis:
            raise ValueError(f"Case {self.id!r}: field 'diagnosis' is empty")

    def to_json(self) -> dict[str, Any]:
        """A plain JSON-serialisable dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        for name in ("diagnosis", "present_hpo", "absent_hpo"):
            d[name] = list(d[name])
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Case":
        """Inverse of `to_json`; errors name the record id and the field."""
        if not isinstance(d, dict):
            raise TypeError(f"Case record must be a JSON object, got {type(d).__name__}")
        rid = d.get("id", "<no id>")
        for name in ("id", "text", "diagnosis", "diagnosis_name"):
            if name not in d:
                raise ValueError(f"Case {rid!r}: missing required field {name!r}")
        for name in ("id", "text", "diagnosis_name", "sex", "age", "level", "source"):
            if name in d and not isinstance(d[name], str):
                raise TypeError(f"Case {rid!r}: field {name!r} must be a string, got {type(d[name]).__name__}")
        if "meta" in d and not isinstance(d["meta"], dict):
            raise TypeError(f"Case {rid!r}: field 'meta' must be an object, got {type(d['meta']).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Case {rid!r}: unknown field(s) {unknown}")
        return cls(**{k: v for k, v in d.items()})
