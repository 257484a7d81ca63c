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
journal `<run_dir>/journal/shard-<i>-of-<n>.jsonl`, in one write followed by fsync. Lines of a chunk without
its commit line (a kill mid-write) are ignored and cut off on restart; a restart skips every chunk committed
in ANY journal of the run. Sampling seeds depend only on (`seed`, chunk index, round), so a resumed or
differently sharded run samples exactly what an uninterrupted single-process run samples. Shards: process i of
n takes chunks i, i+n, i+2n, ... (n = `jax.process_count()`, or `rers.shard_index` / `rers.shard_count` for
separately launched processes); each writes its own journal, and shard 0 (the primary) merges all journals
into the dataset once every chunk is committed (`rers.phase=merge` runs only that step). With several JAX
processes each samples on a mesh of its local devices.

Every case ends up in the journal with a status (direct | reflection | unsolved, with the reason), so nothing
is dropped silently; a prompt longer than the sampler's limit is reported as such, not fatal.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib
import json
import os
import shutil
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

ROUNDS = {"direct": 0, "reflection": 1}
KEEP_RULES = ("shortest", "first")
PHASES = ("all", "sample", "merge")
STATUSES = ("direct", "reflection", "unsolved")
DATASET = "raredx_rers_trajectories"
JOURNAL_DIR = "journal"
MANIFEST = "manifest.json"
PROMPT_TOO_LONG = "prompt_too_long"

# sample_fn(messages_list, n, seed) -> per prompt, n samples: str, or objects with `.text` (and optionally
# `.token_ids` / `.finish_reason`, e.g. sampling.text.Completion).
SampleFn = Callable[[Sequence[list[dict]], int, int], list[list[Any]]]


# --- settings -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RersSettings:
    """What the round logic needs (from `config.rers` and `config.rewards`)."""

    num_samples: int = 4
    reflection_tries: int = 4
    keep_rule: str = "shortest"
    answer_top_k: int = 5  # the differential size asked for in diagnosis_messages
    verify_top_k: int = 10  # entries linked when verifying (rewards.top_k)
    leak_phrases: tuple[str, ...] | None = None  # None = rewards.combined.DEFAULT_LEAK_PHRASES
    leak_min_findings: int = 2
    leak_min_overlap: float = 0.5
    checkpoint: str = ""  # provenance written into every record

    def __post_init__(self) -> None:
        if self.keep_rule not in KEEP_RULES:
            raise ValueError(f"rers.keep_rule must be one of {KEEP_RULES}, got {self.keep_rule!r}")
        if self.num_samples < 1:
            raise ValueError(f"rers.num_samples must be >= 1, got {self.num_samples}")
        if self.reflection_tries < 0:
            raise ValueError(f"rers.reflection_tries must be >= 0 (0 = no reflection round), got "
                             f"{self.reflection_tries}")
        if self.answer_top_k < 1:
            raise ValueError(f"rers.answer_top_k must be >= 1, got {self.answer_top_k}")

    @classmethod
    def from_config(cls, config: Any, checkpoint: str = "") -> "RersSettings":
        from raredx_jax.rewards.combined import rewards_config

        r = config.rers
        rw = config.get("rewards", None) or rewards_config()
        phrases = rw.get("leak_phrases", None)
        if isinstance(phrases, str):
            phrases = tuple(p.strip() for p in phrases.split(",") if p.strip())
        return cls(num_samples=int(r.num_samples), reflection_tries=int(r.reflection_tries),
                   keep_rule=str(r.keep_rule), answer_top_k=int(r.get("answer_top_k", 5)),
                   verify_top_k=int(rw.get("top_k", 10)),
                   leak_phrases=None if phrases is None else tuple(phrases),
                   leak_min_findings=int(rw.get("leak_min_findings", 2)),
                   leak_min_overlap=float(rw.get("leak_min_overlap", 0.5)), checkpoint=checkpoint)


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
                tokens: int, answer_top_k: int = 5) -> dict:
    """A trajectory record: the ORIGINAL diagnosis prompt + the kept completion + provenance."""
    from raredx_jax.data.prompts import diagnosis_messages

    return {"prompt": diagnosis_messages(case.text, top_k=answer_top_k), "completion": completion,
            "case_id": case.id, "round": ROUNDS[round_name], "kind": round_name, "try_index": int(try_index),
            "rank": int(rank), "checkpoint": checkpoint, "completion_tokens": int(tokens)}


