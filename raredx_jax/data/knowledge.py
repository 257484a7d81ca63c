"""The rare-disease knowledge corpus to internalise (stage 1), and held-out probes that measure it was learned.

Facts come only from the ontology (names, synonyms, ids, phenotypes with frequencies, onset, inheritance,
genes, and contrasts between diseases of the set that share findings). Each fact is said through several
templates and paraphrases, with a different random subset of findings per passage, so the model learns the
facts rather than one sentence shape. The probe uses question templates that never occur in training, so a
good probe score means knowledge, not template recall.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Callable, Sequence

import numpy as np

from raredx_jax.data.hpo import Disease, Ontology, PhenotypeAnnotation
from raredx_jax.data.prompts import diagnosis_messages, format_completion, reflection_messages
from raredx_jax.data.simulate import UnrenderableError, simulate_case

Record = dict


def _rng(seed: int, disease_id: str, what: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}|{disease_id}|{what}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _join(items: Sequence[str], conj: str = "and") -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {conj} " + items[-1]


def _low(s: str) -> str:
    return s if len(s) > 1 and (s[1].isupper() or s[1].isdigit()) else s[:1].lower() + s[1:]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# --- facts as phrases ----------------------------------------------------------------------------------


def inheritance_words(disease: Disease, ontology: Ontology) -> list[str]:
    """'autosomal dominant', 'X-linked recessive', ... (labels minus the word 'inheritance')."""
    out = []
    for h in disease.inheritance:
        label = ontology.label(h).replace(" inheritance", "")
        out.append(label if label.startswith("X-") or label.startswith("Y-") else _low(label))
    return out


def onset_words(disease: Disease, ontology: Ontology) -> list[str]:
    """'congenital', 'childhood', 'adult', ... (labels minus the word 'onset')."""
    return [_low(ontology.label(h).replace(" onset", "")) for h in disease.onset]


def frequency_phrase(p: PhenotypeAnnotation, rng: np.random.Generator) -> str:
    """How often a finding occurs, in words (and sometimes a percentage)."""
    if p.frequency is None:
        return ""
    pct = int(round(100 * p.frequency))
    word = {"obligate": "always present", "very frequent": "very frequent", "frequent": "frequent",
            "occasional": "occasional", "very rare": "very rare", "excluded": "not a feature"}[p.frequency_label]
    if p.frequency_label in ("obligate", "excluded") or rng.random() < 0.5:
        return word
    return f"{word}, about {pct}% of patients"


def _ranked(disease: Disease, rng: np.random.Generator, k: int) -> list[PhenotypeAnnotation]:
    """k findings, favouring frequent ones but varying across calls (unknown frequency counts as 0.5)."""
    ph = [p for p in disease.phenotypes if p.frequency != 0.0]
    if not ph:
        return []
    w = np.array([p.expected_frequency for p in ph]) + 0.05
    idx = rng.choice(len(ph), size=min(k, len(ph)), replace=False, p=w / w.sum())
    return sorted((ph[i] for i in idx), key=lambda p: -p.expected_frequency)


def _id_phrase(disease: Disease) -> str:
    prefix, _, num = disease.id.partition(":")
    return f"OMIM {num}" if prefix == "OMIM" else f"Orphanet ORPHA:{num}"


# --- contrasts between diseases of the set -------------------------------------------------------------


def disease_neighbours(diseases: Sequence[Disease]) -> dict[str, list[tuple[str, set[str]]]]:
    """For each disease, the others sharing the most findings (by HPO id), with the shared ids."""
    by_term: dict[str, set[str]] = defaultdict(set)
    terms = {d.id: {p.hpo_id for p in d.phenotypes} for d in diseases}
    for did, ts in terms.items():
        for t in ts:
            by_term[t].add(did)
    out = {}
    for did, ts in terms.items():
        shared: dict[str, set[str]] = defaultdict(set)
        for t in ts:
            for other in by_term[t] - {did}:
                shared[other].add(t)
        ranked = sorted(shared.items(), key=lambda kv: (-len(kv[1]) / len(terms[kv[0]] | ts), kv[0]))
        out[did] = [(o, s) for o, s in ranked[:3]]
    return out


# --- passage templates ---------------------------------------------------------------------------------


def _p_overview(d: Disease, o: Ontology, rng: np.random.Generator, ctx: dict) -> str:
    inh, ons = inheritance_words(d, o), onset_words(d, o)
    ph = _ranked(d, rng, 6)
    s = [f"{d.name} ({d.id}) is a rare disorder" + (f" with {_join(inh, 'or')} inheritance." if inh else ".")]
    if d.synonyms:
        stem = _pick(rng, ["It is also known as", "Other names include", "Synonyms:"])
        s.append(f"{stem} {_join(d.synonyms, 'or')}.")
    if ons:
        s.append(f"Onset is typically {_join(ons, 'or')}.")
    if ph:
        s.append(_pick(rng, ["Characteristic features are", "Patients typically show", "The clinical picture includes"])
                 + " " + _join([_low(p.label) for p in ph]) + ".")
    if d.genes:
        s.append(f"Associated gene{'s' if len(d.genes) > 1 else ''}: {', '.join(d.genes[:6])}.")
    return " ".join(s)


def _p_feature_list(d: Disease, o: Ontology, rng: np.random.Generator, ctx: dict) -> str:
    ph = _ranked(d, rng, 10)
    head = _pick(rng, [f"Clinical features of {d.name}:", f"{d.name} - phenotype summary:",
                       f"Findings reported in {d.name} ({d.id}):"])
    lines = []
    for p in ph:
        f = frequency_phrase(p, rng)
        lines.append(f"- {p.label}" + (f" ({f})" if f else ""))
    return head + "\n" + "\n".join(lines)


def _p_frequencies(d: Disease, o: Ontology, rng: np.random.Generator, ctx: dict) -> str:
    ph = [p for p in _ranked(d, rng, 8) if p.frequency is not None] or _ranked(d, rng, 5)
    s = []
    for p in ph:
        f = frequency_phrase(p, rng)
        if f:
            s.append(_pick(rng, [f"In {d.name}, {_low(p.label)} is {f}.",
                                 f"{_cap(_low(p.label))} is {f} in {d.name}.",
                                 f"Among patients with {d.name}, {_low(p.label)} is {f}."]))
        else:
            s.append(f"{_cap(_low(p.label))} has been reported in {d.name}.")
    return " ".join(s)


def _p_contrast(d: Disease, o: Ontology, rng: np.random.Generator, ctx: dict) -> str:
    neigh = ctx["neighbours"].get(d.id, [])
    if not neigh:
        return _p_overview(d, o, rng, ctx)
    other_id, shared = neigh[int(rng.integers(len(neigh)))]
    other = ctx["by_id"][other_id]
    mine = {p.hpo_id for p in d.phenotypes}
    theirs = {p.hpo_id for p in other.phenotypes}
    sh = [o.label(h) for h in sorted(shared)][:4]
    own = [_low(p.label) for p in _ranked(d, rng, 8) if p.hpo_id not in theirs][:3]
    oth = [_low(p.label) for p in _ranked(other, rng, 8) if p.hpo_id not in mine][:3]
    s = [f"{d.name} and {other.name} share {_join([_low(x) for x in sh])}."]
    if own:
        tail = f", whereas {other.name} shows {_join(oth)}." if oth else "."
        s.append(f"{d.name} is distinguished by {_join(own)}{tail}")
    inh_a, inh_b = inheritance_words(d, o), inheritance_words(other, o)
    if inh_a and inh_b and inh_a != inh_b:
        s.append(f"{d.name} is {_join(inh_a, 'or')}, while {other.name} is {_join(inh_b, 'or')}.")
    return " ".join(s)


def _p_teaching(d: Disease, o: Ontology, rng: np.random.Generator, ctx: dict) -> str:
    ph = _ranked(d, rng, 5)
    inh, ons = inheritance_words(d, o), onset_words(d, o)
    verb = _pick(rng, ["Consider", "Think of", "Suspect"])
    s = [f"{verb} {d.name} in a patient with {_join([_low(p.label) for p in ph])}."]
    if ons:
        s.append(f"Symptoms usually begin with {_join(ons, 'or')} onset.")
    if inh:
        s.append(f"The condition follows {_join(inh, 'or')} inheritance" +
                 (f" and is caused by variants in {_join(d.genes[:3], 'or')}." if d.genes else "."))
    elif d.genes:
        s.append(f"It is caused by variants in {_join(d.genes[:3], 'or')}.")
    return " ".join(s)


def _p_nomenclature(d: Disease, o: Ontology, rng: np.random.Generator, ctx: dict) -> str:
    s = [f"{d.name} is catalogued as {_id_phrase(d)} ({d.id})."]
    if d.synonyms:
        s.append(f"Alternative names: {'; '.join(d.synonyms)}.")
    if d.genes:
        s.append(f"Gene{'s' if len(d.genes) > 1 else ''}: {', '.join(d.genes[:6])}.")
    inh = inheritance_words(d, o)
    if inh:
        s.append(f"Mode of inheritance: {_join(inh, 'or')}.")
    ph = _ranked(d, rng, 4)
    if ph:
        s.append(f"Key findings: {'; '.join(_low(p.label) for p in ph)}.")
    return " ".join(s)


def _p_lay(d: Disease, o: Ontology, rng: np.random.Generator, ctx: dict) -> str:
    ph = _ranked(d, rng, 5)
    words = []
    for p in ph:
        t = o.term(p.hpo_id)
        words.append(_low(t.lay_synonyms[0]) if t.lay_synonyms else _low(p.label))
    ons = onset_words(d, o)
    s = [f"{d.name} is a rare condition."]
    if ons:
        s.append(f"It usually starts with {_join(ons, 'or')} onset.")
    s.append(f"People with {d.name} often have {_join(words)}.")
    return " ".join(s)


PASSAGE_TEMPLATES: dict[str, Callable] = {
    "overview": _p_overview, "feature_list": _p_feature_list, "frequencies": _p_frequencies,
    "contrast": _p_contrast, "teaching": _p_teaching, "nomenclature": _p_nomenclature, "lay": _p_lay,
}


# --- Q&A templates (training phrasings) ----------------------------------------------------------------


def _qa_items(d: Disease, o: Ontology, rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(template name, question, answer) candidates for one disease."""
    items = []
    ph = _ranked(d, rng, 4)
    if ph:
        q = _pick(rng, ["Which disease presents with {f}?", "A patient has {f}. Which rare disease fits?",
                        "What rare disorder is characterised by {f}?"])
        items.append(("findings_to_disease", q.format(f=_join([_low(p.label) for p in ph])), f"{d.name} ({d.id})"))
    ph = _ranked(d, rng, 6)
    if ph:
        q = _pick(rng, [f"List typical findings of {d.name}.", f"What are the main clinical features of {d.name}?"])
        a = f"Typical findings of {d.name} include " + _join(
            [_low(p.label) + (f" ({p.frequency_label})" if p.frequency_label else "") for p in ph]) + "."
        items.append(("disease_to_findings", q, a))
    inh = inheritance_words(d, o)
    if inh:
        q = _pick(rng, [f"What is the inheritance of {d.name}?", f"How is {d.name} inherited?"])
        items.append(("inheritance", q, f"{d.name} follows {_join(inh, 'or')} inheritance."))
    ons = onset_words(d, o)
    if ons:
        items.append(("onset", f"When does {d.name} usually begin?", f"Onset of {d.name} is {_join(ons, 'or')}."))
    if d.genes:
        items.append(("genes", f"Which gene is associated with {d.name}?",
                      f"{d.name} is associated with {_join(d.genes[:6])}."))
    items.append(("identifier", f"What is the identifier of {d.name}?", f"{d.name} is {d.id}."))
    if d.synonyms:
        items.append(("synonyms", f"What is another name for {d.name}?",
                      f"{d.name} is also called {_join(d.synonyms, 'or')}."))
    return items


