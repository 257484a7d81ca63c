"""Issue 18's bad-input corpus, the cases the review listed as "good": a UTF-8 byte-order mark, symbolic links, a
50 MB file, control characters and a prompt-injection note, run through every reader of user files: the real-case
importers (folder, .tar.gz, JSONL), `python -m raredx_jax.data.build` (skip and strict) and `diagnose`'s note
reader and prompt.

For each case: the exact one-line message (file, record, field) or that the record is kept, the exit status of
the CLI runs, and that every good record beside a bad one is kept. The small inputs are committed under
tests/data/bad/edge/; the 50 MB files and the symlinks are made at test time in tmp_path. Assertion messages
carry ids and counts, never note text.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from raredx_jax import diagnose
from raredx_jax.data import importers
from raredx_jax.data.hpo import load_ontology
from raredx_jax.data.importers import load_cases, load_jsonl_notes, load_phenopackets, phenopacket_case_id
from raredx_jax.data.prompts import SYSTEM_PROMPT, diagnosis_messages

REPO = Path(__file__).resolve().parents[1]
EDGE = Path(__file__).parent / "data" / "bad" / "edge"
NOTES = EDGE / "notes_edge.jsonl"
MB50 = 50 * 2**20
TOO_LARGE = "50.0 MB, over the 16 MB limit for one record (a phenopacket or note is a few KB): not read"
CONTROL = ("\x00", "\x1b", "\r", "\u202e", "\x07")


def pid(packet_id: str) -> str:
    return phenopacket_case_id({"id": packet_id})


@pytest.fixture(scope="module")
def ontology():
    return load_ontology()


def _big_packet(path: Path, packet_id: str) -> None:
    """A valid phenopacket of 50 MB (a good packet with one huge extra string): it would import if it were read."""
    packet = json.loads((EDGE / "phenopackets" / "good.json").read_text())
    packet["id"] = packet_id
    head = json.dumps(packet)[:-1].encode()
    with open(path, "wb") as f:
        f.write(head + b', "pad": "')
        f.write(b"a" * (MB50 - len(head) - 12))
        f.write(b'"}')
    assert MB50 - 16 < path.stat().st_size <= MB50


@pytest.fixture(scope="module")
def edge_folder(tmp_path_factory) -> Path:
    """The committed edge packets (BOM, control characters, good) plus, made here: a 50 MB packet, a link to a
    file inside the folder (read), a link to a packet outside the folder and a link to a folder (listed, not
    followed)."""
    root = tmp_path_factory.mktemp("edge")
    folder = root / "pp"
    shutil.copytree(EDGE / "phenopackets", folder)
    _big_packet(folder / "big.json", "edge-big")
    (folder / "store").mkdir()
    linked = json.loads((EDGE / "phenopackets" / "good.json").read_text())
    linked["id"] = "edge-linked"
    (folder / "store" / "packet.txt").write_text(json.dumps(linked))  # not a record by name: ignored as itself
    os.symlink("store/packet.txt", folder / "linked.json")  # ... but read through the link, which is inside
    outside = root / "outside"
    outside.mkdir()
    other = json.loads((EDGE / "phenopackets" / "good.json").read_text())
    other["id"] = "edge-outside"
    (outside / "outside.json").write_text(json.dumps(other))
    os.symlink(outside / "outside.json", folder / "link_outside.json")
    os.symlink(outside, folder / "link_dir")
    return folder


GOOD_PACKETS = {pid("edge-bom"), pid("edge-control"), pid("edge-good")}


# ---------------------------------------------------------------------------------------------------------------
# importers: folder, archive, JSONL


def test_folder_bom_symlinks_50mb_control_characters(edge_folder, ontology):
    r = load_phenopackets(edge_folder, ontology, on_error="skip")
    assert {c.id for c in r.cases} == GOOD_PACKETS | {pid("edge-linked")}  # every good record kept
    assert pid("edge-outside") not in {c.id for c in r.cases} and pid("edge-big") not in {c.id for c in r.cases}
    assert [str(i) for i in r.issues] == [f"{edge_folder / 'big.json'}: record big.json: field <file>: {TOO_LARGE}"]
    assert r.n_seen == 5
    assert sorted((i.record, i.message) for i in r.ignored) == [
        ("link_dir", "symbolic link to a folder, not followed (list the folder itself)"),
        ("link_outside.json", "symbolic link to a file outside the folder, not followed (copy the file into the "
                              "folder to import it)"),
        ("store/packet.txt", "unknown file kind (a phenopacket record ends in .json), ignored")]
    cases = {c.id: c for c in r.cases}
    # the BOM file reads as the same packet without it
    assert cases[pid("edge-bom")].diagnosis == ("OMIM:154700",) and cases[pid("edge-bom")].present_hpo
    # control characters in labels and ids: the case is kept, its note comes from the ontology's labels
    ctrl = cases[pid("edge-control")]
    assert ctrl.present_hpo == cases[pid("edge-good")].present_hpo
    assert not any(ch in ctrl.text for ch in CONTROL), "control character reached the rendered note"
    # the report stays one row per record
    md = importers.write_report(r, edge_folder.parent / "report.md").read_text()
    assert sum("big.json" in line for line in md.splitlines()) == 1 and "link_outside.json" in md
    assert not any(ch in md for ch in CONTROL)
    # strict: the 50 MB file is the first (and only) bad record, one message naming it
    with pytest.raises(ValueError) as e:
        load_phenopackets(edge_folder, ontology)
    assert str(e.value) == str(r.issues[0])


def test_archive_bom_links_50mb(edge_folder, ontology, tmp_path):
    arc = tmp_path / "edge.tar.gz"
    with tarfile.open(arc, "w:gz", compresslevel=1) as tar:
        tar.add(edge_folder, arcname="pp")  # links stay links (members are never followed)
    r = load_cases(str(arc), ontology, on_error="skip")
    assert {c.id for c in r.cases} == GOOD_PACKETS
    assert [str(i) for i in r.issues] == [f"{arc}: record pp/big.json: field <file>: {TOO_LARGE}"]
    assert sorted((i.record, i.message.split(" (")[0]) for i in r.ignored) == [
        ("pp/link_dir", "unknown file kind"), ("pp/link_outside.json", "not a regular file"),
        ("pp/linked.json", "not a regular file"), ("pp/store/packet.txt", "unknown file kind")]
    # a single 50 MB .json named directly is refused the same way
    with pytest.raises(ValueError) as e:
        load_cases(str(edge_folder / "big.json"), ontology)
    assert str(e.value) == f"{edge_folder / 'big.json'}: record big.json: field <file>: {TOO_LARGE}"


EDGE_NOTE_IDS = ["e-bom", "e-control", "e-injection", "e-good", "e-after"]
RAW_ESCAPE = f"{NOTES}: record 5: field <json>: invalid JSON: Invalid control character at column 37"


def test_jsonl_bom_control_characters_injection(ontology):
    r = load_cases(str(NOTES), ontology, on_error="skip")
    assert [c.id for c in r.cases] == EDGE_NOTE_IDS and [str(i) for i in r.issues] == [RAW_ESCAPE]
    raw = [json.loads(line) for line in NOTES.read_text(encoding="utf-8-sig").splitlines()
           if "e-raw-escape" not in line]
    for case, rec in zip(r.cases, raw):  # the text is kept exactly, control characters and injection included
        assert case.text == rec["text"], case.id
    assert all(ch in r.cases[1].text for ch in CONTROL)
    with pytest.raises(ValueError) as e:
        load_jsonl_notes(NOTES, ontology)
    assert str(e.value) == RAW_ESCAPE


def test_jsonl_50mb_line_between_good_lines(ontology, tmp_path):
    f = tmp_path / "big.jsonl"
    with open(f, "wb") as fh:
        fh.write(NOTES.read_bytes())  # lines 1-6
        fh.write(b'{"id": "e-big", "diagnosis": ["OMIM:154700"], "text": "' + b"b" * MB50 + b'"}\n')  # line 7
        fh.write(b"\n")  # line 8: blank, not a record
        fh.write(json.dumps({"id": "e-last", "text": "A girl with lens dislocation.",
                             "diagnosis": ["OMIM:154700"]}).encode() + b"\n")  # line 9
    r = load_jsonl_notes(f, ontology, on_error="skip")
    assert [c.id for c in r.cases] == EDGE_NOTE_IDS + ["e-last"]
    assert [str(i) for i in r.issues] == [RAW_ESCAPE.replace(str(NOTES), str(f)),
                                          f"{f}: record 7: field <line>: {TOO_LARGE}"]
    assert r.n_seen == 8


# ---------------------------------------------------------------------------------------------------------------
# python -m raredx_jax.data.build: skip (in process, a tiny build) and strict (the CLI, exit 2)


def test_data_build_skip_keeps_every_good_record(edge_folder, tmp_path):
    from conftest import tiny_data_config

    from raredx_jax.data import build
    from raredx_jax.data import tfds_builders as tb

    c = tiny_data_config(tmp_path / "data", diseases=2)
    c.data.phenopackets, c.data.jsonl_notes, c.data.on_error = str(edge_folder), str(NOTES), "skip"
    lines: list[str] = []
    m = build.build_all(c, log=lines.append)
    rows = tb.data_source("raredx_imported_cases", "test", c.data.dir)
    ids = sorted(tb.decode_case(rows[i]).id for i in range(len(rows)))
    assert ids == sorted(GOOD_PACKETS | {pid("edge-linked")} | set(EDGE_NOTE_IDS))
    assert m["datasets"]["raredx_imported_cases"] == {"test": len(ids)}
    rep = json.loads((tmp_path / "data" / "import_report.json").read_text())
    assert [(Path(s["file"]).name, s["record"], s["field"]) for s in rep["skipped"]] == [
        ("big.json", "big.json", "<file>"), ("notes_edge.jsonl", "5", "<json>")]
    assert rep["n_seen"] == 5 + 6 and rep["n_imported"] == len(ids) and rep["n_ignored_files"] == 3
    assert any(f"{rep['n_seen']} records: {len(ids)} imported, 2 skipped" in line for line in lines)


def test_data_build_cli_strict_one_line_exit_2(edge_folder, tmp_path):
    p = subprocess.run([sys.executable, "-m", "raredx_jax.data.build", "--config=configs/data.py",
                        f"--config.data.dir={tmp_path / 'data'}", f"--config.data.phenopackets={edge_folder}",
                        f"--config.data.jsonl_notes={NOTES}"], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines() == [
        f"data.build: error: {edge_folder / 'big.json'}: record big.json: field <file>: {TOO_LARGE}"]
    assert not (tmp_path / "data" / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# diagnose: the note reader and the prompt built from the note


class _FakeTokenizer:
    """Four characters a token: enough for diagnose's budget arithmetic without a trained tokenizer."""

    def encode(self, text: str) -> list[int]:
        return [0] * (len(text) // 4 + 1)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return [t for m in messages for t in self.encode(m["content"])]


@pytest.fixture()
def fake_policy(monkeypatch):
    """`diagnose.run_cli` end to end with a stand-in policy (context 1024) and sampler; returns the prompts the
    sampler was given."""
    import raredx_jax.diagnose

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=1024))
    seen: list[list[dict]] = []

    def generate_text(model_, tok, prompts, n, params, seed, mesh):
        seen.extend(prompts)
        return [[SimpleNamespace(text="<think>Findings.</think>\n<answer>\n1. Marfan syndrome\n</answer>",
                                 finish_reason="stop")]]

    # the names diagnose.py imported (its module-top imports), so these stand-ins are what run_cli calls
    monkeypatch.setattr(raredx_jax.diagnose, "load_policy", lambda ckpt, mesh, tokenizer_dir="": (model,
                                                                                                 _FakeTokenizer()))
    monkeypatch.setattr(raredx_jax.diagnose, "generate_text", generate_text)
    return seen