def rers_cases(cases: Sequence[Any], sample_fn: SampleFn, linker: Any, settings: RersSettings, seed: int = 0, *,
               reflect_fn: SampleFn | None = None, length_fn: Callable[[str], int] | None = None
               ) -> list[CaseOutcome]:
    """Both RERS rounds for a batch of cases; one CaseOutcome per case, in order.

    sample_fn samples the direct round (`seed`), reflect_fn (default: sample_fn) the reflection round
    (`seed + 1`). In production both wrap `sampling.text.generate_text` on the policy; any function with the same
    contract works (tests pass fixed texts). length_fn measures a text given as a plain string in tokens
    (default: whitespace words).
    """
    from raredx_jax.data.prompts import diagnosis_messages, reflection_messages
    from raredx_jax.rewards.combined import leak_check
    from raredx_jax.rewards.diagnosis import verify

    reflect_fn = reflect_fn or sample_fn
    length_fn = length_fn or (lambda t: len(t.split()))
    s = settings
    direct_msgs = [diagnosis_messages(c.text, top_k=s.answer_top_k) for c in cases]
    direct = _call(sample_fn, direct_msgs, s.num_samples, seed, length_fn)

    outcomes: list[CaseOutcome] = []
    need_reflection: list[tuple[int, int]] = []  # (case position, failed sample index)
    for i, (case, samples) in enumerate(zip(cases, direct)):
        vers = [verify(x.text, case.diagnosis, linker, top_k=s.verify_top_k) for x in samples]
        good = [(j, x) for j, (x, v) in enumerate(zip(samples, vers)) if v.format_ok and v.rank == 1]
        stats = {"tries": len(samples), "correct": len(good), "format_ok": sum(v.format_ok for v in vers),
                 "ranks": [v.rank for v in vers],
                 "too_long": sum(x.finish_reason == PROMPT_TOO_LONG for x in samples)}
        tokens = sum(x.tokens for x in samples)
        if good:
            j, x = select_sample(good, s.keep_rule)
            rec = make_record(case, x.text, "direct", j, 1, s.checkpoint, x.tokens, s.answer_top_k)
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
                v = verify(x.text, case.diagnosis, linker, top_k=s.verify_top_k)
                if not (v.format_ok and v.rank == 1):
                    reasons.append("too long" if x.finish_reason == PROMPT_TOO_LONG else
                                   f"rank {v.rank}" if v.format_ok else "bad format")
                    continue
                ok, why = leak_check(x.text, case.text, case.diagnosis_name, phrases=s.leak_phrases,
                                     min_findings=s.leak_min_findings, min_overlap=s.leak_min_overlap)
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
                out.record = make_record(case, x.text, "reflection", j, 1, s.checkpoint, x.tokens, s.answer_top_k)
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


# --- journal ------------------------------------------------------------------------------------------------------
def journal_path(journal_dir: str, shard_index: int, shard_count: int) -> str:
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

    def append_chunk(self, chunk: int, outcomes: Sequence[CaseOutcome], seconds: float) -> None:
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


# --- shards, cases, manifest ----------------------------------------------------------------------------------------
def shard_info(config: Any) -> tuple[int, int, bool]:
    """(shard index, shard count, from jax processes?): `rers.shard_count` > 0 overrides the JAX processes."""
    import jax

    count = int(config.rers.get("shard_count", 0))
    if count > 0:
        index = int(config.rers.get("shard_index", -1))
        if not 0 <= index < count:
            raise ValueError(f"rers.shard_index must be in [0, rers.shard_count={count}), got {index}")
        return index, count, False
    return jax.process_index(), jax.process_count(), jax.process_count() > 1


