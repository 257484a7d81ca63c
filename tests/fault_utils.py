"""Helpers of the fault suite (tests/test_faults.py): the pipeline at fault-suite scale, a child process whose
stdout lines are timestamped, the observable events of each stage (where a kill may land), and comparisons
of two finished run directories that ignore only wall-clock fields.

Nothing here prints note text: the pipeline never logs it, and the comparisons report case ids and field names,
never a prompt or a completion.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("data", "knowledge_sft", "rers", "rers_sft", "grpo", "export")
SAMPLER = "tests.fault_utils:policy_with_gold_answers"

# The smoke pipeline shrunk further (2-core CI): no evaluation between stages, no real-case archive, a 600-piece
# tokenizer (so a smaller model), one checkpoint per step so a kill can land between any two of them, RERS in
# chunks of 4 cases, export without the transformers check (its torch import would dominate the stage).
STAGE_OVERRIDES = {
    "pipeline": "data.diseases.n=4",
    "knowledge_sft": "train.steps=4,train.checkpoint_every=1,train.eval_every=0,probe.n=0,train.batch_size=4,"
                     "train.seq_len=256",
    "rers": f"rers.chunk_size=4,rers.num_samples=2,rers.reflection_tries=0,sampling.max_new_tokens=16,"
            f"rers.sampler='{SAMPLER}'",
    "rers_sft": "train.steps=4,train.checkpoint_every=1,train.eval_every=0,train.batch_size=4,train.seq_len=768",
    # groups kept when their total reward varies (the default keeps those whose pass varies: never, for this model)
    "grpo": "grpo.steps=3,grpo.checkpoint_every=1,grpo.eval_cases=-1,grpo.eval_at_start=False,"
            "sampling.max_new_tokens=16,sampling.max_prompt_len=768,grpo.filter_groups='total'",
    "export": "export.verify=False",
}
# wall-clock fields (and the resume step, which differs by construction) left out of every comparison
TIMING_KEYS = frozenset({"seconds", "compile_seconds", "resumed_from", "time", "sampling_seconds", "cases_per_s",
                         "tokens_per_s", "rollout_s", "update_s", "step_time_s", "sample_tokens_per_s",
                         "train_tokens_per_s", "mfu", "wall_time", "elapsed"})


def pipeline_cmd(run_dir: str, hf_model: str) -> list[str]:
    """The pipeline at fault-suite scale, starting from the HF model `hf_model` (see `write_mini_model`)."""
    cmd = [sys.executable, "-m", "raredx_jax.train", "--config=configs/pipeline.py", "--config.pipeline.scale=smoke",
           f"--config.run_dir={run_dir}", "--config.data.phenopackets=", "--config.tokenizer.vocab_size=600",
           "--config.data.eval_notes_per_disease=2", "--config.pipeline.eval_after=()",
           f"--config.model.hf_path={hf_model}",
           # the length reward counts for every completion (not only right ones): GRPO's only signal here
           "--config.rewards.combine=sum"]
    return cmd + [f"--config.pipeline.overrides.{k}={v}" for k, v in STAGE_OVERRIDES.items()]


def write_mini_model(out_dir: str, vocab_size: int = 600, eos_scale: float = 6.0) -> str:
    """A randomly initialised 2-layer, 64-wide Qwen2-shaped model saved as an HF directory (safetensors +
    config.json): the suite's starting model, ~30x cheaper per token than the `tiny` preset.

    Its (tied) embedding row of `<|im_end|>` -- the embedded tokenizer's EOS: id 3 + its place among the
    user-defined symbols, after <pad> <unk> <s> -- is a random direction of norm `eos_scale`, so the EOS logit is
    eos_scale x a unit-variance projection of the hidden state: some completions end after a few tokens, others
    run to the limit. Varying lengths give GRPO's length reward some variance within a group, hence non-zero
    advantages and a real policy update (a random model never earns any other reward)."""
    import jax
    from flax import nnx

    from raredx_jax.checkpoints import hf_io
    from raredx_jax.data.tokenizer import IM_END, SPECIAL_SYMBOLS
    from raredx_jax.models.config import PRESETS, ModelConfig
    from raredx_jax.parallel.mesh import single_device_mesh

    shape = {**PRESETS["tiny"], "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128,
             "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16}
    model = hf_io.init_model(ModelConfig(**shape), single_device_mesh(), seed=0)
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict()
    emb = np.array(params["embed_tokens"])
    direction = np.random.default_rng(0).standard_normal(emb.shape[1])
    emb[3 + SPECIAL_SYMBOLS.index(IM_END)] = eos_scale * direction / np.linalg.norm(direction)
    params["embed_tokens"] = jax.device_put(emb.astype(emb.dtype), params["embed_tokens"].sharding)
    state.replace_by_pure_dict(params)
    return hf_io.save_hf_model(nnx.merge(graphdef, state), out_dir)


def child_env(cache_dir: str, devices: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               # every process compiles the same programs: share them (the numbers do not depend on it)
               JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


# --- a child process with timestamped output --------------------------------------------------------------------
class Child:
    """`cmd` in its own process group; stdout+stderr lines with their arrival time (`lines`), copied to `log`."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: str):
        self.log_path = log_path
        self.lines: list[tuple[float, str]] = []
        self.marks: set[str] = set()  # the MARKS some line started with
        self.t0 = time.time()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.log_path, "ab") as log:
            for raw in self.proc.stdout:
                log.write(raw)
                log.flush()
                for part in raw.decode("utf-8", "replace").split("\r"):
                    if part.strip():
                        self.lines.append((time.time(), part.rstrip("\n")))
                        self.marks.update(m for m in MARKS if part.startswith(m))

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (only what this Child started)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = self.proc.wait(30)
        self._reader.join(10)
        return rc

    def tail(self, n: int = 3000) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-n:]