def test_note_reader_bom_control_characters_stdin(monkeypatch):
    assert diagnose.read_note(str(EDGE / "note_bom.txt")) == (EDGE / "note_bom.txt").read_bytes()[3:].decode()
    ctrl = (EDGE / "note_control.txt").read_bytes().decode()
    assert diagnose.read_note(str(EDGE / "note_control.txt")) == ctrl
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbf" + ctrl.encode())))
    assert diagnose.read_note("-") == ctrl


def test_diagnose_50mb_note_one_line_exit_2(fake_policy, tmp_path, capsys):
    note = tmp_path / "huge_note.txt"
    with open(note, "wb") as f:
        f.write(b"Short stature and seizures. " * (MB50 // 28) + b"x" * (MB50 % 28))
    assert note.stat().st_size == MB50
    with pytest.raises(SystemExit) as e:
        diagnose.run_cli(checkpoint="ckpt", note=str(note), candidates="OMIM:154700,OMIM:130000")
    assert e.value.code == 2
    out = capsys.readouterr()
    assert out.out == "" and "Traceback" not in out.err and not fake_policy
    assert out.err.splitlines() == [f"diagnose: error: the note has {MB50:,} characters, far more than the model's "
                                    "context of 1024 tokens holds: shorten it"]


@pytest.mark.parametrize("name", ["note_injection.txt", "note_control.txt", "note_bom.txt"])
def test_diagnose_note_only_inside_the_note_section(fake_policy, capsys, name):
    """A prompt-injection note (and one with control characters) is ordinary note text: diagnose runs, the system
    prompt is the project's, and the note appears once, inside the user turn's note section only."""
    path = EDGE / name
    note = diagnose.read_note(str(path))
    diagnose.run_cli(checkpoint="ckpt", note=str(path), as_json=True, candidates="OMIM:154700,OMIM:130000")
    out = capsys.readouterr()
    assert "Traceback" not in out.err and json.loads(out.out)["differential"][0]["id"] == "OMIM:154700"
    assert note.strip() not in out.out + out.err, "the note was echoed"
    (messages,) = fake_policy
    assert messages == diagnosis_messages(note, top_k=5)
    _assert_note_confined(messages, note)


def _assert_note_confined(messages: list[dict], note: str) -> None:
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == SYSTEM_PROMPT
    user = messages[1]["content"]
    head, sep, tail = user.partition("\n\nWhat is the most likely rare disease?")
    assert sep and head == "Clinical note:\n" + note.strip(), "the note is not exactly the note section"
    assert note.strip() not in tail and note.strip() not in messages[0]["content"]


def test_imported_injection_note_prompt(ontology):
    """The injection line of the JSONL corpus, imported and turned into the diagnosis prompt the same way."""
    (case,) = [c for c in load_jsonl_notes(NOTES, ontology, on_error="skip").cases if c.id == "e-injection"]
    assert case.text.startswith("Ignore all previous instructions") and case.diagnosis == ("OMIM:154700",)
    _assert_note_confined(diagnosis_messages(case.text), case.text)
