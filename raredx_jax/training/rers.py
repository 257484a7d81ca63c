"""RERS: Reflection-Enhanced Reasoning Sampling (stage 2 of RareDxR1): `python -m raredx_jax.train
--config=configs/rers.py`.

The model writes its own diagnostic reasoning; only verified trajectories are kept, and no human writes a
rationale. For each training case (the simulated `rers.split` of `data.dir`, sorted by case id):

1. **Direct round.** Sample `rers.num_samples` completions of `diagnosis_messages(note)`; verify each with
   `rewards.diagnosis.verify` against the gold ids (a `DiseaseLinker` over the run's disease subset,
   `data.diseases`). A sample is *correct* when its answer block is well formed and the gold is at rank 1.
   Among several correct samples `rers.keep_rule` picks one: `shortest` (fewest completion tokens, ties to the
   lower try index) or `first` (lowest try index).
2. **Reflection round**, only for cases with no correct sample. The prompt is
   `reflection_messages(note, failed_attempt, case.diagnosis_name)`: the note, ONE failed attempt and the gold
   LABEL only. The failed attempt shown is the first sample whose answer block is well formed (so the model
   sees a complete, wrong reasoning), else sample 0. `rers.reflection_tries` completions are sampled; a try is
   kept when it is correct (as above) AND passes `rewards.combined.leak_check` (no phrase of
   `rewards.leak_phrases`, at least `rewards.leak_min_findings` findings of the note mentioned). The kept
   completion is re-attached to the ORIGINAL prompt: the record's prompt is `diagnosis_messages(note)`, the
   reflection context is dropped.
3. **Output.** Records `{prompt, completion, case_id, round (0 direct | 1 reflection), kind ("direct" |
   "reflection"), try_index, rank, checkpoint}` written as the TFDS array_record dataset
   `raredx_rers_trajectories` under `rers.out_dir` (default `<run_dir>/trajectories`; the SFT stage reads it
   with `train.data_dir` = that directory, see configs/rers_sft.py), splits `train` and `validation` (a
   deterministic `rers.validation_fraction` of the kept trajectories by a hash of the case id; a split left
   empty is not written). A summary (cases solved directly / by reflection / unsolved, mean completion length
   in tokens, ...) is printed and saved as `<run_dir>/summary.json`.

Scale: cases are processed in chunks of `rers.chunk_size` (chunk k = sorted cases [k*C, (k+1)*C)). Each
finished chunk appends one JSON line per case (status + the kept record) and a commit line to this shard's
journal `<run_dir>/journal/shard-<i>-of-<n>.jsonl`, in one write followed by fsync (the format:
`training/rers_journal.py`). Lines of a chunk without
its commit line (a kill mid-write) are ignored and cut off on restart; a restart skips every chunk committed
in ANY journal of the run. Sampling seeds depend only on (`seed`, chunk index, round), so a resumed or
differently sharded run samples exactly what an uninterrupted single-process run samples. Shards: process i of
n takes chunks i, i+n, i+2n, ... (n = `jax.process_count()`, or `rers.shard_index` / `rers.shard_count` for
separately launched processes); each writes its own journal, and shard 0 (the primary) merges all journals
into the dataset once every chunk is committed (`rers.phase=merge` runs only that step). With several JAX
processes each samples on a mesh of its local devices.

Every case ends up in the journal with a status (direct | reflection | unsolved, with the reason), so nothing
is dropped silently; a prompt longer than the sampler's limit is reported as such, not fatal.

Layout: the `rers.*` fields and their defaults are `RersSettings` (training/rers_settings.py), the journal
format is training/rers_journal.py; here are the rounds (`rers_cases`), the samplers, the merge and the driver
(`run_rers`: plan this shard, sample its chunks, then summarize or merge).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import shutil
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
from ml_collections import config_dict
from tqdm import tqdm

from raredx_jax.data import tfds_builders
from raredx_jax.data.hpo import load_ontology, select_diseases
from raredx_jax.data.linking import DiseaseLinker
from raredx_jax.data.prompts import diagnosis_messages, reflection_messages
from raredx_jax.data.tokenizer import load_tokenizer
from raredx_jax.parallel.mesh import make_mesh
from raredx_jax.rewards.combined import leak_check, rewards_config
from raredx_jax.rewards.diagnosis import verify
from raredx_jax.sampling.sampler import Sampler, SamplingParams
from raredx_jax.sampling.text import generate_text
from raredx_jax.training.common import (
    STAGE_COMMANDS,
    MissingInputError,
    check_vocab,
    initial_model_config,
    load_initial_model,
    resolve_init_checkpoint,
    sync,
    write_json,
)
from raredx_jax.training.rers_journal import (
    JOURNAL_DIR,
    Journal,
    check_manifest,
    journal_path,
    read_journal,
    read_journals,
)
from raredx_jax.training.rers_settings import KEEP_RULES, RersSettings, rers_settings

log = logging.getLogger(__name__)

ROUNDS = {"direct": 0, "reflection": 1}
STATUSES = ("direct", "reflection", "unsolved")
DATASET = "raredx_rers_trajectories"
PROMPT_TOO_LONG = "prompt_too_long"

# sample_fn(messages_list, n, seed) -> per prompt, n samples: str, or objects with `.text` (and optionally
# `.token_ids` / `.finish_reason`, e.g. sampling.text.Completion).
SampleFn = Callable[[Sequence[list[dict]], int, int], list[list[Any]]]


# --- settings -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class JudgeSettings:
    """How a sample is judged: the verifier's linked entries and the reflection round's leak check. Read from
    `config.rewards` (its defaults live in `rewards.combined.rewards_config`, so none are repeated here)."""

    verify_top_k: int  # entries linked when verifying (rewards.top_k)
    leak_phrases: tuple[str, ...] | None  # None = rewards.combined.DEFAULT_LEAK_PHRASES
    leak_min_findings: int
    leak_min_overlap: float

    @classmethod
    def from_config(cls, config: Any) -> JudgeSettings:
        """From `config.rewards` (the `rewards_config()` defaults when the config has no such section)."""
        rw = config.get("rewards", None) or rewards_config()
        phrases = rw.leak_phrases
        if isinstance(phrases, str):  # a command-line override: comma-separated
            phrases = tuple(p.strip() for p in phrases.split(",") if p.strip())
        return cls(verify_top_k=int(rw.top_k), leak_phrases=None if phrases is None else tuple(phrases),
                   leak_min_findings=int(rw.leak_min_findings), leak_min_overlap=float(rw.leak_min_overlap))


# --- round logic (pure Python on decoded text) ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sample:
    """One sampled completion as the rounds see it: text, length in tokens, why it ended."""

    text: str
    tokens: int
    finish_reason: str = ""


@dataclasses.dataclass
class CaseOutcome:
    """What RERS did with one case: its status, the kept record (None when unsolved) and round statistics."""

    case_id: str
    status: str  # direct | reflection | unsolved
    record: dict | None
    direct: dict
    reflection: dict
    tokens: int  # tokens generated for this case over both rounds
    reason: str = ""

    def to_json(self) -> dict:
        return {"case_id": self.case_id, "status": self.status, "record": self.record, "direct": self.direct,
                "reflection": self.reflection, "tokens": self.tokens, "reason": self.reason}


def _as_samples(raw: Sequence[Any], length_fn: Callable[[str], int]) -> list[Sample]:
    out = []
    for x in raw:
        if isinstance(x, Sample):
            out.append(x)
        elif isinstance(x, str):
            out.append(Sample(x, length_fn(x)))
        else:
            text = getattr(x, "text")
            ids = getattr(x, "token_ids", None)
            out.append(Sample(text, len(ids) if ids is not None else length_fn(text),
                              str(getattr(x, "finish_reason", "") or "")))
    return out


def _call(fn: SampleFn, messages: Sequence[list[dict]], n: int, seed: int, length_fn: Callable[[str], int]
          ) -> list[list[Sample]]:
    if not messages:
        return []
    out = fn(list(messages), n, seed)
    if len(out) != len(messages) or any(len(s) != n for s in out):
        raise ValueError(f"sample_fn returned {[len(s) for s in out]} samples for {len(messages)} prompts x n={n}")
    return [_as_samples(s, length_fn) for s in out]


def select_sample(candidates: Sequence[tuple[int, Sample]], rule: str) -> tuple[int, Sample]:
    """The kept one of several (try_index, sample) correct candidates: `shortest` (fewest tokens, then lowest try
    index) or `first` (lowest try index)."""
    if not candidates:
        raise ValueError("select_sample: no candidates")
    if rule == "shortest":
        return min(candidates, key=lambda c: (c[1].tokens, c[0]))
    if rule == "first":
        return min(candidates, key=lambda c: c[0])
    raise ValueError(f"rers.keep_rule must be one of {KEEP_RULES}, got {rule!r}")


def failed_attempt_index(verifications: Sequence[Any]) -> int:
    """Which failed direct sample the reflection prompt shows: the first with a well-formed answer, else 0."""
    for j, v in enumerate(verifications):
        if v.format_ok:
            return j
    return 0


def make_record(case: Any, completion: str, round_name: str, try_index: int, rank: int, checkpoint: str,
                tokens: int, answer_top_k: int) -> dict:
    """A trajectory record: the ORIGINAL diagnosis prompt + the kept completion + provenance."""
    return {"prompt": diagnosis_messages(case.text, top_k=answer_top_k), "completion": completion,
            "case_id": case.id, "round": ROUNDS[round_name], "kind": round_name, "try_index": int(try_index),
            "rank": int(rank), "checkpoint": checkpoint, "completion_tokens": int(tokens)}


def rers_cases(cases: Sequence[Any], sample_fn: SampleFn, linker: Any, settings: RersSettings, seed: int = 0, *,
               judge: JudgeSettings, checkpoint: str, reflect_fn: SampleFn | None = None,
               length_fn: Callable[[str], int] | None = None) -> list[CaseOutcome]:
    """Both RERS rounds for a batch of cases; one CaseOutcome per case, in order.

    sample_fn samples the direct round (`seed`), reflect_fn (default: sample_fn) the reflection round
    (`seed + 1`). In production both wrap `sampling.text.generate_text` on the policy; any function with the same
    contract works (tests pass fixed texts). length_fn measures a text given as a plain string in tokens
    (default: whitespace words). `judge` says how a sample is verified and leak-checked; `checkpoint` is the
    provenance written into every record.
    """
    reflect_fn = reflect_fn or sample_fn
    length_fn = length_fn or (lambda t: len(t.split()))
    s = settings
    direct_msgs = [diagnosis_messages(c.text, top_k=s.answer_top_k) for c in cases]
    direct = _call(sample_fn, direct_msgs, s.num_samples, seed, length_fn)

    outcomes: list[CaseOutcome] = []
    need_reflection: list[tuple[int, int]] = []  # (case position, failed sample index)
    for i, (case, samples) in enumerate(zip(cases, direct)):
        vers = [verify(x.text, case.diagnosis, linker, top_k=judge.verify_top_k) for x in samples]
        good = [(j, x) for j, (x, v) in enumerate(zip(samples, vers)) if v.format_ok and v.rank == 1]
        stats = {"tries": len(samples), "correct": len(good), "format_ok": sum(v.format_ok for v in vers),
                 "ranks": [v.rank for v in vers],
                 "too_long": sum(x.finish_reason == PROMPT_TOO_LONG for x in samples)}
        tokens = sum(x.tokens for x in samples)
        if good:
            j, x = select_sample(good, s.keep_rule)
            rec = make_record(case, x.text, "direct", j, 1, checkpoint, x.tokens, s.answer_top_k)
            outcomes.append(CaseOutcome(case.id, "direct", rec, stats, {}, tokens, f"direct try {j} kept"))
        else:
            outcomes.append(CaseOutcome(case.id, "unsolved", None, stats, {}, tokens))
            need_reflection.append((i, failed_attempt_index(vers)))

    if s.reflection_tries > 0 and need_reflection:
        msgs = [reflection_messages(cases[i].text, direct[i][j].text, cases[i].diagnosis_name)
                for i, j in need_reflection]
        refl = _call(reflect_fn, msgs, s.reflection_tries, seed + 1, length_fn)
        for (i, j_failed), samples in zip(need_reflection, refl):
            case, out = cases[i], outcomes[i]
            good, rejected, reasons = [], 0, []
            for j, x in enumerate(samples):
                v = verify(x.text, case.diagnosis, linker, top_k=judge.verify_top_k)
                if not (v.format_ok and v.rank == 1):
                    reasons.append("too long" if x.finish_reason == PROMPT_TOO_LONG else
                                   f"rank {v.rank}" if v.format_ok else "bad format")
                    continue
                ok, why = leak_check(x.text, case.text, case.diagnosis_name, phrases=judge.leak_phrases,
                                     min_findings=judge.leak_min_findings, min_overlap=judge.leak_min_overlap)
                if ok:
                    good.append((j, x))
                else:
                    rejected += 1
                    reasons.append(f"rejected: {why}")
            out.tokens += sum(x.tokens for x in samples)
            out.reflection = {"tries": len(samples), "correct": len(good) + rejected, "leak_rejected": rejected,
                              "shown_attempt": j_failed,
                              "too_long": sum(x.finish_reason == PROMPT_TOO_LONG for x in samples)}
            if good:
                j, x = select_sample(good, s.keep_rule)
                out.status = "reflection"
                out.record = make_record(case, x.text, "reflection", j, 1, checkpoint, x.tokens, s.answer_top_k)
                out.reason = f"reflection try {j} kept (direct 0/{out.direct['tries']} correct)"
            else:
                out.reason = (f"direct 0/{out.direct['tries']} correct; reflection 0/{len(samples)} kept ("
                              + "; ".join(_counts(reasons)) + ")")
    for out in outcomes:
        if out.status == "unsolved" and not out.reason:
            out.reason = f"direct 0/{out.direct['tries']} correct; no reflection round"
    return outcomes


def _counts(reasons: Iterable[str]) -> list[str]:
    c: dict[str, int] = {}
    for r in reasons:
        c[r] = c.get(r, 0) + 1
    return [f"{n}x {r}" for r, n in c.items()]


# --- shards, cases, fingerprint -------------------------------------------------------------------------------------
def shard_info(settings: RersSettings) -> tuple[int, int, bool]:
    """(shard index, shard count, from jax processes?): `rers.shard_count` > 0 overrides the JAX processes."""
    if settings.shard_count > 0:
        return settings.shard_index, settings.shard_count, False
    return jax.process_index(), jax.process_count(), jax.process_count() > 1


def chunk_cases(cases: Sequence[Any], chunk_size: int) -> list[list[Any]]:
    """Chunk k = cases [k*chunk_size, (k+1)*chunk_size): the unit of journal commits and of sharding."""
    if chunk_size < 1:
        raise ValueError(f"rers.chunk_size must be >= 1, got {chunk_size}")
    return [list(cases[i:i + chunk_size]) for i in range(0, len(cases), chunk_size)]


def chunk_seed(seed: int, chunk: int) -> int:
    """Direct-round seed of a chunk (the reflection round uses +1): depends only on the run seed and the chunk."""
    return (int(seed) * 1_000_003 + int(chunk) * 2) % (2 ** 31 - 1)


def is_validation(case_id: str, fraction: float) -> bool:
    """Deterministic split by a hash of the case id."""
    h = int(hashlib.sha1(case_id.encode("utf-8")).hexdigest()[:8], 16)
    return h < fraction * 0x100000000


def load_cases(config: Any) -> list[Any]:
    """The RERS cases: `raredx_simulated_cases[rers.split]` of data.dir, sorted by id, first `rers.max_cases`."""
    settings = rers_settings(config)
    name, split = "raredx_simulated_cases", settings.split
    data_dir = config.data.dir
    if not (os.path.isdir(data_dir) and tfds_builders.BUILDERS[name](data_dir=os.fspath(data_dir)).is_prepared()):
        raise MissingInputError(f"rers: no simulated cases under data.dir={data_dir!r}; build them with "
                                f"`{STAGE_COMMANDS['data']}` (knowledge SFT builds them too), same data.dir")
    cases = sorted((tfds_builders.decode_case(r) for r in tfds_builders.data_source(name, split, data_dir)),
                   key=lambda c: c.id)
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        raise ValueError(f"rers: {name}[{split}] has duplicate case ids")
    limit = settings.max_cases
    return cases[:limit] if limit > 0 else cases


def provenance(config: Any) -> str:
    """The checkpoint string a run records, without loading the model (for resumes / merges)."""
    spec = rers_settings(config).sampler
    if spec:
        return f"sampler:{spec}"
    if config.model.init_from:
        return resolve_init_checkpoint(config.model.init_from)
    if config.model.hf_path:
        return os.path.abspath(config.model.hf_path)
    vocab = int(config.model.get("vocab_size", 0) or 0)  # part of the model's identity when set (resume check)
    return f"fresh:{config.model.preset}:seed{config.seed}" + (f":vocab{vocab}" if vocab else "")


def fingerprint(config: Any, cases: Sequence[Any], checkpoint: str) -> dict:
    """What a run's journals depend on (written to the journal manifest; a resume must match it)."""
    r = rers_settings(config)
    digest = hashlib.sha1("\n".join(c.id for c in cases).encode()).hexdigest()[:16]
    s = config.sampling
    return {"cases": len(cases), "case_ids": digest, "split": r.split,
            "chunk_size": r.chunk_size, "num_samples": r.num_samples,
            "reflection_tries": r.reflection_tries, "keep_rule": r.keep_rule, "seed": int(config.seed),
            "checkpoint": checkpoint, "temperature": float(s.temperature), "max_new_tokens": int(s.max_new_tokens)}


