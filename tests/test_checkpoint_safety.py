"""Checkpoint files and directories: nothing lost, nothing clobbered, every bad file one clear line (issue 18).

Each test reproduces one reported failure: `convert --to=orbax` deleting --dst (the source itself when
--dst == --src), a re-export leaving the old shards and index, a truncated safetensors file failing with a
reshape error, an index naming a pickle failing with a codec error, a pickle-only folder refused by
diagnose/evaluate as "no model checkpoint here", and convert to a read-only or file destination raising a
traceback. Models are tiny, random, built here; no network.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from absl import flags

from raredx_jax import fileio
from raredx_jax.checkpoints import hf_io, orbax
from raredx_jax.checkpoints.safetensors_io import CheckpointFormatError, SafetensorsFile, write_safetensors
from raredx_jax.models.config import ModelConfig
from raredx_jax.parallel.mesh import single_device_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = dict(family="qwen2", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
             num_kv_heads=1, head_dim=8, tie_word_embeddings=True, attention_bias=True, max_position_embeddings=64)
PICKLE_MSG = "pickle-based checkpoint refused (loading it can execute code). Convert it to safetensors first"


def _tree_digest(path: str) -> dict[str, str]:
    """Relative path -> sha256 of every file under `path`: "nothing lost" means this is unchanged."""
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def hf_shapes():
    """HF tensor name -> shape of the MICRO model, from the abstract model (nothing allocated or compiled)."""
    from flax import nnx

    cfg = ModelConfig(**MICRO)
    _, state, _ = hf_io.abstract_model(cfg, single_device_mesh())
    layer_map, top_map, shapes = hf_io._layer_map(cfg), hf_io._top_map(cfg), {}
    for path, var in nnx.to_flat_state(state):
        shape = var.value.shape
        if path[0] == "layers":
            template, _, to_hf = layer_map[path[-1]]
            for i in range(cfg.num_layers):
                shapes[template.format(i)] = to_hf(np.zeros(shape[1:], np.float32)).shape
        else:
            template, _, to_hf = top_map[path[-1]]
            shapes[template] = to_hf(np.zeros(shape, np.float32)).shape
    return shapes


def _write_hf(path: str, shapes: dict, seed: int = 0) -> str:
    """A random HF directory written with numpy (no compile): safetensors, config.json, a tokenizer file."""
    from raredx_jax.models.config import to_hf_config

    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, "model.safetensors"),
                      [(n, rng.standard_normal(s).astype(np.float32)) for n, s in shapes.items()])
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(to_hf_config(ModelConfig(**MICRO), torch_dtype="float32"), f)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"note": "the tokenizer files travel with the model"}, f)
    return path


def _model(shapes: dict, tmp_path, seed: int):
    return hf_io.load_hf_model(_write_hf(str(tmp_path / f"seed{seed}"), shapes, seed), single_device_mesh())


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory, hf_shapes):
    return _write_hf(str(tmp_path_factory.mktemp("src") / "model"), hf_shapes)


def _convert(capsys, *argv: str) -> tuple[int, str]:
    """`python -m raredx_jax.checkpoints.convert ARGV` in-process: (exit status, stderr)."""
    from raredx_jax.checkpoints import convert as cv

    fl = flags.FLAGS
    fl.unparse_flags()
    fl(["convert", *argv])
    capsys.readouterr()
    try:
        cv.main([])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        fl.unparse_flags()
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    """The CLI's one error line (other stderr lines, e.g. a library's log warning, are not ours to judge)."""
    lines = [ln for ln in err.splitlines() if ln.startswith("convert:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- item 1: convert never deletes the source or a non-empty destination ---------------------------------------

def test_convert_to_orbax_with_dst_equal_to_src_refused_source_intact(hf_src):
    """Reported: `convert --to=orbax --src=D --dst=D` deleted the HF model and its tokenizer (orbax force=True)."""
    before = _tree_digest(hf_src)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "raredx_jax.checkpoints.convert", "--to=orbax", f"--src={hf_src}",
                        f"--dst={hf_src}"], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert _one_line(r.stderr) == (f"convert: error: --dst={hf_src} is the source directory itself; writing there "
                                   "would destroy the source: choose another destination")
    assert _tree_digest(hf_src) == before


def test_convert_refuses_dst_inside_or_around_the_source(hf_src, capsys):
    before = _tree_digest(hf_src)
    code, err = _convert(capsys, "--to=orbax", f"--src={hf_src}", f"--dst={hf_src}/ckpt", "--overwrite")
    assert code == 2 and "lies inside the source" in _one_line(err)
    parent = os.path.dirname(hf_src)
    code, err = _convert(capsys, "--to=orbax", f"--src={hf_src}", f"--dst={parent}", "--overwrite")
    assert code == 2 and "contains the source" in _one_line(err)
    link = os.path.join(os.path.dirname(parent), "link_to_src")
    os.symlink(hf_src, link)  # a symlink to the source is the source
    code, err = _convert(capsys, "--to=orbax", f"--src={hf_src}", f"--dst={link}", "--overwrite")
    assert code == 2 and "is the source directory itself" in _one_line(err)
    assert _tree_digest(hf_src) == before and not os.path.exists(os.path.join(hf_src, "ckpt"))


def test_convert_refuses_non_empty_dst_unless_overwrite(hf_src, tmp_path, capsys):
    dst = tmp_path / "ckpt"
    dst.mkdir()
    (dst / "precious.txt").write_text("not a checkpoint")
    code, err = _convert(capsys, "--to=orbax", f"--src={hf_src}", f"--dst={dst}")
    assert code == 2
    assert _one_line(err) == (f"convert: error: --dst={dst} is not empty (1 entries, e.g. 'precious.txt'); pass "
                              "--overwrite to replace it, or choose an empty or new directory")
    assert (dst / "precious.txt").read_text() == "not a checkpoint"
    code, err = _convert(capsys, "--to=orbax", f"--src={hf_src}", f"--dst={dst}", "--overwrite")
    assert code == 0, err
    entries = set(os.listdir(dst))  # replaced whole, the tokenizer inside
    assert "precious.txt" not in entries and {"model_config", "params", "tokenizer"} <= entries
    assert orbax.read_model_config(str(dst)).hidden_size == MICRO["hidden_size"]
    assert [e for e in os.listdir(tmp_path) if fileio.PARTIAL_TAG in e or fileio.OLD_TAG in e] == []


# --- item 9 (convert): a file or read-only destination is one line, exit 2 -------------------------------------

def test_convert_to_a_file_or_read_only_destination_one_line(hf_src, tmp_path, capsys, monkeypatch):
    f = tmp_path / "afile"
    f.write_text("x")
    code, err = _convert(capsys, "--to=orbax", f"--src={hf_src}", f"--dst={f}")
    assert code == 2 and _one_line(err).endswith(f"--dst={f} is a file, not a directory; choose a directory path")
    code, err = _convert(capsys, "--to=orbax", f"--src={hf_src}", f"--dst={f}/sub")
    assert code == 2 and f"{f} is a file, not a directory" in _one_line(err)
    assert f.read_text() == "x"

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root ignores mode bits: the OS refusal of a read-only mount, at the syscall
        real = tempfile.mkdtemp

        def mkdtemp(*a, dir=None, **kw):
            if dir and os.path.realpath(dir).startswith(str(ro)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)
            return real(*a, dir=dir, **kw)
        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    try:
        code, err = _convert(capsys, "--to=orbax", f"--src={hf_src}", f"--dst={ro}/ckpt")
    finally:
        ro.chmod(0o755)
    line = _one_line(err)
    assert code == 2 and line.startswith(f"convert: error: --dst={ro}/ckpt: cannot write in {ro} (")
    assert line.endswith("); choose a writable location") and os.listdir(ro) == []


# --- item 2: a re-export replaces the whole directory; a failed write changes nothing ---------------------------

def test_reexport_leaves_no_stale_shards_and_loader_reads_new_weights(tmp_path, capsys, hf_shapes):
    out = str(tmp_path / "hf")
    old = _model(hf_shapes, tmp_path, 1)
    hf_io.save_hf_model(old, out, max_shard_bytes=4_000)  # sharded: index + model-0000x-of-0000y
    assert os.path.isfile(os.path.join(out, hf_io.INDEX_FILE)) and hf_io.is_own_export(out)
    new = _model(hf_shapes, tmp_path, 2)
    with pytest.raises(fileio.DestinationError, match="is not empty"):
        hf_io.save_hf_model(new, out)
    hf_io.save_hf_model(new, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    reader = hf_io.HFCheckpointReader(out)
    want = dict(hf_io.iter_hf_tensors(new))
    for name in reader.names():
        np.testing.assert_array_equal(reader.get(name), want[name])

    # and through the CLI: an orbax checkpoint re-exported over the sharded export
    hf_io.save_hf_model(old, out, max_shard_bytes=4_000, overwrite=True)
    ckpt = orbax.save_model(str(tmp_path / "ckpt"), new)
    code, err = _convert(capsys, "--to=hf", f"--src={ckpt}", f"--dst={out}")
    assert code == 2 and "is not empty" in _one_line(err)
    code, err = _convert(capsys, "--to=hf", f"--src={ckpt}", f"--dst={out}", "--overwrite")
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]


def test_export_replaces_only_its_own_earlier_export(tmp_path, hf_shapes):
    """The export stage reruns after an interruption (replace an earlier export) but never clobbers a foreign
    non-empty directory (a downloaded model, a home directory) or the checkpoint it reads."""
    mine = str(tmp_path / "mine")
    hf_io.save_hf_model(_model(hf_shapes, tmp_path, 0), mine)
    foreign = _write_hf(str(tmp_path / "foreign"), hf_shapes)  # a model from elsewhere: no export mark
    assert hf_io.is_own_export(mine) and not hf_io.is_own_export(foreign)
    with open(os.path.join(mine, "NOTES.md"), "w", encoding="utf-8") as f:
        f.write("a user's notes beside the weights")
    assert not hf_io.is_own_export(mine)  # a file an export never writes: not replaced unasked
    os.remove(os.path.join(mine, "NOTES.md"))
    os.mkdir(os.path.join(mine, "sub"))
    assert not hf_io.is_own_export(mine)  # a subdirectory: not something an export wrote


def test_export_stage_reruns_over_its_own_export_refuses_a_foreign_dir(tmp_path, hf_shapes):
    """`configs/export.py` twice into the same export.hf_dir (a rerun after an interruption): replaced whole, the
    earlier shards gone; a foreign non-empty export.hf_dir refused (one line) and left as it was."""
    from configs.export import get_config
    from raredx_jax.data.tokenizer import train_sentencepiece
    from raredx_jax.export import run_export

    ckpt = str(tmp_path / "ckpt")
    model = _model(hf_shapes, tmp_path, 3)
    orbax.save_model(ckpt, model)
    os.mkdir(os.path.join(ckpt, "tokenizer"))
    train_sentencepiece(["fever rash seizures"] * 20, os.path.join(ckpt, "tokenizer", "spm"), 300)
    out = str(tmp_path / "hf")
    hf_io.save_hf_model(model, out, max_shard_bytes=4_000)  # an earlier (sharded) export of this project
    c = get_config("cpu")
    c.model.init_from, c.export.hf_dir, c.export.verify, c.run_dir = ckpt, out, False, str(tmp_path / "run")
    run_export(c)
    assert hf_io.INDEX_FILE not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert "tokenizer.json" in os.listdir(out)  # the tokenizer written inside the same unit
    assert hf_io.is_own_export(out), sorted(os.listdir(out))  # so the next rerun may replace it again
    foreign = _write_hf(str(tmp_path / "foreign"), hf_shapes)
    before = _tree_digest(foreign)
    c.export.hf_dir = foreign
    with pytest.raises(fileio.DestinationError, match=rf"^export\.hf_dir={re.escape(foreign)} is not empty .*set "
                                                       r"export\.overwrite=True to replace it"):
        run_export(c)
    assert _tree_digest(foreign) == before
    c.export.hf_dir = ckpt
    with pytest.raises(fileio.DestinationError, match="is the source directory itself"):
        run_export(c)


def test_failed_write_leaves_destination_untouched(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with fileio.atomic_directory(str(dst), overwrite=True) as tmp:
            open(os.path.join(tmp, "new.txt"), "w").write("half")
            raise RuntimeError("disk full")
    assert sorted(os.listdir(tmp_path)) == ["out"] and (dst / "old.txt").read_text() == "old"
    with fileio.atomic_directory(str(dst), overwrite=True) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").write("new")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(dst) == ["new.txt"]


_CRASH_BETWEEN_RENAMES = """
import os, sys
from raredx_jax import fileio
rename = os.rename
def killed_at_publish(src, dst):  # the old copy is aside; the process dies before the new one is renamed in
    if fileio.PARTIAL_TAG in os.path.basename(src):
        os._exit(17)
    rename(src, dst)
