"""RERS (raredx_jax/training/rers.py): keep/reject logic, journal resume, kill-and-resume, shards + merge, and an
end-to-end run on a real (randomly initialised) tiny model.

Two kinds of samplers are used:

* the REAL tiny model (`test_real_tiny_model_end_to_end`): checkpoint -> `generate_text` -> verifier -> journal.
  A random model never reaches the diagnosis, so that test checks the mechanics (every case journaled with a
  status, both rounds run, resume is a no-op), not that anything is kept.
* `FixedTexts`: a sample_fn that returns FIXED, hand-written completion texts chosen from the case (correct,
  wrong, gold at rank 2, truncated, leaking the label, ...). It is a test INPUT that makes keep/reject and the
  resume/shard comparisons deterministic and non-empty; it is not a stand-in for the model's behaviour. The
  subprocess tests plug it in through the stage's documented extension point
  `--config.rers.sampler=tests.test_rers:fixed_sampler` (production: "" = the policy).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import rers as rers_config  # noqa: E402
from configs import rers_sft as rers_sft_config  # noqa: E402
from raredx_jax.checkpoints import hf_io  # noqa: E402
from raredx_jax.checkpoints.orbax import save_model  # noqa: E402
from raredx_jax.data.build import build_all  # noqa: E402
from raredx_jax.data.hpo import load_ontology, select_diseases  # noqa: E402
from raredx_jax.data.linking import DiseaseLinker  # noqa: E402
from raredx_jax.data.prompts import diagnosis_messages, format_completion, reflection_messages  # noqa: E402
from raredx_jax.data.tfds_builders import data_source, decode_sft  # noqa: E402
from raredx_jax.data.tokenizer import load_tokenizer  # noqa: E402
from raredx_jax.models.config import model_config_from  # noqa: E402
from raredx_jax.parallel.mesh import make_mesh  # noqa: E402
from raredx_jax.rewards.combined import leak_check  # noqa: E402
from raredx_jax.rewards.diagnosis import verify  # noqa: E402
from raredx_jax.training import rers, rers_journal  # noqa: E402
from raredx_jax.training.settings import config_section, from_section  # noqa: E402

# The tiny data set every test here shares (the subprocesses get the same values as overrides).
DATA = {"data.diseases.n": 4, "data.diseases.seed": 0, "data.notes_per_disease": 3,
        "data.knowledge_passages_per_disease": 2, "data.eval_notes_per_disease": 1,
        "data.knowledge_eval_passages_per_disease": 1}


def _set(c, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    node = c
    for p in path:
        node = node[p]
    node[last] = value


def make_config(data_dir: str, run_dir: str = "", **overrides):
    c = rers_config.get_config("cpu")
    c.data.dir = data_dir
    for k, v in DATA.items():
        _set(c, k, v)
    if run_dir:
        c.run_dir = run_dir
    for k, v in overrides.items():
        _set(c, k.replace("__", "."), v)
    return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("rers_data"))
    build_all(make_config(d), log=lambda m: None)
    return d


@pytest.fixture(scope="module")
def world(data_dir):
    """(config, cases sorted by id, diseases, linker) of the shared tiny data set."""
    c = make_config(data_dir)
    cases = rers.load_cases(c)
    diseases = select_diseases(load_ontology(), c.data.diseases)
    return c, cases, diseases, DiseaseLinker(diseases)


# --- the fixed-text sample function (a test input) ------------------------------------------------------------------
def group(case_id: str) -> str:
    """Which script a case follows: solved directly, solved by reflection, or never solved."""
    return ("direct", "reflection", "unsolved")[int(hashlib.sha1(case_id.encode()).hexdigest()[:8], 16) % 3]


def _note_of(messages: list[dict]) -> tuple[str, bool]:
    user = messages[-1]["content"]
    assert user.startswith("Clinical note:\n")
    body = user[len("Clinical note:\n"):]
    reflection = "\n\nA previous attempt at this case" in body
    marker = "\n\nA previous attempt at this case" if reflection else "\n\nWhat is the most likely rare disease?"
    return body.split(marker, 1)[0].strip(), reflection


class FixedTexts:
    """sample_fn(messages_list, n, seed) -> fixed completion texts per case (see the module docstring).

    Direct round, per sample index j (cycled): "direct" cases get [gold at rank 2, correct (long), correct
    (short), gold at rank 1 but truncated]; other cases only wrong answers. Reflection round: "reflection"
    cases get [correct but says it was told, correct from the note's findings, wrong, correct from the findings
    (longer)]; "unsolved" cases [correct but leaking, wrong, correct but citing no finding, truncated].
    """

    def __init__(self, cases):
        self.by_note = {c.text.strip(): c for c in cases}
        self.names = sorted({(c.diagnosis, c.diagnosis_name) for c in cases})  # the run's diseases, by id
        self.calls: list[tuple[int, int, int]] = []  # (prompts, n, seed)

    def wrong_name(self, case) -> str:
        return next(name for ids, name in self.names if not set(ids) & set(case.diagnosis))

    def findings(self, case) -> str:
        return case.text.strip()[:400]

    def direct(self, case, j: int) -> str:
        gold, wrong = case.diagnosis_name, self.wrong_name(case)
        if group(case.id) != "direct":
            return format_completion(f"The findings suggest {wrong}.", [wrong]) if j % 2 == 0 else \
                "<think>unclear</think>\n<answer>\n1. " + wrong + "\n</answer>"
        return [format_completion("Considering both.", [wrong, gold]),
                format_completion("A long reasoning that goes over the findings one by one " * 4, [gold, wrong]),
                format_completion("Short.", [gold]),
                f"<think>cut</think>\n<answer>\n1. {gold}\n2. "][j % 4]

    def reflect(self, case, j: int) -> str:
        gold, wrong = case.diagnosis_name, self.wrong_name(case)
        leak = format_completion(f"As given, the correct diagnosis is {gold}. {self.findings(case)}", [gold])
        if group(case.id) == "reflection":
            return [leak,
                    format_completion(f"{self.findings(case)} Together these point to {gold}.", [gold, wrong]),
                    format_completion(f"{self.findings(case)}", [wrong]),
                    format_completion(f"{self.findings(case)} {self.findings(case)} Hence {gold}.", [gold])][j % 4]
        return [leak, format_completion("Hmm.", [wrong]), format_completion("It is this.", [gold]),
                f"<think>{self.findings(case)}</think>\n<answer>\n1. {gold}"][j % 4]

    def __call__(self, messages_list, n, seed):
        self.calls.append((len(messages_list), n, seed))
        delay = float(os.environ.get("RERS_TEST_DELAY", "0"))  # kill test: keep the run alive long enough
        if delay:
            time.sleep(delay)
        out = []
        for m in messages_list:
            note, is_reflection = _note_of(m)
            case = self.by_note[note]
            out.append([(self.reflect if is_reflection else self.direct)(case, j) for j in range(n)])
        return out


def fixed_sampler(config):
    """`rers.sampler` factory used by the subprocess tests: FixedTexts over the run's cases."""
    return FixedTexts(rers.load_cases(config))