EXEMPLAR_STYLES = ("note", "vignette")
EXEMPLAR_LEVELS = ("typical", "sparse", "noisy", "imprecise")  # note-style exemplars cycle these
MAX_CITED_FINDINGS = 6  # findings a worked reasoning quotes from its note


def _as_written(o: Ontology, hpo_id: str, text: str) -> str:
    """The finding in the note's own words: the longest of the term's label and synonyms that the note uses.

    Why: the simulator writes synonyms and lay terms; reasoning that quotes the note (rather than the HPO label)
    is what RERS's leak check counts as "mentions findings of the note", so the worked exemplars show it."""
    low = text.lower()
    term = o.term(hpo_id)
    used = [s for s in (term.label, *term.synonyms) if s and s.lower() in low]
    return _low(max(used, key=len)) if used else _low(term.label)


def _exemplar_case(d: Disease, o: Ontology, rng: np.random.Generator, style: str, index: int
                   ) -> tuple[str, list[str], list[PhenotypeAnnotation]] | None:
    """(case text, the findings a clinician would cite, their annotations) for a worked exemplar of `d`."""
    if style not in EXEMPLAR_STYLES:
        raise ValueError(f"data.knowledge_exemplar_style must be one of {EXEMPLAR_STYLES}, got {style!r}")
    by_hpo = {p.hpo_id: p for p in d.phenotypes}
    if style == "note":
        case = simulate_case(d, o, rng, EXEMPLAR_LEVELS[index % len(EXEMPLAR_LEVELS)])
        generalised = case.meta.get("generalised", {})
        ph = [by_hpo[h] for h in case.present_hpo if h in by_hpo]
        text = case.text
        broader = [(_as_written(o, g, text), f" (a broader term for {_low(o.label(h))})")
                   for g, h in generalised.items() if g in case.present_hpo][:2]
        # cited in the order the note states them, in its words: the reasoning starts by copying the note, a
        # skill that needs no knowledge of the answer (sorted by disease frequency, the tiny model learned to
        # recite the findings of the disease it guessed instead, and RERS's leak check rejected every reflection)
        cited = [(_as_written(o, p.hpo_id, text), "") for p in ph] + broader
        low = text.lower()
        cited.sort(key=lambda c: (low.find(c[0].lower()) % (len(low) + 1), c[0]))
        findings = [w + note for w, note in cited[:MAX_CITED_FINDINGS]]
        ph = sorted(ph, key=lambda p: -p.expected_frequency)[:5]
        if len(ph) + len(broader) < 2:
            return None
        return text, findings, ph
    ph = _ranked(d, rng, int(rng.integers(3, 6)))
    if len(ph) < 2:
        return None
    findings = [_low(p.label) for p in ph]
    text = _pick(rng, ["A patient presents with {f}.", "Findings: {f}.",
                       "The patient has {f}."]).format(f=_join(findings))
    return text, findings, ph


