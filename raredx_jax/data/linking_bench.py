"""Measure the disease linker's fuzzy matchers ("builtin" vs "rapidfuzz") on the same perturbed answers.

Why: the linker grades every answer the model writes (GRPO reward, evaluation), so a matcher is only worth
swapping if it links a model's misspelt / reordered / abbreviated disease names at least as often to the right
id, links unrelated medical phrases no more often, and is not slower. Inputs come from the shipped ontology
(hpo3 names and synonyms), perturbed the way model answers are, with a fixed seed:

  exact          the name or synonym as written
  typo-insert / typo-delete / typo-swap   one inserted / deleted letter, two neighbouring letters swapped,
                 inside a word of >= 5 letters
  two-typos      two of the above in different places
  word-order     OMIM's inverted "Head, modifier" order undone, or two neighbouring words swapped
  drop-number    a subtype number dropped ("Bardet-Biedl syndrome 2" -> "Bardet-Biedl syndrome"): any disease
                 of that family is a fair answer
  abbreviation   the abbreviation the ontology gives ("...; MFS", or an all-capitals synonym)
  order+typo     word-order then one typo

Right = the top hit is the disease, or another disease owning the same string (the same words in any order for
word-order). Negatives: HPO phenotype labels that no disease owns as a name (near-negatives: medical phrases
that look like disease names) and names with a subtype number that does not exist ("... 1002"); a false link is
any hit at the linker's threshold. Time is wall time per ``link`` call on one core, with the normaliser's cache
cleared per matcher and the fuzzy index built before timing (its build time is shown apart).

    python -m raredx_jax.data.linking_bench [--diseases 400] [--seed 0] [--matchers builtin,rapidfuzz]
"""
from __future__ import annotations

import argparse
import random
import re
import time
from collections.abc import Callable, Sequence

from raredx_jax.data.hpo import Disease, Ontology, load_ontology
from raredx_jax.data.linking import FUZZY_MATCHERS, LOOSE_STOP_WORDS, DiseaseLinker, normalize_tokens

_WORD = re.compile(r"[A-Za-z]{5,}")
_ROMAN_WORD = re.compile(r"[IVXivx]+")
_ABBR = re.compile(r"^[A-Z][A-Z0-9-]{1,9}$")
_PAREN_ABBR = re.compile(r"\(([^()]+)\)")
_NUMBER = re.compile(r"(,?\s+(?:type\s+)?)(\d{1,3}[A-Z]?|[IVX]{1,5}[A-Z]?)$", re.IGNORECASE)


def _typo(s: str, r: random.Random, kind: str) -> str | None:
    spans = [m for m in _WORD.finditer(s) if not _ROMAN_WORD.fullmatch(m.group())]
    if not spans:
        return None
    m = r.choice(spans)
    w, i = m.group(), r.randrange(1, len(m.group()) - 1)
    if kind == "insert":
        nw = w[:i] + r.choice("abcdefghijklmnopqrstuvwxyz") + w[i:]
    elif kind == "delete":
        nw = w[:i] + w[i + 1:]
    else:
        nw = w[:i] + w[i + 1] + w[i] + w[i + 2:]
    return s[:m.start()] + nw + s[m.end():] if nw != w else None


def _two_typos(s: str, r: random.Random) -> str | None:
    once = _typo(s, r, r.choice(("insert", "delete", "swap")))
    return _typo(once, r, r.choice(("insert", "delete", "swap"))) if once else None


def _word_order(s: str, r: random.Random) -> str | None:
    if "," in s:
        parts = [p.strip() for p in s.split(",") if p.strip()]
        out = " ".join(parts[1:] + parts[:1])  # "Epilepsy, early-onset, 3" -> "early-onset 3 Epilepsy"
    else:
        w = s.split()
        if len(w) < 2:
            return None
        i = r.randrange(len(w) - 1)
        w[i], w[i + 1] = w[i + 1], w[i]
        out = " ".join(w)
    return out if out != s else None