# --- samplers -------------------------------------------------------------------------------------------------------
def policy_sample_fn(model: Any, tokenizer: Any, params: Any, mesh: Any, *, max_prompt_len: int | None = None,
                     progress: bool = False) -> SampleFn:
    """sample_fn on the policy: `generate_text` with `params` (`max_prompt_len` raised when given). Prompts longer
    than the limit are not sampled: they get empty samples marked `prompt_too_long` (reported, not fatal)."""
    if max_prompt_len:
        params = params.replace(max_prompt_len=int(max_prompt_len))
    sampler = Sampler(model, mesh)
    limit = params.max_prompt_len

    def fn(messages_list: Sequence[list[dict]], n: int, seed: int) -> list[list[Any]]:
        ok = [i for i, m in enumerate(messages_list) if len(tokenizer.encode_chat(m)) <= limit]
        out: list[list[Any]] = [[Sample("", 0, PROMPT_TOO_LONG)] * n for _ in messages_list]
        if ok:
            got = generate_text(model, tokenizer, [messages_list[i] for i in ok], n=n, params=params, seed=seed,
                                mesh=mesh, sampler=sampler, progress=progress)
            for i, comps in zip(ok, got):
                out[i] = comps
        return out

    return fn


def _local_mesh(config: Any) -> jax.sharding.Mesh:
    """The whole mesh in one process; with several processes each samples its shard on its local devices."""
    if jax.process_count() == 1:
        return make_mesh(config.mesh)
    local = jax.local_devices()
    tensor = int(config.mesh.tensor) if int(config.mesh.tensor) > 0 and len(local) % int(config.mesh.tensor) == 0 else 1
    return make_mesh(config_dict.ConfigDict({"data": 1, "fsdp": -1, "tensor": tensor}), local)


