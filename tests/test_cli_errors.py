"""Every bad input to the `diagnose` and `train` CLIs is one clear line with its exit code, never a traceback
(issue 18 items 4, 5 and 9), and an ordinary long note fits the model's context.

Most cases call the CLI functions in process (`diagnose.run_cli`, `train.run_cli`); a few run the real
`python -m ...` command for the paths only a process shows (flag parsing, stdin bytes, exit status).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from raredx_jax import diagnose

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 1,232 characters, an ordinary admission note (the length issue 18 reproduced the failure with).
LONG_NOTE = (
    "A 9-year-old boy was referred to the genetics clinic for evaluation of tall stature and joint "
    "hypermobility. He was born at term after an uncomplicated pregnancy; birth weight and length were above "
    "the 90th centile. Early motor milestones were mildly delayed, which the family attributed to his lax "
    "joints. At age 4 he was noted to have a pectus excavatum that has progressed slowly. At age 7 an "
    "ophthalmologist found bilateral upward displacement of the lenses and prescribed glasses for severe "
    "myopia. He has had two episodes of spontaneous knee dislocation during sports. On examination his height "
    "is well above the 97th centile, arm span exceeds height by 8 cm, and the upper to lower segment ratio is "
    "reduced. He has long, slender fingers with positive wrist and thumb signs, a high arched palate with "
    "crowded teeth, and mild scoliosis on forward bending. Skin shows striae over the lower back without a "
    "history of weight change. Echocardiography showed dilatation of the aortic root at the sinuses of "
    "Valsalva with a z-score of 3.1 and mild mitral valve prolapse. Cognition and school performance are "
    "normal. There is no family history of similar problems in either parent. Both worried parents ask "
    "for a diagnosis and a plan.")


def _one_line_error(err: str, prefix: str) -> str:
    """The single stderr line of a refused input: no traceback, exactly one line, with the CLI's prefix."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


def _diagnose_exit(capsys, **kw) -> str:
    with pytest.raises(SystemExit) as e:
        diagnose.run_cli(**kw)
    assert e.value.code == 2
    out = capsys.readouterr()
    assert out.out == ""
    return _one_line_error(out.err, "diagnose: error: ")


# --- a tiny checkpoint with its tokenizer ---------------------------------------------------------------------------
CONTEXT = 1024  # the tiny model's max_position_embeddings: the note's budget is this minus --max_new_tokens


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """An orbax model checkpoint (2 layers, width 32, context 1024) with a 600-piece SentencePiece tokenizer in
    `<ckpt>/tokenizer/` (the layout diagnose finds on its own)."""
    from ml_collections import ConfigDict

    from raredx_jax.checkpoints import hf_io
    from raredx_jax.checkpoints.orbax import save_model
    from raredx_jax.data.prompts import diagnosis_messages
    from raredx_jax.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
    from raredx_jax.models.config import ModelConfig
    from raredx_jax.parallel.mesh import make_mesh

    root = tmp_path_factory.mktemp("diagnose_ckpt")
    texts = [m["content"] for m in diagnosis_messages("A note.")] * 10 + [LONG_NOTE] * 5 + [
        "<think>The findings point to a connective tissue disorder.</think><answer>1. Marfan syndrome</answer>"] * 5
    spm = train_sentencepiece(texts, root / "spm", 600)  # the note is ~545 tokens, ~700 with the prompt
    tok = SentencePieceTokenizer(spm)
    cfg = ModelConfig(family="qwen2", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, tie_word_embeddings=True,
                      attention_bias=True, max_position_embeddings=CONTEXT)
    mesh = make_mesh(ConfigDict({"data": 1, "fsdp": -1, "tensor": 1}))
    ckpt = save_model(str(root / "ckpt"), hf_io.init_model(cfg, mesh, seed=0))
    os.makedirs(os.path.join(ckpt, "tokenizer"))
    shutil.copy(spm, os.path.join(ckpt, "tokenizer", "spm.model"))
    return ckpt, tok