def chunk_cases(cases: Sequence[Any], chunk_size: int) -> list[list[Any]]:
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
    from raredx_jax.data.tfds_builders import BUILDERS, data_source, decode_case
    from raredx_jax.training.sft import STAGE_COMMANDS, MissingInputError

    name, split = "raredx_simulated_cases", str(config.rers.get("split", "train"))
    data_dir = config.data.dir
    if not (os.path.isdir(data_dir) and BUILDERS[name](data_dir=os.fspath(data_dir)).is_prepared()):
        raise MissingInputError(f"rers: no simulated cases under data.dir={data_dir!r}; build them with "
                                f"`{STAGE_COMMANDS['data']}` (knowledge SFT builds them too), same data.dir")
    cases = sorted((decode_case(r) for r in data_source(name, split, data_dir)), key=lambda c: c.id)
    ids = [c.id for c in cases]
    if len(set(ids)) != len(ids):
        raise ValueError(f"rers: {name}[{split}] has duplicate case ids")
    limit = int(config.rers.get("max_cases", 0))
    return cases[:limit] if limit > 0 else cases


def _fingerprint(config: Any, cases: Sequence[Any], checkpoint: str) -> dict:
    r = config.rers
    digest = hashlib.sha1("\n".join(c.id for c in cases).encode()).hexdigest()[:16]
    s = config.sampling
    return {"cases": len(cases), "case_ids": digest, "split": str(r.get("split", "train")),
            "chunk_size": int(r.chunk_size), "num_samples": int(r.num_samples),
            "reflection_tries": int(r.reflection_tries), "keep_rule": str(r.keep_rule), "seed": int(config.seed),
            "checkpoint": checkpoint, "temperature": float(s.temperature), "max_new_tokens": int(s.max_new_tokens)}


