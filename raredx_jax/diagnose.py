"""Diagnose one clinical note: a ranked differential with linked ontology ids, and the model's reasoning.

  python -m raredx_jax.diagnose --checkpoint=DIR --note=note.txt      (or the note on stdin)
  python -m raredx_jax.diagnose --checkpoint=DIR --note=note.txt --json

The note is sent to nothing but the local model; it is not logged. Works from an orbax checkpoint, a run
directory or an exported HF directory.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import app, flags, logging

def diagnose(model: Any, tokenizer: Any, note: str, linker: Any, top_k: int = 5, max_new_tokens: int = 256,
             temperature: float = 0.0, seed: int = 0, mesh: Any = None) -> dict[str, Any]:
    from raredx_jax.data.prompts import diagnosis_messages
    from raredx_jax.sampling.sampler import SamplingParams
    from raredx_jax.sampling.text import generate_text

    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
    comp = generate_text(model, tokenizer, [diagnosis_messages(note, top_k=top_k)], n=1, params=params,
                         seed=seed, mesh=mesh)[0][0]
    out = differential_from_completion(comp.text, linker)
    out["finish_reason"] = comp.finish_reason
    return out


def differential_from_completion(text: str, linker: Any) -> dict[str, Any]:
    """Parse a completion's <answer> list and link each entry to an ontology id (None when it links nowhere)."""
    from raredx_jax.rewards.diagnosis import link_entry, parse_answer

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


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax/absl chatter would bury the answer
    F = flags.FLAGS
    if not F.checkpoint:
        sys.exit("diagnose: --checkpoint is required")
    if F.note == "-":
        note = sys.stdin.read()
    elif not os.path.isfile(F.note):
        sys.exit(f"diagnose: --note: no such file {F.note!r}")
    else:
        with open(F.note, encoding="utf-8") as f:
            note = f.read()
    if not note.strip():
        sys.exit("diagnose: the note is empty")
    from ml_collections import ConfigDict

    from raredx_jax.data.hpo import load_ontology
    from raredx_jax.data.linking import DiseaseLinker
    from raredx_jax.parallel.mesh import make_mesh
    from raredx_jax.policy import load_policy

    ontology = load_ontology()
    diseases = ontology.diseases() if F.candidates == "all" else [
        ontology.disease(d.strip()) for d in F.candidates.split(",") if d.strip()]
    try:
        mesh = make_mesh(ConfigDict({"data": 1, "fsdp": -1, "tensor": 1}))
        model, tokenizer = load_policy(F.checkpoint, mesh, tokenizer_dir=F.tokenizer)
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"diagnose: error: {e}")
    out = diagnose(model, tokenizer, note, DiseaseLinker(diseases), F.top_k, F.max_new_tokens, F.temperature,
                   F.seed, mesh)
    if F.json:
        print(json.dumps(out, indent=2))
        return
    print("Differential diagnosis:")
    if not out["differential"]:
        print("  (the model gave no parseable differential)")
    for d in out["differential"]:
        link = f"{d['id']} {d['name']}" if d["id"] else "not linked to an ontology id"
        print(f"  {d['rank']}. {d['text']}  [{link}]")
    print("\nReasoning:\n" + (out["reasoning"].strip() or "(none)"))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