def _plugin(spec: str) -> Callable[[Any], Any]:
    module, _, fn = spec.partition(":")
    if not module or not fn:
        raise ValueError(f"rers.sampler={spec!r}: expected '' (the policy) or 'module:function'")
    f = getattr(importlib.import_module(module), fn, None)
    if not callable(f):
        raise ValueError(f"rers.sampler={spec!r}: {module} has no function {fn!r}")
    return f


def build_samplers(config: Any, tokenizer: Any) -> tuple[SampleFn, SampleFn, str]:
    """(direct sample_fn, reflection sample_fn, checkpoint provenance) for this run.

    `rers.sampler` "" = the policy: the checkpoint `model.init_from` (a run dir or step dir; `model.hf_path` or a
    fresh preset model otherwise) sampled with `config.sampling`; reflection prompts (note + attempt + label) may
    be up to `rers.reflection_max_prompt_len` tokens (0 = sampling.max_prompt_len + max_new_tokens + 256).
    "module:function" = a factory `f(config) -> sample_fn` (e.g. a client of an external teacher model); it is
    used for both rounds.
    """
    settings = rers_settings(config)
    spec = settings.sampler
    if spec:
        fn = _plugin(spec)(config)
        return fn, fn, f"sampler:{spec}"
    mesh = _local_mesh(config)
    model_cfg = initial_model_config(config, tokenizer.vocab_size)
    check_vocab(tokenizer, model_cfg, "model.init_from")
    model = load_initial_model(config, mesh, model_cfg)
    if config.model.init_from:
        checkpoint = resolve_init_checkpoint(config.model.init_from)
    elif config.model.hf_path:
        checkpoint = os.path.abspath(config.model.hf_path)
    else:
        checkpoint = provenance(config)
        log.warning("[rers] model.init_from is empty: sampling a randomly initialised model (set it to the "
                    "knowledge-SFT run, e.g. runs/knowledge_sft)")
    params = SamplingParams.from_config(config.sampling)
    refl_len = settings.reflection_max_prompt_len or (params.max_prompt_len + params.max_new_tokens + 256)
    return (policy_sample_fn(model, tokenizer, params, mesh),
            policy_sample_fn(model, tokenizer, params, mesh, max_prompt_len=refl_len), checkpoint)


