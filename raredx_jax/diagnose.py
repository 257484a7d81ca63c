"""Diagnose one clinical note: a ranked differential with linked ontology ids, and the model's reasoning.

  python -m raredx_jax.diagnose --checkpoint=DIR --note=note.txt      (or the note on stdin)
  python -m raredx_jax.diagnose --checkpoint=DIR --note=note.txt --json

The note is sent to nothing but the local model; it is not logged. Works from an orbax checkpoint, a run
directory or an exported HF directory. The note may use the model's whole context (its max_position_embeddings)
less the generation budget (--max_new_tokens; a longer note shrinks that budget, with a warning, down to 64 tokens).

Exit status: 0 on success; 2 for a bad input, printed as one line `diagnose: error: ...` (no such note file, a
note that is not UTF-8 or is empty or cannot fit the model, an unknown --candidates id, a missing or unreadable
checkpoint or tokenizer; RAREDX_TRACEBACK=1 raises instead); 1 for an unexpected failure (a traceback).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import app, flags, logging
from ml_collections import ConfigDict

from raredx_jax.data.hpo import load_ontology
from raredx_jax.data.linking import DiseaseLinker
from raredx_jax.data.prompts import diagnosis_messages
from raredx_jax.parallel.mesh import make_mesh
from raredx_jax.policy import load_policy
from raredx_jax.rewards.diagnosis import link_entry, parse_answer
from raredx_jax.sampling.sampler import SamplingParams
from raredx_jax.sampling.text import context_length, generate_text, prompt_budget

MIN_ANSWER_TOKENS = 64  # a note may shrink the generation budget down to this, never below
MAX_NOTE_CHARS_PER_CONTEXT_TOKEN = 32  # a longer note cannot fit: refused before tokenizing (e.g. a 50 MB file)


class DiagnoseError(ValueError):
    """A bad input to `diagnose` (the note, a flag, the checkpoint); the CLI prints it as one line, exit 2."""


class NoteTooLongError(DiagnoseError):
    """The note (with the prompt around it) does not fit the model's context at all."""


def diagnose(model: Any, tokenizer: Any, note: str, linker: Any, top_k: int = 5, max_new_tokens: int = 256,
             temperature: float = 0.0, seed: int = 0, mesh: Any = None) -> dict[str, Any]:
    """The model's differential for one note.

    The prompt budget is the model's context (`config.max_position_embeddings`) less the generation budget; a
    note too long for that shrinks the generation budget (down to MIN_ANSWER_TOKENS, `truncated_budget` in the
    result says so) and raises NoteTooLongError only when it cannot fit the model at all.
    """

    context = context_length(model)
    if len(note) > MAX_NOTE_CHARS_PER_CONTEXT_TOKEN * context:
        raise NoteTooLongError(f"the note has {len(note):,} characters, far more than the model's context of "
                               f"{context} tokens holds: shorten it")
    messages = diagnosis_messages(note, top_k=top_k)
    n_prompt = len(tokenizer.encode_chat(messages, add_generation_prompt=True))
    try:
        max_prompt_len, new_tokens = prompt_budget(model, n_prompt, max_new_tokens, MIN_ANSWER_TOKENS)
    except ValueError:
        floor = min(MIN_ANSWER_TOKENS, max_new_tokens)
        raise NoteTooLongError(
            f"the note does not fit the model: with the prompt it is {n_prompt} tokens and the model's context "
            f"holds {context}, {floor} of them kept for the answer; shorten the note to about "
            f"{max(0, context - floor - (n_prompt - len(tokenizer.encode(note))))} tokens") from None
    params = SamplingParams(temperature=temperature, max_new_tokens=new_tokens, max_prompt_len=max_prompt_len,
                            batch_size=1)
    comp = generate_text(model, tokenizer, [messages], n=1, params=params, seed=seed, mesh=mesh)[0][0]
    out = differential_from_completion(comp.text, linker)
    out["finish_reason"] = comp.finish_reason
    out["prompt_tokens"] = n_prompt
    out["max_new_tokens"] = new_tokens
    if new_tokens < max_new_tokens:
        out["truncated_budget"] = (f"the note leaves room for {new_tokens} generated tokens of the "
                                   f"{max_new_tokens} asked (the model's context holds {context})")
    return out


def differential_from_completion(text: str, linker: Any) -> dict[str, Any]:
    """Parse a completion's <answer> list and link each entry to an ontology id (None when it links nowhere)."""

    parsed = parse_answer(text)
    differential = []
    for i, entry in enumerate(parsed.entries, 1):
        did = link_entry(entry, parsed.ids[i - 1] if parsed.ids else None, linker)
        differential.append({"rank": i, "text": entry, "id": did, "name": linker.name(did) if did else None})
    return {"differential": differential, "reasoning": parsed.think or "", "format_ok": parsed.format_ok,
            "raw": text}