# --- keep / reject (deterministic) ----------------------------------------------------------------------------------
def _rounds(c, cases, sample_fn, linker, seed=0):
    """Both rounds with `c`'s rers and rewards sections, records marked with checkpoint "test"."""
    return rers.rers_cases(cases, sample_fn, linker, rers.rers_settings(c), seed,
                           judge=rers.JudgeSettings.from_config(c), checkpoint="test")


def test_reflection_keeps_original_prompt_and_no_leak(world):
    c, cases, diseases, linker = world
    fixed = FixedTexts(cases)
    outs = _rounds(c, cases, fixed, linker, seed=7)
    by_id = {c_.id: c_ for c_ in cases}
    refl = [o for o in outs if o.status == "reflection"]
    assert refl and len(refl) == sum(group(x.id) == "reflection" for x in cases)
    phrases = tuple(c.rewards.leak_phrases)
    for o in refl:
        case, rec = by_id[o.case_id], o.record
        # the ORIGINAL prompt, not the reflection prompt (whose user turn holds the attempt and the label)
        assert rec["prompt"] == diagnosis_messages(case.text)
        assert rec["prompt"] != reflection_messages(case.text, "x", case.diagnosis_name)
        joined = json.dumps(rec["prompt"])
        assert "The correct diagnosis is" not in joined and "previous attempt" not in joined
        assert case.diagnosis_name not in joined
        # no leak phrase, and the reasoning rests on findings of the note
        low = rec["completion"].lower()
        assert not any(p in low for p in phrases)
        assert leak_check(rec["completion"], case.text, case.diagnosis_name, phrases=phrases)[0]
        assert (rec["round"], rec["kind"], rec["try_index"], rec["rank"]) == (1, "reflection", 1, 1)
        assert o.reflection["leak_rejected"] >= 1  # try 0 said it was told: rejected though correct
    # the reflection round saw exactly the cases the direct round left unsolved, with seed + 1
    assert fixed.calls == [(len(cases), c.rers.num_samples, 7),
                           (sum(group(x.id) != "direct" for x in cases), c.rers.reflection_tries, 8)]