def _reasoning(name: str, findings: Sequence[str], ph: Sequence[PhenotypeAnnotation], rng: np.random.Generator,
               contrast_with: str = "") -> str:
    """The exemplar's reasoning: the findings, what the ontology says of the top ones, a contrast, the conclusion."""
    details = []
    for p in ph[:3]:
        fp = frequency_phrase(p, rng)
        details.append(f"{_low(p.label)} is {fp} in {name}" if fp else f"{_low(p.label)} is reported in {name}")
    contrast = f" {contrast_with} shares some of these findings but fits the combination less well." \
        if contrast_with else ""
    return (f"Key findings: {_join(findings)}. " + ("; ".join(details) + "." if details else "") + contrast +
            f" Together these findings point to {name}.")


def _differential(d: Disease, ctx: dict) -> list[str]:
    """The other diseases of the set sharing the most findings with `d` (a clinician's differential)."""
    return [ctx["by_id"][o_id].name for o_id, _ in ctx["neighbours"].get(d.id, []) if o_id in ctx["by_id"]]


def _exemplar(d: Disease, o: Ontology, rng: np.random.Generator, ctx: dict, style: str = "note",
              index: int = 0) -> tuple[list[dict], str] | None:
    """Disease knowledge in the diagnostic answer format: a case -> reasoning + ranked differential.

    Why: a model trained from scratch (the embedded tiny default) has never seen the `<think>/<answer>` format
    that RERS verifies, nor a clinical note, so knowledge internalization also states "these findings ->
    this disease" in that format, like the worked cases of a textbook. `style="note"` writes the case as a
    clinical note rendered by the note simulator (`data/simulate.py`, levels cycled over `index`, drawn from
    this corpus's own seed, never the case splits'); `style="vignette"` as one short sentence of findings.
    The reasoning is a fact template over the HPO annotations (frequencies, contrasts), not a case rationale;
    the differential lists diseases of the set that share findings, as a clinician's list would.
    """

    case = _exemplar_case(d, o, rng, style, index)
    if case is None:
        return None
    text, findings, ph = case
    others = _differential(d, ctx)
    reasoning = _reasoning(d.name, findings, ph, rng, others[0] if others else "")
    return diagnosis_messages(text), format_completion(reasoning, [d.name, *others[:2]])