def test_long_ordinary_note_fits_the_model_context(tiny_ckpt, tmp_path, capsys):
    """Issue 18 item 4: a 1,232-character note was over the sampler's fixed 384-token default and failed with a
    traceback; the budget now comes from the model's context (1024 here) less the generation budget."""
    from raredx_jax.data.prompts import diagnosis_messages

    ckpt, tok = tiny_ckpt
    assert len(LONG_NOTE) == 1232
    n_prompt = len(tok.encode_chat(diagnosis_messages(LONG_NOTE), add_generation_prompt=True))
    assert 384 < n_prompt < CONTEXT - 64, n_prompt  # over the old default, inside the model
    note = tmp_path / "note.txt"
    note.write_text(LONG_NOTE, encoding="utf-8")
    diagnose.run_cli(checkpoint=ckpt, note=str(note), as_json=True, max_new_tokens=8,
                     candidates="OMIM:154700,OMIM:130000")
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert out["prompt_tokens"] == n_prompt and out["max_new_tokens"] == 8
    assert set(out) >= {"differential", "reasoning", "format_ok", "finish_reason"}
    assert "Traceback" not in cap.err and "tall stature" not in cap.err.lower()  # the note is not logged


def test_note_near_the_context_shrinks_the_answer_budget_with_a_warning(tiny_ckpt, tmp_path, capsys, caplog):
    from raredx_jax.data.prompts import diagnosis_messages

    ckpt, tok = tiny_ckpt
    text = LONG_NOTE
    while len(tok.encode_chat(diagnosis_messages(text), add_generation_prompt=True)) < CONTEXT - 100:
        text += " He also reports fatigue after exercise and occasional chest pain at rest."
    n_prompt = len(tok.encode_chat(diagnosis_messages(text), add_generation_prompt=True))
    assert CONTEXT - 256 < n_prompt <= CONTEXT - 64, n_prompt
    note = tmp_path / "note.txt"
    note.write_text(text, encoding="utf-8")
    diagnose.run_cli(checkpoint=ckpt, note=str(note), as_json=True, max_new_tokens=256, candidates="OMIM:154700")
    cap = capsys.readouterr()
    assert json.loads(cap.out)["max_new_tokens"] == CONTEXT - n_prompt
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]  # absl logging (stderr in the CLI)
    assert warned.count(f"the note leaves room for {CONTEXT - n_prompt} generated tokens of the 256 asked (the "
                        f"model's context holds {CONTEXT})") == 1, warned
    assert "Traceback" not in cap.err and "fatigue" not in cap.err + caplog.text  # the note is not logged


def test_note_that_cannot_fit_the_model_is_one_line(tiny_ckpt, tmp_path, capsys):
    ckpt, _ = tiny_ckpt
    note = tmp_path / "long.txt"
    note.write_text(" ".join([LONG_NOTE] * 3), encoding="utf-8")
    line = _diagnose_exit(capsys, checkpoint=ckpt, note=str(note), max_new_tokens=8, candidates="OMIM:154700")
    assert "does not fit the model" in line and f"context holds {CONTEXT}" in line and "shorten the note" in line
    huge = tmp_path / "huge.txt"  # far over the context in characters: refused before it is tokenized
    huge.write_text("fever " * 10_000, encoding="utf-8")
    line = _diagnose_exit(capsys, checkpoint=ckpt, note=str(huge), candidates="OMIM:154700")
    assert "60,000 characters" in line and "shorten it" in line


def test_prompt_budget_shrinks_generation_before_refusing():
    from raredx_jax.sampling.text import prompt_budget

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=1000))
    assert prompt_budget(model, 500, 256) == (744, 256)  # the prompt may use all the context leaves
    assert prompt_budget(model, 900, 256) == (900, 100)  # a longer note shrinks the answer budget ...
    assert prompt_budget(model, 936, 256) == (936, 64)  # ... down to 64 tokens
    with pytest.raises(ValueError, match="the prompt is 937 tokens; the model's context holds 1000"):
        prompt_budget(model, 937, 256)
    assert prompt_budget(model, 990, 8) == (992, 8)