os.rename = killed_at_publish
with fileio.atomic_directory(sys.argv[1], overwrite=True) as tmp:
    open(os.path.join(tmp, "new.txt"), "w").write("new")
"""


def test_a_replacement_interrupted_between_its_renames_is_undone(tmp_path, capsys, monkeypatch):
    """Replacing `dst` is two renames (old aside, new in). An exception at the second puts the old copy back at
    once; a process killed there leaves `dst` missing and the old copy under `.out.replaced-*`, which the next
    check_destination renames back (one stderr line, every byte as before). A replaced sibling of a dead writer
    beside an existing `dst` is removed by the next atomic_directory; a live writer's or another host's is not."""
    dst = tmp_path / "out"
    (dst / "sub").mkdir(parents=True)
    (dst / "old.txt").write_text("old")
    (dst / "sub" / "w.bin").write_bytes(bytes(range(256)) * 64)
    before = _tree_digest(str(dst))

    child = subprocess.Popen([sys.executable, "-c", _CRASH_BETWEEN_RENAMES, str(dst)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 17, out + err
    aside = [e for e in os.listdir(tmp_path) if fileio.OLD_TAG in e]
    assert not dst.exists() and len(aside) == 1 and f"-{child.pid}-" in aside[0]  # the crash state (and the
    assert any(fileio.PARTIAL_TAG in e for e in os.listdir(tmp_path))  # unpublished new copy, removed later)
    assert _tree_digest(str(tmp_path / aside[0] / "out")) == before

    capsys.readouterr()
    assert fileio.check_destination(None, str(dst), overwrite=True) == os.path.realpath(dst)
    err = capsys.readouterr().err
    assert err.startswith(f"restored {os.path.realpath(dst)} from ") and err.count("\n") == 1, err
    assert _tree_digest(str(dst)) == before and not any(fileio.OLD_TAG in e for e in os.listdir(tmp_path))
    with pytest.raises(fileio.DestinationError, match="is not empty"):  # restored data is not replaced unasked
        fileio.check_destination(None, str(dst))

    # an exception (not a kill) at the second rename: the old copy is put back before it propagates
    real_rename = os.rename

    def failing(src, target):
        if fileio.PARTIAL_TAG in os.path.basename(src):
            raise OSError(errno.EIO, "I/O error")
        real_rename(src, target)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="I/O error"):
        with fileio.atomic_directory(str(dst), overwrite=True) as tmp:
            open(os.path.join(tmp, "new.txt"), "w").write("new")
    monkeypatch.setattr(os, "rename", real_rename)
    assert _tree_digest(str(dst)) == before
    assert not any(fileio.OLD_TAG in e for e in os.listdir(tmp_path))

    # leftovers beside an existing dst: the dead child's is removed, the others are kept
    dead = f".out{fileio.OLD_TAG}{fileio._HOST}-{child.pid}-abc"
    alive = f".out{fileio.OLD_TAG}{fileio._HOST}-{os.getpid()}-def"
    other_host = f".out{fileio.OLD_TAG}{fileio._HOST}x-{child.pid}-ghi"
    for name in (dead, alive, other_host):
        (tmp_path / name / "out").mkdir(parents=True)
    with fileio.atomic_directory(str(dst), overwrite=True) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").write("new")
    assert sorted(os.listdir(tmp_path)) == sorted([alive, other_host, "out"])
    assert os.listdir(dst) == ["new.txt"] and capsys.readouterr().err == ""


# --- item 7: truncated / corrupt safetensors and a bad index: one line naming the file and the tensor ----------

def _single_file_dir(tmp_path, shapes, name: str) -> tuple[str, str]:
    d = _write_hf(str(tmp_path / name), shapes)
    return d, os.path.join(d, "model.safetensors")


def test_truncated_safetensors_names_file_and_tensor(tmp_path, capsys, hf_shapes):
    d, f = _single_file_dir(tmp_path, hf_shapes, "trunc")
    sf = SafetensorsFile(f)
    cut = os.path.getsize(f) - 100 - sf._offset  # the data byte where the file now ends
    last = next(n for n, i in sf.header.items() if i["data_offsets"][0] <= cut < i["data_offsets"][1])
    os.truncate(f, os.path.getsize(f) - 100)
    with pytest.raises(CheckpointFormatError, match=rf"^{f}: tensor '{last}': data_offsets \[\d+, \d+\] run past "
                                                    r"the end of the file .*truncated or corrupt$"):
        hf_io.load_hf_model(d, single_device_mesh())
    code, err = _convert(capsys, "--to=orbax", f"--src={d}", f"--dst={tmp_path / 'out'}")
    assert code == 2 and f"{f}: tensor '{last}'" in _one_line(err) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage,match", [
    (lambda b: b[:5], r"truncated safetensors file \(5 bytes, no 8-byte header length\)"),
    (lambda b: struct.pack("<Q", 1 << 40) + b[8:], r"header length 1099511627776 exceeds the file size"),
    (lambda b: b[:8] + b"\xff" + b[9:], r"corrupt safetensors header \("),
    (lambda b: b[:8] + b"[" + b[9:], r"corrupt safetensors header"),
])
def test_corrupt_safetensors_header_one_line(tmp_path, damage, match, hf_shapes):
    d, f = _single_file_dir(tmp_path, hf_shapes, "bad")
    raw = open(f, "rb").read()
    open(f, "wb").write(damage(raw))
    with pytest.raises(CheckpointFormatError, match=rf"^{f}: .*{match}") as e:
        hf_io.HFCheckpointReader(d)
    assert "\n" not in str(e.value)


def test_header_size_and_dtype_checked(tmp_path):
    f = str(tmp_path / "x.safetensors")
    write_safetensors(f, [("a", np.zeros(4, np.float32)), ("b", np.ones(2, np.float32))])
    raw = open(f, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["a"]["shape"] = [5]  # 5 floats in 16 bytes
    blob = json.dumps(header).encode()
    open(f, "wb").write(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    with pytest.raises(CheckpointFormatError, match=r"tensor 'a': holds 16 bytes, but dtype F32 and shape \(5,\) "
                                                    r"need 20: the file is corrupt"):
        SafetensorsFile(f)
    header["a"]["shape"], header["a"]["dtype"] = [4], "Q7"
    blob = json.dumps(header).encode()
    open(f, "wb").write(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    with pytest.raises(CheckpointFormatError, match=r"tensor 'a' has unsupported dtype Q7"):
        SafetensorsFile(f).get("a")
    np.testing.assert_array_equal(SafetensorsFile(f).get("b"), [1.0, 1.0])


def test_index_naming_a_pickle_or_a_foreign_path_refused(tmp_path, capsys, hf_shapes):
    d, f = _single_file_dir(tmp_path, hf_shapes, "idx")
    names = SafetensorsFile(f).keys()
    with open(os.path.join(d, "pytorch_model.bin"), "wb") as fh:
        fh.write(b"\x80\x04\x95" + os.urandom(64))  # a pickle's opening bytes: never opened
    index = os.path.join(d, hf_io.INDEX_FILE)
    for target, match in (("pytorch_model.bin", re.escape(os.path.join(d, "pytorch_model.bin") + ": " + PICKLE_MSG)),
                          ("../elsewhere.safetensors", r"points outside the model directory"),
                          ("weights.npy", r"weights\.npy: unsupported weights file for tensor")):
        json.dump({"weight_map": {n: target for n in names}}, open(index, "w"))
        with pytest.raises(CheckpointFormatError, match=match):
            hf_io.load_hf_model(d, single_device_mesh())
    json.dump({"weight_map": {n: "pytorch_model.bin" for n in names}}, open(index, "w"))
    code, err = _convert(capsys, "--to=orbax", f"--src={d}", f"--dst={tmp_path / 'out'}")
    assert code == 2 and PICKLE_MSG in _one_line(err)
    open(index, "wb").write(b"\x80\x04not json")
    with pytest.raises(CheckpointFormatError, match=rf"{re.escape(index)}: not a valid safetensors index"):
        hf_io.HFCheckpointReader(d)


# --- item 8: a pickle-only folder gets the pickle message everywhere -------------------------------------------

@pytest.mark.parametrize("fname", ["pytorch_model.bin", "model.pt"])
def test_pickle_only_folder_refused_as_pickle_everywhere(tmp_path, fname):
    from raredx_jax.policy import load_policy

    d = tmp_path / "pkl"
    d.mkdir()
    (d / fname).write_bytes(b"\x80\x04\x95never unpickled")
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    want = re.escape(f"{d / fname}: {PICKLE_MSG}")
    with pytest.raises(CheckpointFormatError, match=want):
        orbax.resolve_model_checkpoint(str(d))  # evaluate, diagnose, export, init_from
    with pytest.raises(CheckpointFormatError, match=want):
        orbax.resolve_model_checkpoint(str(d / fname))  # the file itself
    with pytest.raises(CheckpointFormatError, match=want):
        load_policy(str(d), single_device_mesh())  # diagnose and evaluate load through this
    with pytest.raises(CheckpointFormatError, match=want):
        hf_io.HFCheckpointReader(str(d))  # model.hf_path


def test_atomic_file_replaces_whole_or_leaves_the_old_file(tmp_path):
    from raredx_jax.fileio import atomic_file
    path = tmp_path / "sub" / "out.json"
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            f.write("new")
    assert path.read_text() == "new"
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "new" and sorted(p.name for p in path.parent.iterdir()) == ["out.json"]