def _reflection_exemplar(d: Disease, o: Ontology, rng: np.random.Generator, ctx: dict, index: int = 0
                         ) -> tuple[list[dict], str] | None:
    """A worked RERS reflection: note + a failed attempt (a look-alike disease first) + the label -> reasoning.

    Why: RERS's reflection round asks the policy to reason again towards a diagnosis it was told, from the
    note's findings and without citing the hint. A pretrained instruction model can follow that prompt; a model
    trained from scratch (the embedded tiny default) has never seen it and breaks the answer format (measured:
    3 right of 188 reflection samples). These items teach the prompt's contract from the ontology alone: the
    failed attempt ranks a disease of the set that shares findings first (the gold second or absent), and the
    target is the exemplar reasoning for the gold that names the look-alike as fitting less well. Cases are
    simulated from this corpus's own seed, never the case splits'.
    """

    case = _exemplar_case(d, o, rng, "note", index)
    others = _differential(d, ctx)
    if case is None or not others:
        return None
    text, findings, ph = case
    wrong = ctx["by_id"][ctx["neighbours"][d.id][0][0]]
    # the failed attempt as a failing policy writes it: one finding of the note, then the look-alike's own
    # frequent findings recited from memory (absent from the note), so the target has to go back to the note
    gold_ids, low = {p.hpo_id for p in d.phenotypes}, text.lower()
    recited = [p for p in sorted(wrong.phenotypes, key=lambda p: -p.expected_frequency)
               if p.hpo_id not in gold_ids and _as_written(o, p.hpo_id, text).lower() not in low][:2]
    wrong_ph = recited or list(wrong.phenotypes[:2])
    wrong_findings = findings[:1] + [_low(p.label) for p in recited]
    ranked_wrong = [wrong.name] + ([d.name] if rng.random() < 0.5 else []) + \
        [n for n in _differential(wrong, ctx) if n != d.name][:1]
    attempt = format_completion(_reasoning(wrong.name, wrong_findings, wrong_ph, rng), ranked_wrong)
    reasoning = _reasoning(d.name, findings, ph, rng, wrong.name)
    return (reflection_messages(text, attempt, d.name),
            format_completion(reasoning, [d.name, *[n for n in others if n != wrong.name][:1], wrong.name]))