def test_non_utf8_note_file_and_stdin_are_one_line(tiny_ckpt, tmp_path, capsys, monkeypatch):
    ckpt, _ = tiny_ckpt
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Patient with caf\u00e9-au-lait spots".encode("latin-1"))
    line = _diagnose_exit(capsys, checkpoint=ckpt, note=str(bad))
    assert f"--note={bad}: the note is not UTF-8 text (byte 0xe9 at offset 16); save it as UTF-8" in line
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"seizures \xff\xfe and ataxia")))
    line = _diagnose_exit(capsys, checkpoint=ckpt, note="-")
    assert "stdin: the note is not UTF-8 text (byte 0xff at offset 9)" in line
    line = _diagnose_exit(capsys, checkpoint=ckpt, note=str(tmp_path))
    assert "not a file" in line
    line = _diagnose_exit(capsys, checkpoint=ckpt, note=str(tmp_path / "missing.txt"))
    assert "no such file" in line
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "the note is empty" in _diagnose_exit(capsys, checkpoint=ckpt, note=str(empty))
    line = _diagnose_exit(capsys, checkpoint="", note=str(bad))
    assert "--checkpoint is required" in line
    line = _diagnose_exit(capsys, checkpoint=ckpt, note=str(empty), max_new_tokens=0)
    assert "--max_new_tokens=0: must be >= 1" in line


def test_bom_and_control_characters_are_kept_as_a_note(tmp_path):
    p = tmp_path / "bom.txt"
    p.write_bytes(b"\xef\xbb\xbfShort stature\x07 and seizures.\n")
    assert diagnose.read_note(str(p)) == "Short stature\x07 and seizures.\n"


def test_unknown_candidate_ids_are_one_line(tiny_ckpt, tmp_path, capsys):
    ckpt, _ = tiny_ckpt
    note = tmp_path / "note.txt"
    note.write_text("Tall stature and lens dislocation.", encoding="utf-8")
    line = _diagnose_exit(capsys, checkpoint=ckpt, note=str(note), candidates="OMIM:154700, OMIM:999999,ORPHA:0")
    assert "--candidates: unknown disease ids 'OMIM:999999', 'ORPHA:0'" in line
    assert "no disease ids given" in _diagnose_exit(capsys, checkpoint=ckpt, note=str(note), candidates=" , ")
    line = _diagnose_exit(capsys, checkpoint=str(tmp_path / "nowhere"), note=str(note), candidates="OMIM:154700")
    assert "does not exist" in line