def test_wrong_answers_are_never_kept(world):
    c, cases, diseases, linker = world
    outs = _rounds(c, cases, FixedTexts(cases), linker)
    statuses = {o.case_id: o.status for o in outs}
    assert statuses == {x.id: group(x.id) for x in cases}  # exactly the scripted outcome per case
    for o, case in zip(outs, cases):
        if o.record is None:
            assert o.status == "unsolved" and o.reason
            continue
        v = verify(o.record["completion"], case.diagnosis, linker)
        assert v.format_ok and v.rank == 1
    # direct: gold-at-rank-2 (try 0) and truncated (try 3) lose; "shortest" keeps try 2, "first" try 1
    direct = [o for o in outs if o.status == "direct"]
    assert direct and all(o.record["try_index"] == 2 and o.direct["correct"] == 2 for o in direct)
    c_first = make_config(c.data.dir, rers__keep_rule="first")
    outs_first = _rounds(c_first, cases, FixedTexts(cases), linker)
    assert all(o.record["try_index"] == 1 for o in outs_first if o.status == "direct")

    # a sampler that only ever answers wrong / badly: nothing is kept, every case is reported unsolved
    def only_wrong(messages_list, n, seed):
        texts = ["", "no answer tag at all", "<answer>\n1. {g}\n",
                 "<think>x</think>\n<answer>\n1. {w}\n2. {g}\n</answer>",
                 "<think>x</think>\n<answer>\n1. none\n</answer>"]
        out = []
        for m in messages_list:
            case = {x.text.strip(): x for x in cases}[_note_of(m)[0]]
            w = next(d.name for d in diseases if d.id not in case.diagnosis)
            out.append([texts[j % len(texts)].format(g=case.diagnosis_name, w=w) for j in range(n)])
        return out

    outs = _rounds(c, cases, only_wrong, linker)
    assert all(o.record is None and o.status == "unsolved" for o in outs)


def test_journal_ignores_uncommitted_chunk_and_torn_line(tmp_path, world):
    c, cases, diseases, linker = world
    outs = _rounds(c, cases[:4], FixedTexts(cases), linker)
    path = str(tmp_path / "journal" / "shard-00000-of-00001.jsonl")
    j = rers_journal.Journal(path)
    j.append_chunk(0, outs[:2], 1.0)
    size = os.path.getsize(path)
    with open(path, "a") as f:  # a kill in the middle of chunk 1's write
        f.write(json.dumps({"chunk": 1, **outs[2].to_json()}) + "\n" + '{"chunk": 1, "case_id": "x", "sta')
    chunks, good = rers_journal.read_journal(path)
    assert list(chunks) == [0] and good == size
    assert [x["case_id"] for x in chunks[0]["cases"]] == [o.case_id for o in outs[:2]]
    j = rers_journal.Journal(path)  # reopening cuts the uncommitted tail
    assert os.path.getsize(path) == size and j.committed == {0}
    j.append_chunk(1, outs[2:], 1.0)
    chunks, _ = rers_journal.read_journal(path)
    assert sorted(chunks) == [0, 1] and sum(len(v["cases"]) for v in chunks.values()) == 4


def test_configs_compose_and_sft_finds_the_trajectories():
    c = rers_config.get_config()
    assert c.stage == "rers" and c.model.init_from == "runs/knowledge_sft"
    s = rers_sft_config.get_config()
    assert s.stage == "sft" and s.train.dataset == "rers_trajectories"
    assert s.model.init_from == c.model.init_from
    assert os.path.normpath(s.train.data_dir) == os.path.normpath(os.path.join(c.run_dir, "trajectories"))
    for hw in ("gpu1", "h100x8"):  # hardware targets still own the mesh / dtypes
        assert rers_config.get_config(hw).model.dtype == "bfloat16"


def test_rers_settings_are_the_rers_section():
    """Every `rers.*` field the stage reads is a RersSettings field (so each is a known, overridable config field
    and has its one default there), and a typo or a bad value is refused naming the field."""
    fields = {f.name for f in dataclasses.fields(rers.RersSettings)}
    c = rers_config.get_config()
    assert set(c.rers.keys()) == fields == set(config_section(rers.RersSettings).keys())
    assert from_section(rers.RersSettings, config_section(rers.RersSettings), "rers") == rers.RersSettings()
    assert rers.rers_settings(c).chunk_size == c.rers.chunk_size
    c.rers.num_sample = 3  # a typo of num_samples
    with pytest.raises(ValueError, match=r"config\.rers\.num_sample: unknown field"):
        rers.rers_settings(c)
    for field, value, msg in (("phase", "both", "rers.phase must be one of"),
                              ("keep_rule", "longest", "rers.keep_rule must be one of"),
                              ("chunk_size", 0, "rers.chunk_size must be >= 1"),
                              ("shard_count", 2, r"rers.shard_index must be in \[0, rers.shard_count=2\)")):
        with pytest.raises(ValueError, match=msg):
            rers.RersSettings(**{field: value})
    judge = rers.JudgeSettings.from_config(c)  # the leak check and verifier read config.rewards, not rers.*
    assert (judge.verify_top_k, judge.leak_phrases, judge.leak_min_findings) == (
        c.rewards.top_k, tuple(c.rewards.leak_phrases), c.rewards.leak_min_findings)