def knowledge_records(diseases: Sequence[Disease], ontology: Ontology, seed: int,
                      passages_per_disease: int, exemplars_per_disease: int = 3,
                      exemplar_style: str = "note", reflection_exemplars_per_disease: int = 0,
                      on_unrenderable: Callable[[Disease, Exception], None] | None = None,
                      ctx_diseases: Sequence[Disease] | None = None) -> list[Record]:
    """SFT records per disease: about half passages (prompt "", templates cycled) and half Q&A (chat prompt).

    A record is {"prompt": "" or [{"role": "user", "content": q}], "completion": str, "disease_id", "kind",
    "template"}. Deterministic for (seed, disease set). With `on_unrenderable`, a disease whose worked cases
    the note simulator cannot write (`simulate.UnrenderableError`) gets no records and is passed to it (the
    caller drops it from the disease set: the other diseases' contrast passages depend on that set); without,
    the error propagates. `ctx_diseases` (default `diseases`): the set the neighbours (contrast passages,
    differentials) are drawn from; a disease's records depend only on (seed, the disease, its neighbours in it).
    """
    if passages_per_disease < 1:
        raise ValueError(f"data.knowledge_passages_per_disease must be >= 1, got {passages_per_disease}")
    for field, n in (("knowledge_exemplars_per_disease", exemplars_per_disease),
                     ("knowledge_reflection_exemplars_per_disease", reflection_exemplars_per_disease)):
        if n < 0:
            raise ValueError(f"data.{field} must be >= 0, got {n}")
    ctx_set = diseases if ctx_diseases is None else ctx_diseases
    ctx = {"neighbours": disease_neighbours(ctx_set), "by_id": {d.id: d for d in ctx_set}}
    names = list(PASSAGE_TEMPLATES)
    out: list[Record] = []
    for d in diseases:
        start_len = len(out)
        try:
            _disease_records(d, ontology, seed, passages_per_disease, exemplars_per_disease, exemplar_style,
                             reflection_exemplars_per_disease, ctx, names, out)
        except UnrenderableError as e:
            if on_unrenderable is None:
                raise
            del out[start_len:]
            on_unrenderable(d, e)
    return out