# --- merge + summary ------------------------------------------------------------------------------------------------
def _mean(xs: Sequence[float]) -> float | None:
    return round(sum(xs) / len(xs), 2) if xs else None


def summarize(case_lines: Sequence[dict], commits: Sequence[dict]) -> dict:
    """Counts and lengths over journal case lines (one per case)."""
    kept = [c["record"] for c in case_lines if c.get("record")]
    by = {s: sum(c["status"] == s for c in case_lines) for s in STATUSES}
    d_tries = sum(c["direct"].get("tries", 0) for c in case_lines)
    d_ok = sum(c["direct"].get("correct", 0) for c in case_lines)
    r_tries = sum(c.get("reflection", {}).get("tries", 0) for c in case_lines)
    r_ok = sum(c.get("reflection", {}).get("correct", 0) for c in case_lines)
    seconds = sum(float(c.get("seconds", 0.0)) for c in commits)
    tokens = sum(int(c.get("tokens", 0)) for c in commits)
    n = len(case_lines)
    return {
        "cases": n, "solved_direct": by["direct"], "solved_reflection": by["reflection"], "unsolved": by["unsolved"],
        "kept": len(kept),
        "mean_completion_tokens": _mean([r["completion_tokens"] for r in kept]),
        "mean_completion_tokens_direct": _mean([r["completion_tokens"] for r in kept if r["kind"] == "direct"]),
        "mean_completion_tokens_reflection": _mean(
            [r["completion_tokens"] for r in kept if r["kind"] == "reflection"]),
        "direct_samples": d_tries, "direct_sample_accuracy": round(d_ok / d_tries, 4) if d_tries else None,
        "reflection_samples": r_tries, "reflection_correct_samples": r_ok,
        "reflection_leak_rejected": sum(c.get("reflection", {}).get("leak_rejected", 0) for c in case_lines),
        "prompt_too_long": sum(c["direct"].get("too_long", 0) > 0 for c in case_lines),
        "generated_tokens": tokens, "sampling_seconds": round(seconds, 1),
        "cases_per_s": round(n / seconds, 3) if seconds else None,
        "tokens_per_s": round(tokens / seconds, 1) if seconds else None,
    }