# --- the events of each stage -----------------------------------------------------------------------------------
# Each stage passes through a fixed sequence of observable events; `progress` counts those reached. A kill drawn
# between event i and event i + 1 lands inside the stage: after the first, before the second.
#   data:                  the build's log lines (the last one, "[data] done", ends it)
#   knowledge_sft/rers_sft/grpo: "start" (the pipeline's `=== stage ===` line), one per finished checkpoint step
#                          (a step dir renamed into place: checkpoints are saved every step), stage_done.json
#   rers:                  "start", one per committed journal chunk, stage_done.json
#   export:                "start", stage_done.json
DATA_LINES = ("[pipeline] run dir", "[data] selected", "[data] knowledge:", "[data] simulated notes:",
              "[data] tokenizer:", "[data] wrote raredx_knowledge", "[data] wrote raredx_simulated_cases",
              "[data] done")


MARKS = DATA_LINES + tuple(f"[pipeline] === {s} ===" for s in STAGES)


def _digit_dirs(path: str) -> list[int]:
    try:
        return sorted(int(x) for x in os.listdir(path) if x.isdigit())  # a save in flight is not a digit name
    except FileNotFoundError:
        return []


def _committed_chunks(journal_dir: str) -> int:
    from raredx_jax.training.rers_journal import read_journals

    return len(read_journals(journal_dir)) if os.path.isdir(journal_dir) else 0


DONE = 10 ** 6  # progress of a finished stage (stage_done.json written): past every other event


def progress(stage: str, run_dir: str, marks: set[str]) -> int:
    """How many events of `stage` have happened, seen in this process's output (`marks`: Child.marks) and in the
    run dir; DONE once the stage is finished (data: its last log line)."""
    if stage == "data":
        reached = [j for j, p in enumerate(DATA_LINES) if p in marks]
        return DONE if reached and max(reached) == len(DATA_LINES) - 1 else (max(reached) + 1 if reached else 0)
    d = os.path.join(run_dir, stage)
    if os.path.isfile(os.path.join(d, "stage_done.json")):
        return DONE
    if f"[pipeline] === {stage} ===" not in marks:
        return 0
    if stage == "rers":
        return 1 + _committed_chunks(os.path.join(d, "journal"))
    if stage == "export":
        return 1
    return 1 + max(_digit_dirs(os.path.join(d, "checkpoints")) or [0])


def watch(child: Child, run_dir: str, stages=STAGES, poll: float = 0.02) -> dict[str, list[float]]:
    """Until the child exits: per stage, the time each of its events was first seen, in order, "done" last."""
    first: dict[str, dict[int, float]] = {s: {} for s in stages}
    while True:
        alive = child.running()
        now = time.time()
        for s in stages:  # stages run one after the other: look no further than the first one not done
            p = progress(s, run_dir, child.marks)
            if p == DONE:
                first[s].setdefault(DONE, now)
            for k in range(1, p + 1 if p != DONE else 1):
                first[s].setdefault(k, now)
            if p != DONE:
                break
        if not alive:
            break
        time.sleep(poll)
    return {s: [first[s][k] for k in sorted(first[s])] for s in stages}


# --- comparisons --------------------------------------------------------------------------------------------------
def strip_timing(x: Any, run_dir: str = "") -> Any:
    """x without wall-clock fields; the run dir in strings replaced by '<run>'."""
    if isinstance(x, dict):
        return {k: strip_timing(v, run_dir) for k, v in x.items() if k not in TIMING_KEYS}
    if isinstance(x, list):
        return [strip_timing(v, run_dir) for v in x]
    if isinstance(x, str) and run_dir:
        return x.replace(os.path.abspath(run_dir), "<run>")
    return x