def _disease_records(d: Disease, ontology: Ontology, seed: int, passages_per_disease: int,
                     exemplars_per_disease: int, exemplar_style: str, reflection_exemplars_per_disease: int,
                     ctx: dict, names: list[str], out: list[Record]) -> None:
    """Appends one disease's knowledge records to `out` (the body of `knowledge_records`' loop)."""
    rng = _rng(seed, d.id, "knowledge")
    n_pass = max(1, (passages_per_disease + 1) // 2)
    start = int(rng.integers(len(names)))
    for i in range(n_pass):
        name = names[(start + i) % len(names)]
        out.append({"prompt": "", "completion": PASSAGE_TEMPLATES[name](d, ontology, rng, ctx),
                    "disease_id": d.id, "kind": "passage", "template": name})
    qa: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for _ in range(10):  # fresh draws vary the findings; repeats only when a disease has few facts
        qa.extend(item for item in _qa_items(d, ontology, rng) if item[1] not in seen and not seen.add(item[1]))
        if len(qa) >= passages_per_disease - n_pass:
            break
    while qa and len(qa) < passages_per_disease - n_pass:
        qa.append(qa[len(qa) % len(seen)])
    for name, q, a in qa[: passages_per_disease - n_pass]:
        out.append({"prompt": [{"role": "user", "content": q}], "completion": a,
                    "disease_id": d.id, "kind": "qa", "template": name})
    for j in range(exemplars_per_disease):
        ex = _exemplar(d, ontology, rng, ctx, exemplar_style, j)
        if ex is not None:
            out.append({"prompt": ex[0], "completion": ex[1], "disease_id": d.id, "kind": "exemplar",
                        "template": "diagnostic_exemplar"})
    rrng = _rng(seed, d.id, "reflection")  # its own stream: adding these leaves the other records unchanged
    for j in range(reflection_exemplars_per_disease):
        ex = _reflection_exemplar(d, ontology, rrng, ctx, j)
        if ex is not None:
            out.append({"prompt": ex[0], "completion": ex[1], "disease_id": d.id, "kind": "reflection_exemplar",
                        "template": "reflection_exemplar"})


# --- held-out probes -----------------------------------------------------------------------------------

PROBE_TEMPLATES = (
    "A clinician records these findings in one patient: {f}. Name the single most likely rare disease.",
    "Findings: {f}. Give the most probable diagnosis (one rare disease).",
    "Which rare condition best explains the combination of {f}? Answer with the disease name.",
)
TRAINING_QUESTION_STEMS = ("Which disease presents with", "A patient has", "What rare disorder is characterised by")


def knowledge_probe(diseases: Sequence[Disease], ontology: Ontology, seed: int, n: int) -> list[dict]:
    """n probe items {"messages", "answer_id"}, round-robin over diseases, in phrasings unseen in training.

    Findings are the disease's frequent terms given in semicolon lists, so the item tests recall of the
    disease from its phenotype, the skill the diagnosis stages build on.
    """
    if n < 0:
        raise ValueError(f"probe size n must be >= 0, got {n}")
    out = []
    for i in range(n):
        if not diseases:
            break
        d = diseases[i % len(diseases)]
        rng = _rng(seed, d.id, f"probe{i}")
        ph = _ranked(d, rng, 5)
        q = PROBE_TEMPLATES[int(rng.integers(len(PROBE_TEMPLATES)))].format(f="; ".join(_low(p.label) for p in ph))
        out.append({"messages": [{"role": "user", "content": q}], "answer_id": d.id})
    return out
