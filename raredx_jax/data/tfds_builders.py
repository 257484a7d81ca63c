"""TFDS builders (array_record, no tensorflow) for every dataset the recipe reads, plus typed readers.

Why TFDS: one versioned on-disk layout (`<data_dir>/<name>/<config>/<version>/*.array_record-*` + metadata)
that `tfds.data_source` opens as a random-access source, which grain shards and shuffles by index and
checkpoints exactly. Only the array_record path of TFDS is used: `download_and_prepare` writes it with pure
Python, and `as_data_source()` reads it; `as_dataset()` (tf.data) is never called.

Builders take their records as constructor input (`splits={"train": records_or_jsonl, ...}`) because the data
are generated in-process (knowledge corpus, simulator) or staged by an earlier stage (RERS writes JSONL per
host). Nested/ragged fields (chat messages, id lists, provenance dicts) are stored as JSON strings so every
feature is a scalar and no padding is needed; `decode_*` helpers turn stored rows back into Python objects.

Datasets (name -> splits, produced by `raredx_jax.data.build` unless noted):
  raredx_knowledge          train, validation  {prompt, completion, disease_id, kind, template}
  raredx_simulated_cases    train, validation, test, rl (GRPO only; when data.rl_notes_per_disease > 0)
                            (every disease in every split, different notes)
  raredx_imported_cases     test  (phenopackets / JSONL notes)
  raredx_rers_trajectories  train (written by the RERS stage)  {prompt, completion, case_id, round, ...}
"""
from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.utils import tqdm_utils

from raredx_jax.data.case import Case

FILE_FORMAT = "array_record"
# A split's input: records in memory, one JSONL staging file, or several (e.g. one per host).
SplitInput = Sequence[Mapping[str, Any]] | str | os.PathLike | Sequence[str | os.PathLike]


class RecordError(ValueError):
    """A bad input record; the message names the dataset, split, source (file:line or index) and field."""


# --- base builder -----------------------------------------------------------------------------------------------
class _RecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes the given splits; subclasses declare FEATURES and `_encode(record) -> example`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First layout."}
    FEATURES: dict[str, Any] = {}

    # TFDS prints "Downloading and preparing dataset ..." and "... downloaded and prepared": nothing is ever
    # downloaded here (records come from memory or local files), and the callers log what they wrote.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass
    DESCRIPTION = ""

    def __init__(self, *, splits: Mapping[str, SplitInput] | None = None, **kwargs: Any):
        self._splits = dict(splits) if splits is not None else None
        kwargs.setdefault("file_format", FILE_FORMAT)
        super().__init__(**kwargs)

    # TFDS locates the builder's source file through `importlib_resources` (not installed, not needed): point it
    # at the file directly. Used only to look for an (absent) checksums file next to the module.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path | None:  # type: ignore[override]
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(dict(self.FEATURES)), description=self.DESCRIPTION)

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        if self._splits is None:
            raise ValueError(f"{self.name}: nothing to write; construct the builder with splits={{name: records}} "
                             "(reading needs no splits: use tfds_builders.data_source)")
        return {name: self._generate_examples(name, src) for name, src in self._splits.items()}

    def _generate_examples(self, split: str, src: SplitInput) -> Iterator[tuple[str, dict]]:
        seen: set[str] = set()
        for where, record in iter_records(src):
            ctx = f"{self.name} split {split!r}, {where}"
            if not isinstance(record, Mapping):
                raise RecordError(f"{ctx}: a record must be an object, got {type(record).__name__}")
            example = self._encode(record, ctx)
            key = self._key(record, where)
            if key in seen:
                raise RecordError(f"{ctx}: duplicate record key {key!r} in this split")
            seen.add(key)
            yield key, example

    def _key(self, record: Mapping[str, Any], where: str) -> str:
        return where

    def _encode(self, record: Mapping[str, Any], ctx: str) -> dict[str, Any]:
        raise NotImplementedError