def _drop_number(s: str, r: random.Random) -> str | None:
    m = _NUMBER.search(s)
    if not m or (m.group(2).upper() == "X" and "type" not in m.group(1).lower()):
        return None  # a trailing lone "X" is the chromosome ("Fragile X"), not a subtype
    out = s[:m.start()].rstrip(" ,")
    return out if out and out != s else None


def _order_typo(s: str, r: random.Random) -> str | None:
    o = _word_order(s, r)
    return _typo(o, r, r.choice(("insert", "delete", "swap"))) if o else None


PERTURBATIONS: dict[str, Callable[[str, random.Random], str | None]] = {
    "exact": lambda s, r: s,
    "typo-insert": lambda s, r: _typo(s, r, "insert"),
    "typo-delete": lambda s, r: _typo(s, r, "delete"),
    "typo-swap": lambda s, r: _typo(s, r, "swap"),
    "two-typos": _two_typos,
    "word-order": _word_order,
    "drop-number": _drop_number,
    "order+typo": _order_typo,
}


def _abbreviations(d: Disease) -> list[str]:
    """The abbreviations the ontology gives for a disease: OMIM's "NAME; ABBR" parts and all-capitals synonyms."""
    out = []
    for text in (d.name, *d.synonyms):
        parts = [p.strip() for p in text.split(";")]
        out += [p for p in parts[1:] if _ABBR.match(p)]
        out += [a for a in _PAREN_ABBR.findall(text) if _ABBR.match(a)]
        if len(parts) == 1 and _ABBR.match(text.strip()):
            out.append(text.strip())
    return sorted(set(out))


def _family_key(text: str) -> str:
    """A name without its subtype markers and generic words: the family a subtype-less mention names."""
    toks = [t for t in normalize_tokens(text) if not (t.isdigit() or len(t) == 1) and t not in LOOSE_STOP_WORDS]
    return " ".join(sorted(toks))


def build_inputs(ontology: Ontology, n_diseases: int, seed: int) -> tuple[dict[str, list[tuple[str, set[str]]]],
                                                                           dict[str, list[str]]]:
    """Positives {kind: [(mention, fair ids)]} and negatives {kind: [mention]}, seeded."""
    diseases = ontology.diseases()
    ref = DiseaseLinker(diseases)  # only its exact-owner tables (``owners``) are used here
    family: dict[str, set[str]] = {}
    for d in diseases:
        for s in (d.name, *d.synonyms):
            family.setdefault(_family_key(s), set()).add(d.id)
    r = random.Random(seed)
    sample = r.sample(diseases, n_diseases)
    numbered = r.sample([d for d in diseases if _NUMBER.search(d.name)], n_diseases)
    pos: dict[str, list[tuple[str, set[str]]]] = {k: [] for k in (*PERTURBATIONS, "abbreviation")}
    for kind, f in PERTURBATIONS.items():
        kr = random.Random(f"{seed}-{kind}")
        for d in (numbered if kind == "drop-number" else sample):
            for s in (d.name, *d.synonyms[:2]):
                p = f(s, kr)
                if p is None:
                    continue
                fair = {d.id} | ref.owners(s) | ref.owners(p)
                if kind in ("word-order", "order+typo"):
                    fair |= ref.owners(s, any_order=True)
                if kind == "drop-number":
                    fair |= family.get(_family_key(p), set()) | ref.owners(p, any_order=True)
                pos[kind].append((p, fair))
    abbreviated = [(d, a) for d in diseases for a in _abbreviations(d)]  # few: all of them, up to n_diseases
    for d, a in random.Random(f"{seed}-abbreviation").sample(abbreviated, min(n_diseases, len(abbreviated))):
        pos["abbreviation"].append((a, {d.id} | ref.owners(a)))
    labels = sorted({ontology.label(p.hpo_id) for d in diseases for p in d.phenotypes})
    labels = [lab for lab in labels if not ref.owners(lab) and not ref.owners(lab, any_order=True)]
    neg = {"hpo-label": random.Random(f"{seed}-labels").sample(labels, min(1000, len(labels))),
           "wrong-subtype": []}
    for d in sample + numbered:
        m = re.fullmatch(r"(.*\D)(\d+)", d.name)
        if m:
            neg["wrong-subtype"].append(f"{m.group(1)}{int(m.group(2)) + 1000}")
    return pos, neg


