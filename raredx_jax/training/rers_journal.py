"""The RERS journal: per-shard append-only JSONL files under `<run_dir>/journal/`, plus the run's manifest.

Why a module of its own: the journal is read by more than the RERS stage. The GRPO curriculum seeds its case
pass rates from it (`JOURNAL_DIR`, `read_journals`), and the fault tests read it; neither needs the RERS
algorithm, the sampler or the TFDS writer that `training/rers.py` pulls in. This module is the file format
only (standard library and `fileio`), so reading a journal is a light import.

Format: each finished chunk appends one JSON line per case (`{"chunk": k, "case_id", "status", ...}`) and then
a commit line (`{"commit": k, "n": cases, "seconds", "tokens", "time"}`), in one write followed by fsync. Case
lines without their commit line (a kill mid-write) and a torn last line are not committed: readers ignore them
and `Journal` cuts them off when it reopens the file. `manifest.json` beside the journals records the settings
the journals were written with, so a resume with other settings is refused instead of mixing them.
"""
from __future__ import annotations

import glob
import json
import os
import time
from typing import Any, Protocol, Sequence

from raredx_jax.fileio import atomic_file

JOURNAL_DIR = "journal"  # under the run dir
MANIFEST = "manifest.json"  # under JOURNAL_DIR


class JournalEntry(Protocol):
    """What `Journal.append_chunk` writes of one case (rers.CaseOutcome is one)."""

    tokens: int

    def to_json(self) -> dict: ...


def journal_path(journal_dir: str, shard_index: int, shard_count: int) -> str:
    """The journal file of shard `shard_index` of `shard_count`."""
    return os.path.join(journal_dir, f"shard-{shard_index:05d}-of-{shard_count:05d}.jsonl")


def read_journal(path: str) -> tuple[dict[int, dict], int]:
    """(committed chunks {chunk: {"cases": [case lines], "commit": commit line}}, byte length of the committed
    prefix). Case lines after the last commit line (a chunk cut by a kill) and a torn last line are ignored."""
    chunks: dict[int, dict] = {}
    pending: dict[int, list[dict]] = {}
    good_end = 0
    if not os.path.isfile(path):
        return chunks, 0
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    for raw in data.splitlines(keepends=True):
        pos += len(raw)
        if not raw.endswith(b"\n"):
            break  # torn tail
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            break
        if "commit" in line:
            k = int(line["commit"])
            cases = pending.pop(k, [])
            if len(cases) != int(line.get("n", len(cases))):
                break  # should not happen (one write per chunk); treat as uncommitted
            chunks[k] = {"cases": cases, "commit": line}
            good_end = pos
        elif "chunk" in line:
            pending.setdefault(int(line["chunk"]), []).append(line)
    return chunks, good_end


def read_journals(journal_dir: str) -> dict[int, dict]:
    """Committed chunks of every shard journal in `journal_dir` (a chunk committed twice is taken once)."""
    out: dict[int, dict] = {}
    for path in sorted(glob.glob(os.path.join(journal_dir, "shard-*.jsonl"))):
        chunks, _ = read_journal(path)
        for k, v in chunks.items():
            out.setdefault(k, {**v, "file": path})
    return out


class Journal:
    """This shard's append-only journal: one fsync'd write per finished chunk."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        chunks, good_end = read_journal(path)
        self.committed = set(chunks)
        if os.path.isfile(path) and os.path.getsize(path) != good_end:
            with open(path, "r+b") as f:  # drop an uncommitted / torn tail left by a kill
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())

    def append_chunk(self, chunk: int, outcomes: Sequence[JournalEntry], seconds: float) -> None:
        """Append chunk `chunk`'s case lines and its commit line in one write, then fsync."""
        lines = [json.dumps({"chunk": chunk, **o.to_json()}, ensure_ascii=False, sort_keys=True) for o in outcomes]
        commit = {"commit": chunk, "n": len(outcomes), "seconds": round(seconds, 3),
                  "tokens": sum(o.tokens for o in outcomes), "time": round(time.time(), 3)}
        lines.append(json.dumps(commit, sort_keys=True))
        blob = ("\n".join(lines) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        self.committed.add(chunk)


def check_manifest(journal_dir: str, fingerprint: dict[str, Any]) -> None:
    """Write the run's fingerprint beside the journals, or check a resumed run has the same one (ValueError
    naming every field that changed)."""
    path = os.path.join(journal_dir, MANIFEST)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in fingerprint.items() if old.get(k) != v]
        if diff:
            raise ValueError(f"rers: the journal in {journal_dir} was written with different settings ("
                             + "; ".join(diff) + "); resuming would mix them. Use a new run_dir, or delete "
                             f"{journal_dir} to start over")
        return
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(fingerprint, f, indent=2, sort_keys=True)


__all__ = ["JOURNAL_DIR", "MANIFEST", "JournalEntry", "journal_path", "read_journal", "read_journals", "Journal",
           "check_manifest"]