def iter_records(src: SplitInput) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(where, record) pairs from records in memory (`record 7`) or JSONL files (`file.jsonl:12`)."""
    if isinstance(src, (str, os.PathLike)):
        yield from _iter_jsonl(Path(src))
        return
    items = list(src) if not isinstance(src, Sequence) else src
    if items and all(isinstance(x, (str, os.PathLike)) for x in items):
        for path in items:
            yield from _iter_jsonl(Path(path))
        return
    for i, record in enumerate(items):
        yield f"record {i}", record


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if not path.is_file():
        raise FileNotFoundError(f"JSONL staging file {path} does not exist")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}:{n}: invalid JSON ({e.msg})") from e
            yield f"{path}:{n}", record


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Stages records as JSONL (atomically: temp file + rename); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


# --- field helpers ------------------------------------------------------------------------------------------------
def _get(record: Mapping[str, Any], field: str, ctx: str, types: type | tuple[type, ...], default: Any = ...) -> Any:
    if field not in record:
        if default is ...:
            raise RecordError(f"{ctx}: missing field {field!r}")
        return default
    value = record[field]
    if not isinstance(value, types) or (types is int and isinstance(value, bool)):
        want = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise RecordError(f"{ctx}: field {field!r} must be {want}, got {type(value).__name__}")
    return value


def _prompt_json(record: Mapping[str, Any], ctx: str) -> str:
    """Prompt = "" (raw text, e.g. knowledge passages) or chat messages, stored as JSON."""
    prompt = record.get("prompt", "")
    if isinstance(prompt, str):
        if prompt:
            raise RecordError(f"{ctx}: field 'prompt' must be chat messages (list of {{role, content}}) or \"\", "
                              "got a non-empty string")
        return ""
    if not isinstance(prompt, Sequence) or not all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        raise RecordError(f"{ctx}: field 'prompt' must be a list of {{'role': str, 'content': str}} messages")
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in prompt], ensure_ascii=False)


def _str_list_json(record: Mapping[str, Any], field: str, ctx: str, default: Any = ...) -> str:
    value = _get(record, field, ctx, (list, tuple), default)
    if not all(isinstance(v, str) for v in value):
        raise RecordError(f"{ctx}: field {field!r} must be a list of strings")
    return json.dumps(list(value), ensure_ascii=False)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _json_field(value: Any) -> Any:
    s = _text(value)
    return json.loads(s) if s else ""


# --- knowledge ---------------------------------------------------------------------------------------------------
class RaredxKnowledge(_RecordsBuilder):
    """Knowledge corpus: passages (empty prompt) and Q&A items (chat prompt) about each selected disease."""

    DESCRIPTION = "Rare-disease knowledge passages and Q&A items generated from HPO annotations."
    FEATURES = {"prompt": tfds.features.Text(), "completion": tfds.features.Text(),
                "disease_id": tfds.features.Text(), "kind": tfds.features.Text(), "template": tfds.features.Text()}

    def _encode(self, record: Mapping[str, Any], ctx: str) -> dict[str, Any]:
        return {"prompt": _prompt_json(record, ctx),
                "completion": _get(record, "completion", ctx, str),
                "disease_id": _get(record, "disease_id", ctx, str, ""),
                "kind": _get(record, "kind", ctx, str, ""),
                "template": _get(record, "template", ctx, str, "")}


# --- cases -------------------------------------------------------------------------------------------------------
_CASE_FEATURES = {
    "id": tfds.features.Text(), "text": tfds.features.Text(), "diagnosis": tfds.features.Text(),
    "diagnosis_name": tfds.features.Text(), "present_hpo": tfds.features.Text(),
    "absent_hpo": tfds.features.Text(), "sex": tfds.features.Text(), "age": tfds.features.Text(),
    "level": tfds.features.Text(), "source": tfds.features.Text(), "meta": tfds.features.Text(),
}


class _CaseBuilder(_RecordsBuilder, skip_registration=True):
    """Rows are `Case.to_json()` dicts (Case objects are accepted too); keyed by the unique case id."""

    FEATURES = _CASE_FEATURES

    def _generate_examples(self, split: str, src: SplitInput) -> Iterator[tuple[str, dict]]:
        if not isinstance(src, (str, os.PathLike)) and isinstance(src, Sequence) and src and hasattr(src[0], "to_json"):
            src = [c.to_json() for c in src]
        yield from super()._generate_examples(split, src)

    def _key(self, record: Mapping[str, Any], where: str) -> str:
        return str(record["id"])

    def _encode(self, record: Mapping[str, Any], ctx: str) -> dict[str, Any]:
        rid = _get(record, "id", ctx, str)
        ctx = f"{ctx} (case {rid!r})"
        diagnosis = _str_list_json(record, "diagnosis", ctx)
        if diagnosis == "[]":
            raise RecordError(f"{ctx}: field 'diagnosis' is empty")
        meta = _get(record, "meta", ctx, dict, {})
        return {"id": rid, "text": _get(record, "text", ctx, str), "diagnosis": diagnosis,
                "diagnosis_name": _get(record, "diagnosis_name", ctx, str),
                "present_hpo": _str_list_json(record, "present_hpo", ctx, []),
                "absent_hpo": _str_list_json(record, "absent_hpo", ctx, []),
                "sex": _get(record, "sex", ctx, str, "unknown"), "age": _get(record, "age", ctx, str, ""),
                "level": _get(record, "level", ctx, str, "typical"),
                "source": _get(record, "source", ctx, str, "simulated"),
                "meta": json.dumps(meta, ensure_ascii=False, sort_keys=True)}


class RaredxSimulatedCases(_CaseBuilder):
    """Simulated notes; train/validation/test drawn with different seeds per split for every disease."""

    DESCRIPTION = "Simulated clinical notes (HPO-sampled findings rendered as free text) with gold diagnoses."


class RaredxImportedCases(_CaseBuilder):
    """Real published cases (GA4GH phenopackets, JSONL notes) for evaluation."""

    DESCRIPTION = "Imported real cases (phenopackets / JSONL notes), rendered without genes, variants or cohorts."


# --- RERS trajectories -------------------------------------------------------------------------------------------
class RaredxRersTrajectories(_RecordsBuilder):
    """Verified reasoning trajectories from RERS, re-attached to the original prompt, with provenance."""

    DESCRIPTION = "RERS trajectories: original diagnosis prompt + verified completion, with provenance."
    FEATURES = {"prompt": tfds.features.Text(), "completion": tfds.features.Text(),
                "case_id": tfds.features.Text(), "round": np.int64, "try_index": np.int64,
                "rank": np.int64, "checkpoint": tfds.features.Text(), "kind": tfds.features.Text()}

    def _key(self, record: Mapping[str, Any], where: str) -> str:
        return f"{record['case_id']}|{record['round']}|{record['try_index']}|{where}"

    def _encode(self, record: Mapping[str, Any], ctx: str) -> dict[str, Any]:
        prompt = _prompt_json(record, ctx)
        if not prompt:
            raise RecordError(f"{ctx}: field 'prompt' must be the original diagnosis chat prompt, got \"\"")
        rank = _get(record, "rank", ctx, (int, type(None)), None)
        return {"prompt": prompt, "completion": _get(record, "completion", ctx, str),
                "case_id": _get(record, "case_id", ctx, str), "round": _get(record, "round", ctx, int),
                "try_index": _get(record, "try_index", ctx, int),
                "rank": -1 if rank is None else rank,  # -1: not ranked (stored as int64)
                "checkpoint": _get(record, "checkpoint", ctx, str, ""), "kind": _get(record, "kind", ctx, str, "")}


BUILDERS: dict[str, type[_RecordsBuilder]] = {
    b.name: b for b in (RaredxKnowledge, RaredxSimulatedCases, RaredxImportedCases, RaredxRersTrajectories)}


# --- writing and reading -------------------------------------------------------------------------------------------
def prepare(builder: str | type[_RecordsBuilder], data_dir: str | os.PathLike, splits: Mapping[str, SplitInput],
            *, overwrite: bool = False) -> tfds.core.DatasetBuilder:
    """Writes `splits` as an array_record dataset under `data_dir` (kept as is when present unless overwrite).

    Empty splits are refused (TFDS cannot describe them and a reader would silently get nothing).
    """
    cls = BUILDERS[builder] if isinstance(builder, str) else builder
    for name, src in splits.items():
        if not isinstance(src, (str, os.PathLike)) and isinstance(src, Sequence) and len(src) == 0:
            raise ValueError(f"{cls.name}: split {name!r} has no records")
    b = cls(splits=splits, data_dir=os.fspath(data_dir))
    modes = tfds.download.GenerateMode
    mode = modes.FORCE_REDOWNLOAD if overwrite else modes.REUSE_DATASET_IF_EXISTS

    shown = tqdm_utils._active  # TFDS's own per-split progress bars: quiet here, restored after
    tfds.display_progress_bar(False)
    try:
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode,
                                                                            try_download_gcs=False))
    finally:
        tfds.display_progress_bar(shown)
    return b


def dataset_dir(builder: str | type[_RecordsBuilder], data_dir: str | os.PathLike) -> Path:
    """`<data_dir>/<name>`: everything TFDS wrote for this dataset (all versions)."""
    cls = BUILDERS[builder] if isinstance(builder, str) else builder
    return Path(data_dir) / cls.name


def data_source(name: str, split: str, data_dir: str | os.PathLike) -> Sequence[dict[str, Any]]:
    """Random-access rows of a built split (raw: text as bytes, JSON fields as strings); grain reads these."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; one of {sorted(BUILDERS)}")
    b = BUILDERS[name](data_dir=os.fspath(data_dir))
    if not b.is_prepared():
        raise FileNotFoundError(
            f"data.dir: dataset {name!r} is not built under {data_dir}; run "
            "`python -m raredx_jax.data.build --config=configs/data.py` (with the same --config.data.dir) first")
    available = list(b.info.splits.keys())
    if split not in available:
        raise ValueError(f"dataset {name!r} under {data_dir} has no split {split!r}; it has {available}")
    return tfds.data_source(name, split=split, data_dir=os.fspath(data_dir), download=False)


def decode_sft(row: Mapping[str, Any]) -> dict[str, Any]:
    """A stored knowledge/RERS row -> the SFT record the pipeline takes: {"prompt": messages | "", "completion"}."""
    out = {k: (_json_field(v) if k == "prompt" else (_text(v) if isinstance(v, bytes) else v)) for k, v in row.items()}
    for k in ("round", "try_index", "rank"):
        if k in out:
            out[k] = int(out[k])
    return out


def decode_case(row: Mapping[str, Any]) -> Any:
    """A stored case row -> `Case`."""

    d = {k: _text(v) for k, v in row.items()}
    for k in ("diagnosis", "present_hpo", "absent_hpo", "meta"):
        d[k] = json.loads(d[k]) if d[k] else ([] if k != "meta" else {})
    return Case.from_json(d)