def merged_journal(journal_dir: str, n_chunks: int) -> tuple[list[dict], list[dict]]:
    """(case lines in chunk order, commit lines) of every shard journal; ValueError naming the missing chunks when
    some shard has not finished, or when a case id is in more than one chunk."""
    chunks = read_journals(journal_dir)
    missing = [k for k in range(n_chunks) if k not in chunks]
    if missing:
        raise ValueError(f"rers merge: {len(missing)} of {n_chunks} chunks are not in any journal under "
                         f"{journal_dir} (first missing: {missing[:8]}); run the remaining shards first")
    lines: list[dict] = []
    seen: set[str] = set()
    dups = 0
    for k in range(n_chunks):
        for c in chunks[k]["cases"]:
            if c["case_id"] in seen:
                dups += 1
                continue
            seen.add(c["case_id"])
            lines.append(c)
    if dups:
        raise ValueError(f"rers merge: {dups} case ids appear in more than one chunk of {journal_dir}")
    return lines, [chunks[k]["commit"] for k in range(n_chunks)]


def journal_digest(lines: Sequence[dict]) -> str:
    """A digest of what the merged journal keeps (case, status, completion): the dataset is rebuilt when it moves."""
    return hashlib.sha1(json.dumps(sorted((c["case_id"], c["status"], (c.get("record") or {}).get("completion", ""))
                                          for c in lines)).encode()).hexdigest()[:16]