def test_diagnose_process_exit_status_and_stderr(tmp_path):
    """The real command: a non-UTF-8 note on stdin exits 2 with one line (fails before any model is loaded)."""
    r = subprocess.run([sys.executable, "-m", "raredx_jax.diagnose", f"--checkpoint={tmp_path}"],
                       input=b"fever \xc3\x28 rash", capture_output=True, cwd=REPO, timeout=120)
    assert r.returncode == 2, r.stderr.decode()
    line = _one_line_error(r.stderr.decode(), "diagnose: error: ")
    assert "stdin: the note is not UTF-8 text (byte 0xc3 at offset 6)" in line
    r = subprocess.run([sys.executable, "-m", "raredx_jax.diagnose", f"--checkpoint={tmp_path}",
                        "--max_new_tokens=many"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2
    assert "flag --max_new_tokens=many: invalid literal" in _one_line_error(r.stderr, "diagnose: error: ")


# --- train: configuration errors are one line, exit 2 ---------------------------------------------------------------
def _train_cli(*args):
    r = subprocess.run([sys.executable, "-m", "raredx_jax.train", *args], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
    return r.returncode, r.stderr


@pytest.mark.parametrize("args, expect", [
    (("--config=configs/knowledge_sft.py", "--config.train.step=3"),
     ["--config.train.step: the config has no field 'step'", 'Did you mean "steps"']),
    (("--config=configs/knowledge_sft.py", "--config.nope.x=1"), ["--config.nope.x: the config has no field 'nope'"]),
    (("--config=configs/knowledge_sft.py", "--config.train.steps=abc"),
     ["flag --config.train.steps=abc: invalid literal for int()"]),
    (("--config=configs/no_such_stage.py",), ["--config=configs/no_such_stage.py: the config file did not load",
                                              "No such file or directory"]),
    (("--config=configs/knowledge_sft.py:nohw",), ["unknown hardware target 'nohw'"]),
])
def test_train_bad_configuration_exits_2_with_one_line(args, expect):
    """Issue 18 item 9: an unknown config field was a KeyError traceback with exit 1; README promises 2."""
    code, err = _train_cli(*args)
    assert code == 2, err
    line = _one_line_error(err, "train: error: ")
    for e in expect:
        assert e in line, line


def test_train_one_line_reduces_an_embedded_traceback():
    from raredx_jax.train import one_line

    msg = ("flag --config=x.py:t: Error whilst parsing config file:\n\nTraceback (most recent call last):\n"
           "  File \"a.py\", line 1, in f\n    g()\nValueError: unknown hardware target 't'\n")
    assert one_line(msg) == "flag --config=x.py:t: unknown hardware target 't'"
    assert one_line("a\n  b") == "a b"


# --- resume with another model: refused, naming the fields (issue 18 item 5) ----------------------------------------
def _fake_run_dir(tmp_path, **model):
    """A run dir as a trainer leaves it: config.json (resolved config) and a checkpoint step."""
    from configs.base import get_config

    c = get_config("cpu")
    c.model.update(model)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "4").mkdir(parents=True)
    (run_dir / "config.json").write_text(c.to_json_best_effort(indent=2))
    return str(run_dir), c


def test_resume_refuses_another_model_source(tmp_path):
    from raredx_jax.training.common import write_resolved_config  # what every Trainer calls before resuming
    from raredx_jax.training.resume_guard import ModelChangedError

    run_dir, c = _fake_run_dir(tmp_path, preset="tiny", vocab_size=0)
    c.model.vocab_size = 4096
    with pytest.raises(ModelChangedError, match=r"model\.vocab_size: 0 -> 4096") as e:
        write_resolved_config(c, run_dir)
    assert "\n" not in str(e.value) and "resume refused" in str(e.value) and "new run_dir" in str(e.value)
    assert json.load(open(os.path.join(run_dir, "config.json")))["model"]["vocab_size"] == 0  # record kept
    c.model.vocab_size, c.model.hf_path = 0, "/models/Qwen2.5-0.5B"
    with pytest.raises(ModelChangedError, match=r"model\.hf_path: \(unset\) -> '/models/Qwen2.5-0.5B'"):
        write_resolved_config(c, run_dir)
    c.model.hf_path, c.model.preset = "", "qwen2.5-7b"
    with pytest.raises(ModelChangedError, match=r"model\.preset: 'tiny' -> 'qwen2.5-7b'"):
        write_resolved_config(c, run_dir)
    c.model.preset, c.model.dtype, c.model.remat = "tiny", "bfloat16", "full"  # numerics may change on resume
    write_resolved_config(c, run_dir)


def test_resume_refuses_another_hf_path_and_allows_a_moved_init_checkpoint(tmp_path):
    from raredx_jax.training.resume_guard import ModelChangedError, check_model_source

    run_dir, c = _fake_run_dir(tmp_path, hf_path="/models/A")
    c.model.hf_path = "/models/B"
    with pytest.raises(ModelChangedError, match=r"model\.hf_path: '/models/A' -> '/models/B'"):
        check_model_source(c, run_dir)
    c.model.hf_path = "/models/A/"
    check_model_source(c, run_dir)
    run_dir2, c2 = _fake_run_dir(tmp_path / "2", init_from="/old/runs/knowledge_sft")
    c2.model.init_from = "/new/runs/knowledge_sft"  # a moved run dir: the shape check compares the checkpoint
    check_model_source(c2, run_dir2)
    c2.model.init_from = ""
    with pytest.raises(ModelChangedError, match=r"model\.init_from: '/old/runs/knowledge_sft' -> \(unset\)"):
        check_model_source(c2, run_dir2)


def test_grpo_resume_goes_through_the_same_checks():
    """SFT and GRPO both run on training/loop.py's Trainer, which writes the resolved config (refusing another
    model source) and reads the resumed model's config (refusing another shape) before anything is restored."""
    import inspect

    from raredx_jax.training import grpo, loop, sft

    for driver in (sft.run_sft, grpo.run_grpo):
        assert "Trainer(" in inspect.getsource(driver)
    assert "write_resolved_config(config, self.run_dir)" in inspect.getsource(loop.Trainer.__init__)
    assert "resume_model_config(self.ckpt, self.config)" in inspect.getsource(loop.Trainer.model_config)


def test_rers_resume_refuses_another_model(tmp_path):
    from configs.rers import get_config
    from raredx_jax.training import rers, rers_journal

    c = get_config("cpu")
    cases = [SimpleNamespace(id="c1"), SimpleNamespace(id="c2")]
    journal = str(tmp_path / "journal")
    c.model.init_from, c.model.hf_path = "", "/models/A"
    rers_journal.check_manifest(journal, rers.fingerprint(c, cases, rers.provenance(c)))
    c.model.hf_path = "/models/B"
    with pytest.raises(ValueError, match=r"checkpoint: '/models/A' -> '/models/B'"):
        rers_journal.check_manifest(journal, rers.fingerprint(c, cases, rers.provenance(c)))
    c.model.hf_path = ""
    assert rers.provenance(c) == "fresh:tiny:seed0"  # unchanged for existing journals
    c.model.vocab_size = 4096
    assert rers.provenance(c) == "fresh:tiny:seed0:vocab4096"


def _hf_dir(path, hidden: int, seed: int, vocab: int) -> str:
    from ml_collections import ConfigDict

    from raredx_jax.checkpoints import hf_io
    from raredx_jax.models.config import ModelConfig
    from raredx_jax.parallel.mesh import make_mesh

    cfg = ModelConfig(family="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=16, tie_word_embeddings=True, attention_bias=True,
                      max_position_embeddings=256)
    mesh = make_mesh(ConfigDict({"data": 1, "fsdp": -1, "tensor": 1}))
    return hf_io.save_hf_model(hf_io.init_model(cfg, mesh, seed=seed), str(path))


def test_sft_resume_with_another_model_exits_2_naming_the_fields(data_dir, tmp_path, capsys):
    """The real trainer: 2 steps from HF dir A, then the same run dir with HF dir B (another model) is refused,
    by the recorded source and, with that record gone, by the checkpoint's shape; A itself still resumes."""
    from conftest import tiny_data_config

    from configs.knowledge_sft import get_config
    from raredx_jax import train
    from raredx_jax.data.tokenizer import load_tokenizer
    from raredx_jax.training import sft

    c = get_config("cpu")
    src = tiny_data_config(data_dir)
    c.data, c.tokenizer = src.data, src.tokenizer
    vocab = load_tokenizer(c).vocab_size
    a, b = _hf_dir(tmp_path / "A", 32, 0, vocab), _hf_dir(tmp_path / "B", 64, 1, vocab)
    c.run_dir = str(tmp_path / "run")
    c.model.hf_path = a
    c.train.update(dict(steps=2, batch_size=8, seq_len=32, checkpoint_every=2, log_every=1, eval_every=0,
                        async_checkpointing=False, build_data=False))
    c.optim.warmup_steps = 1
    c.probe.n = 0
    sft.run_sft(c)
    capsys.readouterr()

    c.model.hf_path = b
    with pytest.raises(SystemExit) as e:
        train.run_cli(c)
    assert e.value.code == 2
    line = _one_line_error(capsys.readouterr().err, "train: error: resume refused: ")
    assert f"model.hf_path: '{a}' -> '{b}'" in line

    os.remove(os.path.join(c.run_dir, "config.json"))  # no record of the source: the checkpoint's shape decides
    with pytest.raises(SystemExit) as e:
        train.run_cli(c)
    assert e.value.code == 2
    line = _one_line_error(capsys.readouterr().err, "train: error: resume refused: ")
    assert "holds a model of another shape" in line and "hidden_size: 32 -> 64" in line

    c.model.hf_path = a  # the model the checkpoints hold: resumes (already finished: the summary again)
    train.run_cli(c)
    out = capsys.readouterr()
    assert "resumed from" in out.out and json.loads(out.out.strip().splitlines()[-1])["summary"]