def _define_flags() -> None:
    """CLI flags, defined only when run as a program so importing `diagnose` defines nothing."""
    flags.DEFINE_string("checkpoint", None, "Orbax checkpoint / run dir / exported HF directory.")
    flags.DEFINE_string("note", "-", "Note file, or - for stdin.")
    flags.DEFINE_string("tokenizer", "", "Tokenizer directory if not stored with the checkpoint.")
    flags.DEFINE_bool("json", False, "Print JSON for machines.")
    flags.DEFINE_integer("top_k", 5, "Differential length asked for.")
    flags.DEFINE_integer("max_new_tokens", 256, "Generation budget.")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_string("candidates", "all", "Diseases the answer is linked against: all, or comma-separated ids.")


def read_note(path: str) -> str:
    """The note text from a file or stdin ("-"): UTF-8 (a BOM is dropped); DiagnoseError naming the problem."""
    where = "stdin" if path == "-" else f"--note={path}"
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        elif not os.path.exists(path):
            raise DiagnoseError(f"--note: no such file {path!r}")
        elif not os.path.isfile(path):
            raise DiagnoseError(f"--note={path}: not a file")
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as e:
        raise DiagnoseError(f"{where}: cannot read the note ({e.strerror or e})") from None
    try:
        note = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DiagnoseError(f"{where}: the note is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                            "save it as UTF-8") from None
    if not note.strip():
        raise DiagnoseError(f"{where}: the note is empty")
    return note


def candidate_diseases(ontology: Any, spec: str) -> list[Any]:
    """`--candidates`: all diseases, or the comma-separated ids; DiagnoseError listing every unknown id."""
    if spec.strip() == "all":
        return ontology.diseases()
    ids = [d.strip() for d in spec.split(",") if d.strip()]
    if not ids:
        raise DiagnoseError("--candidates: no disease ids given (use all, or ids like OMIM:154700,ORPHA:558)")
    out, unknown = [], []
    for d in ids:
        try:
            out.append(ontology.disease(d))
        except KeyError:
            unknown.append(d)
    if unknown:
        raise DiagnoseError(f"--candidates: unknown disease id{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(repr(u) for u in unknown)} (OMIM:<number> or ORPHA:<number> with HPO "
                            "phenotype annotations, e.g. OMIM:154700)")
    return out


def run(checkpoint: str | None, note: str = "-", tokenizer: str = "", as_json: bool = False, top_k: int = 5,
        max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0, candidates: str = "all") -> None:
    """The CLI's work: prints the differential; DiagnoseError for any bad input (main prints it, exit 2)."""
    if not checkpoint:
        raise DiagnoseError("--checkpoint is required (a run dir, a checkpoint step dir or an exported HF dir)")
    for name, value, ok in (("top_k", top_k, top_k >= 1), ("max_new_tokens", max_new_tokens, max_new_tokens >= 1),
                            ("temperature", temperature, temperature >= 0)):
        if not ok:
            raise DiagnoseError(f"--{name}={value}: must be {'>= 0' if name == 'temperature' else '>= 1'}")
    text = read_note(note)

    diseases = candidate_diseases(load_ontology(), candidates)
    try:
        mesh = make_mesh(ConfigDict({"data": 1, "fsdp": -1, "tensor": 1}))
        model, tok = load_policy(checkpoint, mesh, tokenizer_dir=tokenizer)
    except (OSError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise DiagnoseError(" ".join(str(msg).split())) from None
    out = diagnose(model, tok, text, DiseaseLinker(diseases), top_k, max_new_tokens, temperature, seed, mesh)
    if out.get("truncated_budget"):
        logging.warning(out["truncated_budget"])
    if as_json:
        print(json.dumps(out, indent=2))
        return
    print("Differential diagnosis:")
    if not out["differential"]:
        print("  (the model gave no parseable differential)")
    for d in out["differential"]:
        link = f"{d['id']} {d['name']}" if d["id"] else "not linked to an ontology id"
        print(f"  {d['rank']}. {d['text']}  [{link}]")
    print("\nReasoning:\n" + (out["reasoning"].strip() or "(none)"))


def run_cli(**kw: Any) -> None:
    """`run(**kw)` with the CLI's error contract: a bad input prints one line `diagnose: error: ...`, exit 2."""
    try:
        run(**kw)
    except DiagnoseError as e:
        if os.environ.get("RAREDX_TRACEBACK"):
            raise
        print(f"diagnose: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        print(f"diagnose: error: unexpected arguments {argv[1:]} (the note goes in --note=FILE or on stdin)",
              file=sys.stderr, flush=True)
        sys.exit(2)
    logging.set_verbosity(logging.WARNING)  # orbax/absl chatter would bury the answer
    F = flags.FLAGS
    run_cli(checkpoint=F.checkpoint, note=F.note, tokenizer=F.tokenizer, as_json=F.json, top_k=F.top_k,
            max_new_tokens=F.max_new_tokens, temperature=F.temperature, seed=F.seed, candidates=F.candidates)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with the CLI's error contract: a bad or unknown flag is one line, exit 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"diagnose: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=parse_flags)