def trajectory_splits(lines: Sequence[dict], validation_fraction: float) -> dict[str, list[dict]]:
    """The kept records by split (sorted by case id); a split left empty is absent. With too few records to hold
    any out, all of them train."""
    kept = sorted((c["record"] for c in lines if c.get("record")), key=lambda r: r["case_id"])
    val = [r for r in kept if is_validation(r["case_id"], validation_fraction)]
    train = [r for r in kept if not is_validation(r["case_id"], validation_fraction)]
    if not train:  # too few records to hold any out
        train, val = kept, []
    return {k: v for k, v in (("train", train), ("validation", val)) if v}


def merge(journal_dir: str, out_dir: str, n_chunks: int, run_dir: str, extra: Mapping[str, Any],
          validation_fraction: float) -> dict:
    """All shard journals -> the trajectory dataset under out_dir + `<run_dir>/summary.json`; returns the summary.

    The dataset is rewritten only when the journal digest moved since the last merge (or the dataset is gone).
    Raises ValueError naming the missing chunks when some shard has not finished.
    """
    lines, commits = merged_journal(journal_dir, n_chunks)
    summary = {"stage": "rers", "run_dir": run_dir, **dict(extra), **summarize(lines, commits)}
    digest = journal_digest(lines)
    summary["journal_digest"] = digest
    summary_path = os.path.join(run_dir, "summary.json")
    prev = None
    if os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            prev = json.load(f)
    built = os.path.isdir(out_dir) and tfds_builders.BUILDERS[DATASET](data_dir=out_dir).is_prepared()
    splits = trajectory_splits(lines, validation_fraction)
    summary.update(data_dir=out_dir, dataset=DATASET if splits else None,
                   splits={k: len(v) for k, v in splits.items()})
    if prev and prev.get("journal_digest") == digest and (built or not splits):
        print(f"[rers] dataset up to date: {out_dir}", flush=True)
    else:
        ds_dir = tfds_builders.dataset_dir(DATASET, out_dir)
        if ds_dir.exists():
            shutil.rmtree(ds_dir)
        if splits:
            tfds_builders.prepare(DATASET, out_dir, splits, overwrite=True)
        else:
            log.warning("[rers] no trajectory was kept: no dataset written (the SFT stage needs some)")
    write_json(summary_path, summary)
    print(f"[rers] {summary['cases']} cases: {summary['solved_direct']} solved directly, "
          f"{summary['solved_reflection']} by reflection, {summary['unsolved']} unsolved; {summary['kept']} "
          f"trajectories ({', '.join(f'{k} {v}' for k, v in summary['splits'].items()) or 'none'}), mean "
          f"{summary['mean_completion_tokens']} completion tokens -> {out_dir}", flush=True)
    return summary