def measure(diseases: Sequence[Disease], matcher: str, pos: dict, neg: dict) -> dict:
    """Accuracy per positive kind, false-link rate per negative kind, ms per lookup, fuzzy index build s."""
    normalize_tokens.cache_clear()
    linker = DiseaseLinker(diseases, fuzzy=matcher)
    t0 = time.perf_counter()
    linker.link("marfn syndrom")  # builds the fuzzy index (lazy) so lookups are timed without it
    build_s = time.perf_counter() - t0
    out: dict = {"build_s": build_s, "acc": {}, "wrong": {}, "false": {}, "ms": {}, "n": {}}
    for kind, items in pos.items():
        t0 = time.perf_counter()
        got = [linker.best(m) for m, _ in items]
        out["ms"][kind] = 1e3 * (time.perf_counter() - t0) / max(len(items), 1)
        out["acc"][kind] = sum(g in fair for g, (_, fair) in zip(got, items)) / max(len(items), 1)
        out["wrong"][kind] = sum(g is not None and g not in fair for g, (_, fair) in zip(got, items)) / max(
            len(items), 1)
        out["n"][kind] = len(items)
    for kind, items in neg.items():
        t0 = time.perf_counter()
        got = [linker.best(m) for m in items]
        out["ms"][kind] = 1e3 * (time.perf_counter() - t0) / max(len(items), 1)
        out["false"][kind] = sum(g is not None for g in got) / max(len(items), 1)
        out["n"][kind] = len(items)
    return out


def table(results: dict[str, dict]) -> str:
    """A markdown table, one row per input kind, accuracy / false-link rate and ms per lookup per matcher."""
    names = list(results)
    first = results[names[0]]
    head = "| input | n | " + " | ".join(f"{m}: right top-1 (wrong id) | {m}: ms/lookup" for m in names) + " |"
    rows = [head, "|" + "---|" * (2 + 2 * len(names))]
    for kind in first["acc"]:
        rows.append(f"| {kind} | {first['n'][kind]} | " + " | ".join(
            f"{results[m]['acc'][kind]:.3f} ({results[m]['wrong'][kind]:.3f}) | {results[m]['ms'][kind]:.2f}"
            for m in names) + " |")
    for kind in first["false"]:
        rows.append(f"| negatives: {kind} (false-link rate) | {first['n'][kind]} | " + " | ".join(
            f"{results[m]['false'][kind]:.3f} | {results[m]['ms'][kind]:.2f}" for m in names) + " |")
    rows.append("| fuzzy index build (s, once) | | " + " | ".join(
        f"{results[m]['build_s']:.2f} | " for m in names) + " |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m raredx_jax.data.linking_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--diseases", type=int, default=400, help="diseases sampled (and as many with a subtype number)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--matchers", default=",".join(FUZZY_MATCHERS), help="comma-separated fuzzy matchers")
    args = ap.parse_args(argv)
    matchers = [m.strip() for m in args.matchers.split(",") if m.strip()]
    bad = [m for m in matchers if m not in FUZZY_MATCHERS]
    if bad:
        ap.error(f"--matchers: unknown {', '.join(bad)} (known: {', '.join(FUZZY_MATCHERS)})")
    ontology = load_ontology()
    pos, neg = build_inputs(ontology, args.diseases, args.seed)
    diseases = ontology.diseases()
    results = {m: measure(diseases, m, pos, neg) for m in matchers}
    print(f"{len(diseases)} diseases, {args.diseases}+{args.diseases} sampled, seed {args.seed}, threshold "
          f"{DiseaseLinker([]).fuzzy_threshold}")
    print(table(results))


if __name__ == "__main__":
    main()
