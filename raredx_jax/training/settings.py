"""One settings style for every stage: a frozen dataclass per config section, built by one helper.

Why: a stage reading raw ConfigDict fields with `.get(name, default)` keeps a second copy of every default in
code (and the copies drift from `configs/base.py`); a typo in a field name is silently ignored. Here the dataclass
is the one place a section's fields, types and defaults are written: `configs/base.py` builds the section from it
(`config_section`), a stage reads it back with `from_section`, which rejects an unknown field and a value of the
wrong type in one line naming `config.<section>.<field>`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

from ml_collections import config_dict

T = TypeVar("T")


def config_section(cls: type, **overrides: Any) -> config_dict.ConfigDict:
    """The ConfigDict section holding every field of settings class `cls` at its default (or `overrides`)."""
    values = {f.name: f.default for f in dataclasses.fields(cls)}
    unknown = set(overrides) - set(values)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    values.update(overrides)
    return config_dict.ConfigDict(values)


def _coerce(value: Any, default: Any, where: str) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise ValueError(f"{where}={value!r}: expected a bool")
    if isinstance(default, tuple):
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise ValueError(f"{where}={value!r}: expected a tuple")
    try:
        return type(default)(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}={value!r}: expected {type(default).__name__}") from None


def from_section(cls: type[T], section: Mapping[str, Any] | Any, name: str) -> T:
    """Settings `cls` from config section `section` (a ConfigDict or dict) named `name` in messages: fields it
    does not set keep the dataclass default; an unknown field or a value of the wrong type is a ValueError.
    The instance's `validate()` runs when it has one."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw: dict[str, Any] = {}
    for key in (section.keys() if hasattr(section, "keys") else ()):
        if key not in fields:
            raise ValueError(f"config.{name}.{key}: unknown field (known: {', '.join(sorted(fields))})")
        kw[key] = _coerce(section[key], fields[key].default, f"config.{name}.{key}")
    out = cls(**kw)
    validate = getattr(out, "validate", None)
    if callable(validate):
        validate()
    return out