# --- the stage ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Where this process's RERS run reads and writes, its cases in chunks, and which chunks it still samples."""

    run_dir: str
    journal_dir: str
    out_dir: str
    shard: int
    n_shards: int
    jax_shards: bool  # the shards are the JAX processes (they meet at a barrier before shard 0 merges)
    cases: list[Any]
    chunks: list[list[Any]]
    mine: list[int]  # this shard's chunks
    todo: list[int]  # those not committed in any journal yet (none in the merge phase)

    @property
    def journal(self) -> str:
        """This shard's journal file."""
        return journal_path(self.journal_dir, self.shard, self.n_shards)


def plan_shard(config: Any, settings: RersSettings) -> ShardPlan:
    """This process's share of the run: its chunks, less those any journal of the run has committed."""
    run_dir = os.path.abspath(config.run_dir)
    journal_dir = os.path.join(run_dir, JOURNAL_DIR)
    out_dir = os.path.abspath(settings.out_dir or os.path.join(run_dir, "trajectories"))
    shard, n_shards, jax_shards = shard_info(settings)
    cases = load_cases(config)
    if not cases:
        raise ValueError(f"rers: split {settings.split!r} of data.dir={config.data.dir!r} has no cases")
    chunks = chunk_cases(cases, settings.chunk_size)
    mine = [k for k in range(len(chunks)) if k % n_shards == shard]
    committed = set(read_journals(journal_dir)) if os.path.isdir(journal_dir) else set()
    todo = [k for k in mine if k not in committed] if settings.phase != "merge" else []
    return ShardPlan(run_dir, journal_dir, out_dir, shard, n_shards, jax_shards, cases, chunks, mine, todo)


def announce(plan: ShardPlan, settings: RersSettings, checkpoint: str) -> None:
    """The run's one-line plan (resumed chunks included)."""
    print(f"[rers] {len(plan.cases)} cases in {len(plan.chunks)} chunks of {settings.chunk_size}; shard "
          f"{plan.shard}/{plan.n_shards}: {len(plan.mine)} chunks, {len(plan.todo)} to do "
          f"({len(plan.mine) - len(plan.todo)} already journaled); checkpoint {checkpoint}; run_dir {plan.run_dir}",
          flush=True)