def test_journal_and_settings_modules_are_light_imports():
    """GRPO reads the journal through rers_journal and configs/base.py builds the rers section from rers_settings:
    importing them must not pull in JAX, TF or the RERS stage."""
    code = ("import sys, raredx_jax.training.rers_journal, raredx_jax.training.rers_settings; print(sorted(m for m in "
            "('jax', 'tensorflow', 'tensorflow_datasets', 'raredx_jax.training.rers') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


# --- CLI: kill and resume, shards + merge ---------------------------------------------------------------------------
def _cmd(data_dir: str, run_dir: str, *extra: str) -> list[str]:
    args = [sys.executable, "-m", "raredx_jax.train", "--config=configs/rers.py", f"--config.run_dir={run_dir}",
            f"--config.data.dir={data_dir}", "--config.rers.sampler=tests.test_rers:fixed_sampler",
            "--config.rers.chunk_size=2", "--config.rers.validation_fraction=0.25"]
    args += [f"--config.{k}={v}" for k, v in DATA.items()]
    return args + list(extra)


def _env(**kw) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **kw)
    env.pop("XLA_FLAGS", None)
    return env


def _run(cmd, **env):
    p = subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _dataset(run_dir: str) -> dict[str, list[dict]]:
    out = {}
    for split in ("train", "validation"):
        try:
            out[split] = [decode_sft(r)
                          for r in data_source(rers.DATASET, split, os.path.join(run_dir, "trajectories"))]
        except ValueError:
            out[split] = []
    return out


def _key(ds):
    return sorted((r["case_id"], split, r["kind"], r["try_index"], r["completion"]) for split in ds for r in ds[split])


@pytest.fixture(scope="module")
def single_run(data_dir, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("rers_single"))
    _run(_cmd(data_dir, run_dir))
    ds = _dataset(run_dir)
    with open(os.path.join(run_dir, "summary.json")) as f:
        return run_dir, ds, json.load(f)


def test_single_run_output(single_run, world):
    run_dir, ds, summary = single_run
    c, cases, *_ = world
    ids = [r["case_id"] for split in ds for r in ds[split]]
    assert len(ids) == len(set(ids))  # one trajectory per solved case
    want = {x.id for x in cases if group(x.id) != "unsolved"}
    assert set(ids) == want and ds["train"] and ds["validation"]
    assert summary["cases"] == len(cases)
    assert summary["solved_direct"] == sum(group(x.id) == "direct" for x in cases)
    assert summary["solved_reflection"] == sum(group(x.id) == "reflection" for x in cases)
    assert summary["unsolved"] == sum(group(x.id) == "unsolved" for x in cases)
    assert summary["mean_completion_tokens"] > 0 and summary["splits"]["validation"] == len(ds["validation"])
    for split in ds:
        for r in ds[split]:
            assert rers.is_validation(r["case_id"], 0.25) == (split == "validation")
            assert r["checkpoint"] == "sampler:tests.test_rers:fixed_sampler" and r["rank"] == 1


def test_kill_mid_run_and_resume(data_dir, single_run, tmp_path):
    run_dir = str(tmp_path / "killed")
    journal = os.path.join(run_dir, rers_journal.JOURNAL_DIR, "shard-00000-of-00001.jsonl")
    p = subprocess.Popen(_cmd(data_dir, run_dir), cwd=REPO, env=_env(RERS_TEST_DELAY="0.4"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            if len(rers_journal.read_journal(journal)[0]) >= 2:
                break
            time.sleep(0.05)
        assert p.poll() is None, "the run ended before it could be killed"
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    n_chunks = single_run[2]["chunks"]
    done_before = set(rers_journal.read_journal(journal)[0])
    assert 2 <= len(done_before) < n_chunks
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))
    out = _run(_cmd(data_dir, run_dir))
    assert f"{len(done_before)} already journaled" in out.stdout
    chunks, _ = rers_journal.read_journal(journal)
    case_ids = [x["case_id"] for k in chunks for x in chunks[k]["cases"]]
    assert len(case_ids) == len(set(case_ids)) == single_run[2]["cases"]  # nothing lost, nothing twice
    assert _key(_dataset(run_dir)) == _key(single_run[1])