def check_manifest(journal_dir: str, fp: dict) -> None:
    """Write the run's fingerprint beside the journals, or check a resumed run has the same one."""
    path = os.path.join(journal_dir, MANIFEST)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in fp.items() if old.get(k) != v]
        if diff:
            raise ValueError(f"rers: the journal in {journal_dir} was written with different settings ("
                             + "; ".join(diff) + "); resuming would mix them. Use a new run_dir, or delete "
                             f"{journal_dir} to start over")
        return
    os.makedirs(journal_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(fp, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


# --- samplers -------------------------------------------------------------------------------------------------------
def policy_sample_fn(model: Any, tokenizer: Any, params: Any, mesh: Any, *, max_prompt_len: int | None = None,
                     progress: bool = False) -> SampleFn:
    """sample_fn on the policy: `generate_text` with `params` (`max_prompt_len` raised when given). Prompts longer
    than the limit are not sampled: they get empty samples marked `prompt_too_long` (reported, not fatal)."""
    from raredx_jax.sampling.sampler import Sampler
    from raredx_jax.sampling.text import generate_text

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


def _local_mesh(config: Any) -> Any:
    """The whole mesh in one process; with several processes each samples its shard on its local devices."""
    import jax
    from ml_collections import config_dict

    from raredx_jax.parallel.mesh import make_mesh

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
    spec = str(config.rers.get("sampler", "") or "")
    if spec:
        fn = _plugin(spec)(config)
        return fn, fn, f"sampler:{spec}"
    from raredx_jax.sampling.sampler import SamplingParams
    from raredx_jax.training.sft import initial_model_config, load_initial_model, resolve_init_checkpoint

    mesh = _local_mesh(config)
    model_cfg = initial_model_config(config, tokenizer.vocab_size)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{model_cfg.vocab_size} (tokenizer.path / model.init_from mismatch)")
    model = load_initial_model(config, mesh, model_cfg)
    if config.model.init_from:
        checkpoint = resolve_init_checkpoint(config.model.init_from)
    elif config.model.hf_path:
        checkpoint = os.path.abspath(config.model.hf_path)
    else:
        checkpoint = _provenance(config)
        print("[rers] WARNING: model.init_from is empty: sampling a randomly initialised model (set it to the "
              "knowledge-SFT run, e.g. runs/knowledge_sft)", flush=True)
    params = SamplingParams.from_config(config.sampling)
    refl_len = int(config.rers.get("reflection_max_prompt_len", 0)) or (
        params.max_prompt_len + params.max_new_tokens + 256)
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


def merge(config: Any, journal_dir: str, out_dir: str, n_chunks: int, run_dir: str, extra: Mapping[str, Any]) -> dict:
    """All shard journals -> the trajectory dataset under out_dir + `<run_dir>/summary.json`; returns the summary.

    Raises ValueError naming the missing chunks when some shard has not finished.
    """
    from raredx_jax.data import tfds_builders

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
    commits = [chunks[k]["commit"] for k in range(n_chunks)]
    summary = {"stage": "rers", "run_dir": run_dir, **dict(extra), **summarize(lines, commits)}
    digest = hashlib.sha1(json.dumps(sorted((c["case_id"], c["status"], (c.get("record") or {}).get("completion", ""))
                                            for c in lines)).encode()).hexdigest()[:16]
    summary["journal_digest"] = digest
    summary_path = os.path.join(run_dir, "summary.json")
    prev = None
    if os.path.isfile(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            prev = json.load(f)
    builder = tfds_builders.BUILDERS[DATASET]
    built = os.path.isdir(out_dir) and builder(data_dir=out_dir).is_prepared()
    kept = sorted((c["record"] for c in lines if c.get("record")), key=lambda r: r["case_id"])
    frac = float(config.rers.get("validation_fraction", 0.05))
    val = [r for r in kept if is_validation(r["case_id"], frac)]
    train = [r for r in kept if not is_validation(r["case_id"], frac)]
    if not train:  # too few records to hold any out
        train, val = kept, []
    splits = {k: v for k, v in (("train", train), ("validation", val)) if v}
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
            print("[rers] WARNING: no trajectory was kept: no dataset written (the SFT stage needs some)", flush=True)
    os.makedirs(run_dir, exist_ok=True)
    with open(summary_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    os.replace(summary_path + ".tmp", summary_path)
    print(f"[rers] {summary['cases']} cases: {summary['solved_direct']} solved directly, "
          f"{summary['solved_reflection']} by reflection, {summary['unsolved']} unsolved; {summary['kept']} "
          f"trajectories ({', '.join(f'{k} {v}' for k, v in summary['splits'].items()) or 'none'}), mean "
          f"{summary['mean_completion_tokens']} completion tokens -> {out_dir}", flush=True)
    return summary


# --- the stage ------------------------------------------------------------------------------------------------------
def run_rers(config: Any) -> dict:
    """The RERS stage (see the module docstring); returns the summary (this shard's, on a non-merging shard)."""
    from raredx_jax.data.hpo import load_ontology, select_diseases
    from raredx_jax.data.linking import DiseaseLinker
    from raredx_jax.data.tokenizer import load_tokenizer

    t0 = time.time()
    r = config.rers
    phase = str(r.get("phase", "all"))
    if phase not in PHASES:
        raise ValueError(f"rers.phase must be one of {PHASES}, got {phase!r}")
    run_dir = os.path.abspath(config.run_dir)
    journal_dir = os.path.join(run_dir, JOURNAL_DIR)
    out_dir = os.path.abspath(r.get("out_dir", "") or os.path.join(run_dir, "trajectories"))
    shard, n_shards, jax_shards = shard_info(config)
    chunk_size = int(r.chunk_size)

    cases = load_cases(config)
    if not cases:
        raise ValueError(f"rers: split {r.get('split', 'train')!r} of data.dir={config.data.dir!r} has no cases")
    chunks = chunk_cases(cases, chunk_size)
    tokenizer = load_tokenizer(config)
    length_fn = lambda t: len(tokenizer.encode(t))  # noqa: E731
    mine = [k for k in range(len(chunks)) if k % n_shards == shard]
    committed = set(read_journals(journal_dir)) if os.path.isdir(journal_dir) else set()
    todo = [k for k in mine if k not in committed] if phase != "merge" else []

    checkpoint = _provenance(config)
    check_manifest(journal_dir, _fingerprint(config, cases, checkpoint))
    settings = RersSettings.from_config(config, checkpoint=checkpoint)
    if todo:
        ontology = load_ontology()
        linker = DiseaseLinker(select_diseases(ontology, config.data.diseases))
        direct_fn, reflect_fn, checkpoint = build_samplers(config, tokenizer)
    print(f"[rers] {len(cases)} cases in {len(chunks)} chunks of {chunk_size}; shard {shard}/{n_shards}: "
          f"{len(mine)} chunks, {len(todo)} to do ({len(mine) - len(todo)} already journaled); checkpoint "
          f"{checkpoint}; run_dir {run_dir}", flush=True)

    own_journal = journal_path(journal_dir, shard, n_shards)
    if todo:
        journal = Journal(own_journal)
        kept_now = 0
        bar = _progress(sum(len(chunks[k]) for k in todo), f"rers shard {shard}/{n_shards}")
        done_cases = done_tokens = 0
        t_s = time.time()
        try:
            for k in todo:
                tc = time.time()
                outs = rers_cases(chunks[k], direct_fn, linker, settings, chunk_seed(config.seed, k),
                                  reflect_fn=reflect_fn, length_fn=length_fn)
                journal.append_chunk(k, outs, time.time() - tc)
                kept_now += sum(o.record is not None for o in outs)
                done_cases += len(outs)
                done_tokens += sum(o.tokens for o in outs)
                dt = max(time.time() - t_s, 1e-9)
                if bar is not None:
                    bar.update(len(outs))
                    bar.set_postfix(cases_s=f"{done_cases / dt:.2f}", tok_s=f"{done_tokens / dt:.0f}",
                                    kept=kept_now)
                else:
                    print(f"[rers] chunk {k}: {len(outs)} cases, {done_cases / dt:.2f} cases/s, "
                          f"{done_tokens / dt:.0f} tokens/s", flush=True)
        finally:
            if bar is not None:
                bar.close()

    if jax_shards:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("raredx_rers_shards_done")
    extra = {"checkpoint": checkpoint, "shards": n_shards, "chunks": len(chunks), "seconds": None}
    own, _ = read_journal(own_journal)
    shard_lines = [c for k in sorted(own) for c in own[k]["cases"]]
    shard_commits = [own[k]["commit"] for k in sorted(own)]
    if phase == "sample" or shard != 0:
        s = {"stage": "rers", "run_dir": run_dir, "shard": shard, "shard_count": n_shards, **extra,
             **summarize(shard_lines, shard_commits)}
        s["seconds"] = round(time.time() - t0, 1)
        if not jax_shards:
            print(f"[rers] shard {shard}/{n_shards} done; when every shard is done, merge with the same command "
                  "and --config.rers.phase=merge", flush=True)
        return s
    all_done = set(read_journals(journal_dir))
    if phase == "all" and any(k not in all_done for k in range(len(chunks))) and not jax_shards:
        left = sum(k not in all_done for k in range(len(chunks)))
        print(f"[rers] shard 0 done; {left} chunks of other shards are not journaled yet: run them, then merge with "
              "--config.rers.phase=merge", flush=True)
        return {"stage": "rers", "run_dir": run_dir, "shard": 0, "shard_count": n_shards, "pending_chunks": left,
                **summarize(shard_lines, shard_commits)}
    extra["seconds"] = round(time.time() - t0, 1)
    return merge(config, journal_dir, out_dir, len(chunks), run_dir, extra)


def _provenance(config: Any) -> str:
    """The checkpoint string a run records, without loading the model (for resumes / merges)."""
    spec = str(config.rers.get("sampler", "") or "")
    if spec:
        return f"sampler:{spec}"
    if config.model.init_from:
        from raredx_jax.training.sft import resolve_init_checkpoint

        return resolve_init_checkpoint(config.model.init_from)
    if config.model.hf_path:
        return os.path.abspath(config.model.hf_path)
    vocab = int(config.model.get("vocab_size", 0) or 0)  # part of the model's identity when set (resume check)
    return f"fresh:{config.model.preset}:seed{config.seed}" + (f":vocab{vocab}" if vocab else "")


def _progress(total: int, desc: str) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="case", dynamic_ncols=True)


__all__ = [
    "RersSettings", "Sample", "CaseOutcome", "SampleFn", "rers_cases", "select_sample", "failed_attempt_index",
    "make_record", "Journal", "read_journal", "read_journals", "merge", "summarize", "run_rers", "policy_sample_fn",
    "build_samplers", "chunk_seed", "is_validation", "load_cases", "ROUNDS", "KEEP_RULES",
]