def sample_shard(config: Any, settings: RersSettings, plan: ShardPlan, tokenizer: Any, checkpoint: str) -> str:
    """Both rounds on every chunk of `plan.todo`, each journaled when done; returns the samplers' provenance.

    `checkpoint` (the provenance known without loading the model) is what the records carry."""
    linker = DiseaseLinker(select_diseases(load_ontology(), config.data.diseases))
    direct_fn, reflect_fn, sampled_from = build_samplers(config, tokenizer)
    judge = JudgeSettings.from_config(config)
    announce(plan, settings, sampled_from)
    journal = Journal(plan.journal)
    length_fn = lambda t: len(tokenizer.encode(t))  # noqa: E731
    kept = done_cases = done_tokens = 0
    t_s = time.time()
    with tqdm(total=sum(len(plan.chunks[k]) for k in plan.todo), desc=f"rers shard {plan.shard}/{plan.n_shards}",
              unit="case", dynamic_ncols=True) as bar:
        for k in plan.todo:
            tc = time.time()
            outs = rers_cases(plan.chunks[k], direct_fn, linker, settings, chunk_seed(config.seed, k), judge=judge,
                              checkpoint=checkpoint, reflect_fn=reflect_fn, length_fn=length_fn)
            journal.append_chunk(k, outs, time.time() - tc)
            kept += sum(o.record is not None for o in outs)
            done_cases += len(outs)
            done_tokens += sum(o.tokens for o in outs)
            dt = max(time.time() - t_s, 1e-9)
            bar.update(len(outs))
            bar.set_postfix(cases_s=f"{done_cases / dt:.2f}", tok_s=f"{done_tokens / dt:.0f}", kept=kept)
    return sampled_from


def finish(settings: RersSettings, plan: ShardPlan, checkpoint: str, t0: float) -> dict:
    """This shard's summary (a sampling-only or non-primary shard, or shard 0 while others are pending), or the
    merged dataset and run summary."""
    extra = {"checkpoint": checkpoint, "shards": plan.n_shards, "chunks": len(plan.chunks), "seconds": None}
    own, _ = read_journal(plan.journal)
    shard_lines = [c for k in sorted(own) for c in own[k]["cases"]]
    shard_commits = [own[k]["commit"] for k in sorted(own)]
    if settings.phase == "sample" or plan.shard != 0:
        s = {"stage": "rers", "run_dir": plan.run_dir, "shard": plan.shard, "shard_count": plan.n_shards, **extra,
             **summarize(shard_lines, shard_commits)}
        s["seconds"] = round(time.time() - t0, 1)
        if not plan.jax_shards:
            print(f"[rers] shard {plan.shard}/{plan.n_shards} done; when every shard is done, merge with the same "
                  "command and --config.rers.phase=merge", flush=True)
        return s
    all_done = set(read_journals(plan.journal_dir))
    left = sum(k not in all_done for k in range(len(plan.chunks)))
    if settings.phase == "all" and left and not plan.jax_shards:
        print(f"[rers] shard 0 done; {left} chunks of other shards are not journaled yet: run them, then merge with "
              "--config.rers.phase=merge", flush=True)
        return {"stage": "rers", "run_dir": plan.run_dir, "shard": 0, "shard_count": plan.n_shards,
                "pending_chunks": left, **summarize(shard_lines, shard_commits)}
    extra["seconds"] = round(time.time() - t0, 1)
    return merge(plan.journal_dir, plan.out_dir, len(plan.chunks), plan.run_dir, extra, settings.validation_fraction)


def run_rers(config: Any) -> dict:
    """The RERS stage (see the module docstring); returns the summary (this shard's, on a non-merging shard)."""
    t0 = time.time()
    settings = rers_settings(config)
    plan = plan_shard(config, settings)
    tokenizer = load_tokenizer(config)
    checkpoint = provenance(config)
    check_manifest(plan.journal_dir, fingerprint(config, plan.cases, checkpoint))
    if plan.todo:
        checkpoint = sample_shard(config, settings, plan, tokenizer, checkpoint)
    else:
        announce(plan, settings, checkpoint)
    if plan.jax_shards:
        sync("raredx_rers_shards_done")
    return finish(settings, plan, checkpoint, t0)


__all__ = [
    "RersSettings", "JudgeSettings", "rers_settings", "Sample", "CaseOutcome", "SampleFn", "rers_cases",
    "select_sample", "failed_attempt_index", "make_record", "merge", "summarize", "run_rers", "policy_sample_fn",
    "build_samplers", "chunk_seed", "is_validation", "load_cases", "provenance", "fingerprint", "ShardPlan",
    "plan_shard", "ROUNDS", "KEEP_RULES", "DATASET",
]