def test_two_shards_then_merge_equal_one_process(data_dir, single_run, tmp_path):
    run_dir = str(tmp_path / "sharded")
    procs = [subprocess.Popen(_cmd(data_dir, run_dir, f"--config.rers.shard_index={i}", "--config.rers.shard_count=2",
                                   "--config.rers.phase=sample"),
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-3000:]
    journals = sorted(os.listdir(os.path.join(run_dir, rers_journal.JOURNAL_DIR)))
    assert journals == ["manifest.json", "shard-00000-of-00002.jsonl", "shard-00001-of-00002.jsonl"]
    merge_cfg = make_config(data_dir, run_dir, rers__phase="merge", rers__chunk_size=2,
                            rers__validation_fraction=0.25, rers__sampler="tests.test_rers:fixed_sampler")
    rers.run_rers(merge_cfg)  # the merge step (in process: it samples nothing)
    ds = _dataset(run_dir)
    assert _key(ds) == _key(single_run[1])
    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    for k in ("cases", "solved_direct", "solved_reflection", "unsolved", "kept", "mean_completion_tokens"):
        assert s[k] == single_run[2][k], k


def test_two_jax_processes_on_loopback_equal_one_process(data_dir, single_run, tmp_path):
    """jax.distributed (2 processes on loopback): each takes its chunks, the primary merges after a barrier."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = str(tmp_path / "jax_processes")
    procs = [subprocess.Popen(_cmd(data_dir, run_dir), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=_env(RAREDX_COORDINATOR=f"127.0.0.1:{port}", RAREDX_NUM_PROCESSES="2",
                                                  RAREDX_PROCESS_ID=str(i)))
             for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out[-3000:]
    assert sorted(os.listdir(os.path.join(run_dir, rers_journal.JOURNAL_DIR))) == [
        "manifest.json", "shard-00000-of-00002.jsonl", "shard-00001-of-00002.jsonl"]
    assert _key(_dataset(run_dir)) == _key(single_run[1])


def test_changed_settings_refuse_to_resume(data_dir, single_run):
    c = make_config(data_dir, single_run[0], rers__num_samples=2, rers__chunk_size=2,
                    rers__sampler="tests.test_rers:fixed_sampler")
    with pytest.raises(ValueError, match="num_samples: 4 -> 2"):
        rers.run_rers(c)


# --- the real tiny model, end to end (in process) -------------------------------------------------------------------
def test_real_tiny_model_end_to_end(data_dir, world, tmp_path):
    c, cases, *_ = world
    tok = load_tokenizer(c)
    model = hf_io.init_model(model_config_from(c, tok.vocab_size), make_mesh(c.mesh), seed=0)
    ckpt = save_model(str(tmp_path / "ckpt"), model)
    del model
    cfg = make_config(data_dir, str(tmp_path / "run"), model__init_from=ckpt, rers__max_cases=2,
                      rers__chunk_size=1, rers__num_samples=2, rers__reflection_tries=2,
                      sampling__max_new_tokens=8, sampling__max_prompt_len=512, sampling__batch_size=4)
    summary = rers.run_rers(cfg)
    assert summary["cases"] == 2 and summary["chunks"] == 2 and summary["checkpoint"] == ckpt
    assert summary["solved_direct"] + summary["solved_reflection"] + summary["unsolved"] == 2
    assert summary["generated_tokens"] > 0 and summary["tokens_per_s"] > 0
    chunks = rers_journal.read_journals(os.path.join(cfg.run_dir, rers_journal.JOURNAL_DIR))
    lines = [x for k in sorted(chunks) for x in chunks[k]["cases"]]
    assert [x["case_id"] for x in lines] == [x.id for x in cases[:2]]
    linker = world[3]
    by_id = {x.id: x for x in cases}
    for x in lines:
        assert x["direct"]["tries"] == 2
        if x["status"] == "unsolved":  # a random model: the reflection round ran for it
            assert x["reflection"]["tries"] == 2 and x["reason"]
        else:
            v = verify(x["record"]["completion"], by_id[x["case_id"]].diagnosis, linker)
            assert v.rank == 1 and v.format_ok
    again = rers.run_rers(cfg)  # everything journaled: nothing is sampled again, same summary
    assert {k: again[k] for k in ("cases", "kept", "generated_tokens")} == \
        {k: summary[k] for k in ("cases", "kept", "generated_tokens")}
