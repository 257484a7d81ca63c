"""Every prompt template in one place: open-domain diagnosis, closed-set diagnosis, RERS reflection.

The output contract the rewards parse is: reasoning inside <think>...</think>, then a ranked differential
inside <answer> with one numbered line per disease ("1. Name"). `format_completion` writes exactly that, so
SFT targets, RERS trajectories and the reward parser agree on one format.
"""
from __future__ import annotations

from typing import Sequence

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

SYSTEM_PROMPT = (
    "You are an expert clinical geneticist specialising in rare diseases. Read the clinical note, reason "
    "step by step from the patient's findings (and the findings that are absent), then give a ranked "
    "differential diagnosis. Put your reasoning inside <think> and </think>, then the ranked list inside "
    "<answer> and </answer>, one disease per line as '1. Disease name', most likely first."
)

_DIAGNOSIS = (
    "Clinical note:\n{note}\n\n"
    "What is the most likely rare disease? Think through the key findings inside <think></think>, then give "
    "your top {k} differential diagnoses, most likely first, inside <answer></answer> as a numbered list "
    "(1. ... 2. ...)."
)

_CLOSED_SET = (
    "Clinical note:\n{note}\n\n"
    "Candidate diagnoses:\n{candidates}\n\n"
    "Which candidate best explains this patient's findings? Reason inside <think></think>, then rank the "
    "candidates you consider plausible, most likely first, inside <answer></answer> as a numbered list "
    "(1. ... 2. ...). Use the candidate names exactly as written."
)

_REFLECTION = (
    "Clinical note:\n{note}\n\n"
    "A previous attempt at this case reasoned as follows and did not reach the correct diagnosis:\n"
    "---\n{attempt}\n---\n\n"
    "The correct diagnosis is: {gold}.\n\n"
    "Reason about the case again from the beginning, as if seeing it for the first time. Work only from the "
    "findings in the note (and the findings it says are absent), explain which of them point towards the "
    "correct diagnosis and why the alternatives fit less well, and reach it by that reasoning. Do not say "
    "or imply that you were told the answer, and do not refer to the previous attempt. Write the reasoning "
    "inside <think></think>, then the ranked differential, most likely first, inside <answer></answer> as a "
    "numbered list (1. ... 2. ...)."
)


def _check_note(note: str) -> None:
    if not isinstance(note, str) or not note.strip():
        raise ValueError("prompt: the clinical note is empty")


def diagnosis_messages(note: str, top_k: int = 5) -> list[dict]:
    """Open-domain diagnosis: system prompt + the note; asks for a top-k ranked differential."""
    _check_note(note)
    if top_k < 1:
        raise ValueError(f"prompt: top_k must be >= 1, got {top_k}")
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": _DIAGNOSIS.format(note=note.strip(), k=top_k)}]


def closed_set_messages(note: str, candidates: Sequence[str]) -> list[dict]:
    """Closed-set diagnosis (the easier curriculum task): choose among the given candidate names."""
    _check_note(note)
    cands = [c.strip() for c in candidates if c and c.strip()]
    if len(cands) < 2:
        raise ValueError(f"prompt: closed-set diagnosis needs at least 2 candidates, got {len(cands)}")
    listing = "\n".join(f"- {c}" for c in cands)
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": _CLOSED_SET.format(note=note.strip(), candidates=listing)}]


def reflection_messages(note: str, failed_attempt: str, gold_name: str) -> list[dict]:
    """RERS reflection: the note, the model's failed attempt and the correct LABEL only (no rationale).

    The regenerated trajectory is later re-attached to the original `diagnosis_messages` prompt, hence the
    instruction to reason from the findings without revealing that the answer was given.
    """
    _check_note(note)
    if not gold_name or not gold_name.strip():
        raise ValueError("prompt: reflection needs the gold diagnosis name")
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": _REFLECTION.format(note=note.strip(), attempt=(failed_attempt or "").strip(),
                                                           gold=gold_name.strip())}]


def format_completion(reasoning: str, ranked_names: Sequence[str]) -> str:
    """'<think>..</think>\\n<answer>\\n1. A\\n2. B\\n</answer>': the one output format everything agrees on."""
    names = [n.strip() for n in ranked_names if n and n.strip()]
    if not names:
        raise ValueError("format_completion: ranked_names is empty")
    lines = "".join(f"{i}. {n}\n" for i, n in enumerate(names, 1))
    return f"{THINK_OPEN}{reasoning.strip()}{THINK_CLOSE}\n{ANSWER_OPEN}\n{lines}{ANSWER_CLOSE}"