def read_json(path: str, run_dir: str = "") -> Any:
    with open(path, encoding="utf-8") as f:
        return strip_timing(json.load(f), run_dir)


def metrics(stage_dir: str) -> list[dict]:
    """Every record of metrics.jsonl (all kinds, file order) without wall-clock fields."""
    from raredx_jax.training.metrics import read_metrics

    return [strip_timing(r) for r in read_metrics(stage_dir, None)]


def checkpoint_arrays(step_dir: str) -> dict[str, np.ndarray]:
    """params, opt_state and train_state of one checkpoint step as host arrays keyed by item/path."""
    import jax
    import orbax.checkpoint as ocp

    out: dict[str, np.ndarray] = {}
    with ocp.StandardCheckpointer() as ckptr:
        for item in ("params", "opt_state", "train_state"):
            tree = ckptr.restore(os.path.join(step_dir, item))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                if leaf is None:
                    continue
                a = np.asarray(jax.random.key_data(leaf) if jax.dtypes.issubdtype(getattr(leaf, "dtype", None),
                                                                                   jax.dtypes.prng_key) else leaf)
                out[f"{item}{jax.tree_util.keystr(path)}"] = a
    return out


def file_digests(root: str, skip: Callable[[str], bool] = lambda rel: False) -> dict[str, str]:
    """relative path -> sha256 of every file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            if skip(rel):
                continue
            with open(p, "rb") as f:
                out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def journal_cases(stage_dir: str) -> dict[str, dict]:
    """RERS journal case lines by case id (every chunk committed, in any shard journal)."""
    from raredx_jax.training.rers_journal import read_journals

    chunks = read_journals(os.path.join(stage_dir, "journal"))
    return {c["case_id"]: c for k in sorted(chunks) for c in chunks[k]["cases"]}


def trajectories(stage_dir: str) -> dict[str, list[dict]]:
    from raredx_jax.data.tfds_builders import data_source, decode_sft
    from raredx_jax.training.rers import DATASET

    out = {}
    for split in ("train", "validation"):
        try:
            out[split] = [decode_sft(r) for r in data_source(DATASET, split, os.path.join(stage_dir, "trajectories"))]
        except ValueError:
            out[split] = []
    return out


def dataset_records(root: str, rel: str) -> list:
    """The decoded records of the TFDS split whose array_record file is `rel` (<name>/<version>/<name>-<split>...)."""
    from raredx_jax.data.tfds_builders import data_source

    name = rel.split(os.sep)[0]
    split = os.path.basename(rel)[len(name) + 1:].split(".array_record")[0]
    src = data_source(name, split, root)
    return [src[i] for i in range(len(src))]


def diff_keys(a: dict, b: dict) -> list[str]:
    """Keys whose values differ (never the values themselves: they may hold note text)."""
    return sorted(k for k in set(a) | set(b) if a.get(k, "<missing>") != b.get(k, "<missing>"))


# --- the RERS sampler of the fault suite ----------------------------------------------------------------------------
def _gets_gold(case_id: str) -> bool:
    return int(hashlib.sha1(case_id.encode()).hexdigest()[:8], 16) % 2 == 0


def policy_with_gold_answers(config: Any) -> Callable:
    """`rers.sampler` factory: the REAL policy (model.init_from, config.sampling) samples every completion; for
    half of the cases (by a hash of the case id) the answer block of direct sample 0 is replaced by the gold,
    keeping the policy's own text as the reasoning.

    A tiny model trained for a few steps never names the gold, so plain RERS would keep nothing and the pipeline
    would skip RERS-SFT. This keeps RERS's output a function of what the policy sampled (so an inexact resume
    of the sampling shows in the trajectories) while giving RERS-SFT and GRPO something to train on.
    """
    from raredx_jax.data.prompts import format_completion
    from raredx_jax.data.tokenizer import load_tokenizer
    from raredx_jax.training import rers
    from tests.test_rers import _note_of

    c = config.copy_and_resolve_references()
    c.rers.sampler = ""
    direct, _, _ = rers.build_samplers(c, load_tokenizer(c))
    by_note = {case.text.strip(): case for case in rers.load_cases(c)}

    def fn(messages_list, n, seed):
        out = direct(messages_list, n, seed)
        for m, samples in zip(messages_list, out):
            note, reflection = _note_of(m)
            case = by_note[note]
            if reflection or not _gets_gold(case.id) or not samples:
                continue
            x = samples[0]
            ids = getattr(x, "token_ids", None)
            text = re.sub(r"[<>]", " ", getattr(x, "text", "")).strip() or "-"
            samples[0] = rers.Sample(format_completion(text, [case.diagnosis_name]),
                                     len(ids) if ids is not None else len(text.split()),
                                     str(getattr(x, "finish_reason", "") or ""))
        return out

    return fn


# --- killing a stage at a drawn point -----------------------------------------------------------------------------
def kill_between(child: Child, run_dir: str, stage: str, event: int, delay: float, timeout: float = 600.0
                 ) -> tuple[int, int]:
    """SIGKILL `child` `delay` s after event `event` of `stage` (0-based), or at once when event `event` + 1 is
    seen first. Returns (exit status, progress of the stage right after the kill)."""
    deadline = time.time() + timeout
    while progress(stage, run_dir, child.marks) < event + 1:
        if not child.running() or time.time() > deadline:
            return child.wait(30), progress(stage, run_dir, child.marks)
        time.sleep(0.01)
    t = time.time()
    while time.time() < t + delay and progress(stage, run_dir, child.marks) < event + 2 and child.running():
        time.sleep(0.005)
    child.kill()
    rc = child.wait(60)
    return rc, progress(stage, run_dir, child.marks)


# --- a full disk in the middle of a checkpoint save -----------------------------------------------------------------
class DiskFull:
    """Context manager: the checkpoint writes of this process fail with OSError(ENOSPC) from the `fail_at`-th on
    (1-based; 0 = never fail, only count).

    The writes counted are those of an orbax save: every array written through tensorstore (orbax's
    `serialization.async_serialize_from_host`, one call per array: the failing one writes nothing while the
    arrays before it are written) and every file opened for writing through etils.epath (orbax's JSON items,
    metadata, commit markers; grain's iterator state: the failing one gets half of its bytes on disk first, as
    on a disk that fills up mid-write). Once full, the disk stays full until the context exits. `calls` counts
    the writes seen, so a first, counting pass tells how many a save makes.
    """

    def __init__(self, fail_at: int = 0):
        self.fail_at = int(fail_at)
        self.calls = 0
        self.failed: list[str] = []
        self._lock = threading.Lock()

    def _next(self, what: str) -> bool:
        with self._lock:
            self.calls += 1
            fail = bool(self.fail_at) and self.calls >= self.fail_at
            if fail:
                self.failed.append(what)
            return fail

    @staticmethod
    def _error(what: str) -> OSError:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), what)

    def __enter__(self) -> "DiskFull":
        import builtins

        from etils.epath import backend as epath_backend
        from orbax.checkpoint._src.serialization import serialization as ocp_serialization

        self._backend, self._ser = epath_backend, ocp_serialization
        self._orig_write = ocp_serialization.async_serialize_from_host
        self._had_open = "open" in vars(epath_backend)
        self._orig_open = vars(epath_backend).get("open", builtins.open)
        disk, orig_write, orig_open = self, self._orig_write, self._orig_open

        async def async_serialize_from_host(rslices, tensorstore_spec, *a, **kw):
            what = f"array {json.dumps(tensorstore_spec, default=str)[-160:]}"
            if disk._next(what):
                raise disk._error(what)
            return await orig_write(rslices, tensorstore_spec, *a, **kw)

        class HalfWritten:
            def __init__(self, f, what):
                self._f, self._what = f, what

            def write(self, data):
                self._f.write(data[:len(data) // 2])
                self._f.flush()
                raise disk._error(self._what)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._f.close()
                return False

            def __getattr__(self, name):
                return getattr(self._f, name)

        def open_(path, mode="r", *a, **kw):
            f = orig_open(path, mode, *a, **kw)
            if any(c in mode for c in "wax+") and disk._next(str(path)):
                return HalfWritten(f, str(path))
            return f

        ocp_serialization.async_serialize_from_host = async_serialize_from_host
        epath_backend.open = open_
        return self

    def __exit__(self, *exc) -> bool:
        self._ser.async_serialize_from_host = self._orig_write
        if self._had_open:
            self._backend.open = self._orig_open
        else:
            del self._backend.open
        return False


def wait_quiet(root: str, quiet_s: float = 0.6, timeout: float = 30.0) -> None:
    """Wait until nothing under `root` has changed for `quiet_s`.

    A save that failed in process leaves tensorstore writes of its other arrays in flight for a moment (orbax
    returns the first error without waiting for them); a rerun is a new process, where none are. Waiting for
    them makes the in-process rerun that the full-disk test simulates a faithful one."""
    def snapshot():
        out = []
        for dirpath, dirs, files in os.walk(root):
            for n in dirs + files:
                try:
                    st = os.stat(os.path.join(dirpath, n))
                    out.append((os.path.join(dirpath, n), st.st_size, st.st_mtime_ns))
                except FileNotFoundError:
                    out.append((os.path.join(dirpath, n), -1, -1))
        return sorted(out)

    deadline = time.time() + timeout
    last, since = snapshot(), time.time()
    while time.time() < deadline:
        time.sleep(0.1)
        now = snapshot()
        if now != last:
            last, since = now, time.time()
        elif time.time() - since >= quiet_s:
            return
