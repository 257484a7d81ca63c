"""Simulated clinical notes: sampled phenotypes rendered as free text, with difficulty knobs for the curriculum.

A case is built in two steps so importers can reuse the second one:
1. `sample_findings`: which HPO terms the note states (by annotated frequency, with imprecision = ancestor
   terms, unrelated noise findings and explicitly absent findings), plus sex, age, onset and family history.
2. `render_note`: free text in one of several note styles using HPO labels, exact and layperson synonyms.

A note must never give the answer away: terms whose wording contains the disease name, a synonym or a
distinctive (eponymous) word of it are dropped before sampling, and `find_leaks` checks every finished note for
the name, synonyms and ids; a leaking note is re-rendered, and an impossible one raises.
Everything is driven by an explicit numpy Generator, so the same seed gives the same notes.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from collections import Counter
from typing import Callable, Sequence

import numpy as np

from raredx_jax.data.case import Case
from raredx_jax.data.hpo import Disease, Ontology

STYLES = ("hpi", "referral", "discharge", "clinic")
RENDER_TRIES = 5


@dataclasses.dataclass(frozen=True)
class DifficultyLevel:
    """Knobs that make a case easier or harder to diagnose (the task level of the curriculum)."""

    name: str
    frequency_sampling: bool = True  # include each annotated term with its frequency; else a uniform subset
    keep_fraction: float = 1.0  # then keep this fraction of the sampled disease terms
    min_terms: int = 4  # at least this many disease terms (topped up by frequency) ...
    max_terms: int = 12  # ... and at most this many (a uniform subset: keeps relative frequencies)
    imprecision: float = 0.0  # probability of replacing a kept term by a more general ancestor
    noise_terms: tuple[int, int] = (0, 0)  # inclusive range of unrelated present findings
    absent_terms: tuple[int, int] = (1, 3)  # inclusive range of explicitly absent findings
    give_onset: bool = True
    give_family_history: bool = True

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"difficulty level {self.name!r}: {field} {why}")

        if not 0.0 < self.keep_fraction <= 1.0:
            raise bad("keep_fraction", f"must be in (0, 1], got {self.keep_fraction}")
        if not 0.0 <= self.imprecision <= 1.0:
            raise bad("imprecision", f"must be in [0, 1], got {self.imprecision}")
        if not 1 <= self.min_terms <= self.max_terms:
            raise bad("min_terms/max_terms",
                      f"need 1 <= min_terms <= max_terms, got {self.min_terms}, {self.max_terms}")
        for field in ("noise_terms", "absent_terms"):
            lo, hi = getattr(self, field)
            if not 0 <= lo <= hi:
                raise bad(field, f"must be an inclusive range 0 <= lo <= hi, got {(lo, hi)}")


LEVELS: dict[str, DifficultyLevel] = {
    lv.name: lv
    for lv in (
        DifficultyLevel("typical"),
        DifficultyLevel("sparse", keep_fraction=0.4, min_terms=2, max_terms=4, absent_terms=(0, 1),
                        give_family_history=False),
        DifficultyLevel("noisy", noise_terms=(2, 4)),
        DifficultyLevel("imprecise", imprecision=0.5),
        DifficultyLevel("hard", keep_fraction=0.5, min_terms=2, max_terms=5, imprecision=0.3, noise_terms=(1, 3),
                        absent_terms=(0, 2), give_onset=False, give_family_history=False),
    )
}


def get_level(level: str | DifficultyLevel) -> DifficultyLevel:
    """A level by name (or pass one through); ValueError listing the known names."""
    if isinstance(level, DifficultyLevel):
        return level
    if level not in LEVELS:
        raise ValueError(f"unknown difficulty level {level!r}; known: {', '.join(LEVELS)}")
    return LEVELS[level]


# ---------------------------------------------------------------------------------------------------------
# leak guard


def normalise_text(text: str) -> str:
    """Lower-case, punctuation -> spaces, padded: substring tests on it are whole-word tests."""
    return " " + " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split()) + " "


def is_abbreviation(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Z0-9][A-Z0-9-]{1,7}", s)) and any(c.isalpha() for c in s)


@functools.lru_cache(maxsize=1)
def _label_vocabulary(ontology: Ontology) -> tuple[Counter, frozenset]:
    """Word counts over all HPO labels, and the set of single-word labels (to judge what is 'distinctive')."""
    words: Counter = Counter()
    single: set[str] = set()
    for num, label in ontology._labels.items():
        toks = normalise_text(label).split()
        words.update(set(toks))
        if len(toks) == 1:
            single.add(toks[0])
    return words, frozenset(single)


def distinctive_words(disease: Disease, ontology: Ontology) -> tuple[str, ...]:
    """Eponym-like words of the name ('Marfan', 'Shprintzen-Goldberg'): capitalised, rare in HPO labels, and
    not themselves a phenotype word (so 'Hypertriglyceridemia, familial' keeps its cardinal finding)."""
    words, single = _label_vocabulary(ontology)
    out = []
    for tok in re.findall(r"[A-Za-z][A-Za-z'-]+", re.sub(r"\(.*?\)", " ", disease.name)):
        low = tok.lower().strip("-'")
        if tok[0].isupper() and not tok.isupper() and len(low) >= 4 and low not in single:
            parts = [p for p in normalise_text(low).split() if len(p) >= 4]
            if parts and all(words[p] < 5 for p in parts):
                out.append(low)
    return tuple(dict.fromkeys(out))


def _id_patterns(disease_id: str) -> list[re.Pattern]:
    prefix, _, num = disease_id.partition(":")
    pats = [re.compile(rf"\b(?:{prefix}|orphanet|orpha|omim|mim)\s*[:#]?\s*{num}\b", re.I)]
    if len(num) >= 4:  # a bare short ORPHA number would collide with ages and counts
        pats.append(re.compile(rf"(?<![0-9]){num}(?![0-9])"))
    return pats


def find_leaks(text: str, disease: Disease, ontology: Ontology | None = None) -> list[str]:
    """What in `text` gives the diagnosis away: the name, a synonym, the id (and, with an ontology, a
    distinctive word of the name). Returns descriptions of the hits, never note text; [] when clean."""
    hits = []
    normed = normalise_text(text)
    for s in (disease.name, *disease.synonyms):
        if is_abbreviation(s):
            if re.search(rf"(?<![A-Za-z0-9]){re.escape(s)}(?![A-Za-z0-9])", text):
                hits.append(f"abbreviation {s!r}")
        elif len(normalise_text(s).strip()) >= 2 and normalise_text(s) in normed:
            hits.append(f"name/synonym {s!r}")
    for pat in _id_patterns(disease.id):
        if pat.search(text):
            hits.append(f"id {disease.id}")
            break
    if ontology is not None:
        for w in distinctive_words(disease, ontology):
            if re.search(rf"\b{re.escape(w)}", text, re.I):
                hits.append(f"distinctive word {w!r}")
    return hits


def forbidden_in(wording: str, forbidden: Sequence[str], distinctive: Sequence[str]) -> bool:
    normed = normalise_text(wording)
    for s in forbidden:
        if is_abbreviation(s):
            if re.search(rf"(?<![A-Za-z0-9]){re.escape(s)}(?![A-Za-z0-9])", wording):
                return True
        elif normalise_text(s).strip() and normalise_text(s) in normed:
            return True
    return any(re.search(rf"\b{re.escape(w)}", wording, re.I) for w in distinctive)


class UnrenderableError(ValueError):
    """The simulator cannot write a note for this disease without giving the diagnosis away (or at all).

    A ValueError (callers that caught that keep working) that names the disease, so a build can leave that one
    disease out and report it instead of ending.
    """

    def __init__(self, disease_id: str, message: str):
        super().__init__(f"{disease_id}: {message}")
        self.disease_id = disease_id


# Family-history sentences with no chance draw, tried in order when the drawn sentence itself would name the
# diagnosis (OMIM:260660 'Cousin syndrome' and "The parents are first cousins"): used only where every
# rendering with the drawn sentence leaked, so every note that rendered before is unchanged.
_NEUTRAL_FAMILY_HISTORY = ("There is no known family history of similar problems.",
                           "Family history is noncontributory.")


def usable_phenotypes(disease: Disease, ontology: Ontology) -> list:
    """The disease's annotations whose label does not leak the name (e.g. 'Marfanoid habitus' for Marfan)."""
    forbidden = (disease.name, *disease.synonyms)
    distinct = distinctive_words(disease, ontology)
    return [p for p in disease.phenotypes if not forbidden_in(p.label, forbidden, distinct)]


# ---------------------------------------------------------------------------------------------------------
# sampling findings


@dataclasses.dataclass(frozen=True)
class Findings:
    """What a note will state, before wording."""

    present: tuple[str, ...]  # HPO ids (disease terms, possibly generalised, plus noise)
    absent: tuple[str, ...]
    noise: tuple[str, ...]  # the subset of `present` unrelated to the disease
    generalised: dict  # ancestor id -> the annotated id it replaced
    sex: str
    age_years: float
    onset_hpo: str | None
    onset_years: float | None
    family_history: str | None  # a sentence or None


@functools.lru_cache(maxsize=1)
def _noise_pool(ontology: Ontology, min_diseases: int = 60) -> tuple[str, ...]:
    """Common, specific-enough phenotypes (annotated in many diseases): realistic incidental findings."""
    systems = ontology.organ_systems
    counts = ontology.phenotype_disease_counts
    return tuple(sorted(h for h, n in counts.items() if n >= min_diseases and h not in systems))


def _closure(ids: Sequence[str], ontology: Ontology) -> set[str]:
    out = set(ids)
    for h in ids:
        out.update(ontology.term(h).ancestors)
    return out


def _unrelated(candidate: str, related_ids: set[str], closure: set[str], ontology: Ontology) -> bool:
    """Neither the same as, an ancestor of, nor a descendant of any related term."""
    return candidate not in closure and not (set(ontology.term(candidate).ancestors) & related_ids)


def _pick_unrelated(rng: np.random.Generator, k: int, pool: Sequence[str], related: set[str], ontology: Ontology,
                    ok: Callable[[str], bool]) -> list[str]:
    closure = _closure(sorted(related), ontology)
    out: list[str] = []
    for _ in range(40 * max(k, 1)):
        if len(out) >= k or not pool:
            break
        c = pool[int(rng.integers(len(pool)))]
        if c not in out and ok(c) and _unrelated(c, related | set(out), closure | _closure(out, ontology), ontology):
            out.append(c)
    return out


def _sample_disease_terms(disease: Disease, ontology: Ontology, rng: np.random.Generator,
                          lv: DifficultyLevel) -> list[str]:
    """Annotated terms by frequency (or uniformly), topped up to min_terms, capped at max_terms, thinned."""
    cands = usable_phenotypes(disease, ontology)
    if not cands:
        raise UnrenderableError(disease.id, "no phenotype annotation can be stated without naming the disease")
    probs = np.array([p.expected_frequency for p in cands], dtype=np.float64)
    if lv.frequency_sampling:
        chosen = list(np.flatnonzero(rng.random(len(cands)) < probs))
    else:
        k = int(rng.integers(lv.min_terms, lv.max_terms + 1))
        chosen = list(rng.permutation(len(cands))[: min(k, len(cands))])
    if len(chosen) < lv.min_terms:  # top up, most frequent first (weighted draw without replacement)
        rest = [i for i in range(len(cands)) if i not in set(chosen)]
        need = min(lv.min_terms - len(chosen), len(rest))
        if need:
            w = probs[rest] + 1e-3
            chosen += list(rng.choice(rest, size=need, replace=False, p=w / w.sum()))
    if len(chosen) > lv.max_terms:  # uniform subset keeps the relative frequencies
        chosen = list(rng.choice(chosen, size=lv.max_terms, replace=False))
    keep = max(min(lv.min_terms, len(chosen)), int(np.ceil(lv.keep_fraction * len(chosen))))
    if keep < len(chosen):
        chosen = list(rng.choice(chosen, size=keep, replace=False))
    return [cands[i].hpo_id for i in sorted(int(i) for i in chosen)]


def _generalise(hpo_id: str, ontology: Ontology, rng: np.random.Generator, forbidden, distinct) -> str:
    """A parent (sometimes a grandparent) that is still a finding, not an organ system."""
    current = hpo_id
    for _ in range(1 + int(rng.random() < 0.35)):
        parents = [p for p in ontology.term(current).parents
                   if ontology.is_phenotype(p) and p not in ontology.organ_systems
                   and not forbidden_in(ontology.label(p), forbidden, distinct)]
        if not parents:
            break
        current = parents[int(rng.integers(len(parents)))]
    return current


# onset term -> (min years, max years); ancestors are used for terms not listed
_ONSET_YEARS = {
    "HP:0030674": (-0.4, 0.0), "HP:0011460": (-0.7, -0.5), "HP:0011461": (-0.5, 0.0), "HP:0003577": (0.0, 0.0),
    "HP:0003623": (1 / 365, 28 / 365), "HP:0003593": (1 / 12, 1.0), "HP:0011463": (1.0, 5.0),
    "HP:0003621": (5.0, 15.0), "HP:0410280": (0.0, 15.0), "HP:0003581": (16.0, 65.0), "HP:0011462": (16.0, 40.0),
    "HP:0025708": (16.0, 19.0), "HP:0025709": (19.0, 25.0), "HP:0025710": (25.0, 40.0), "HP:0003596": (40.0, 60.0),
    "HP:0003584": (60.0, 80.0), "HP:4000040": (20.0, 40.0), "HP:6000314": (45.0, 55.0), "HP:6000315": (52.0, 75.0),
}
_FEMALE_ONSETS = {"HP:4000040", "HP:6000314", "HP:6000315"}


def onset_range(onset_hpo: str, ontology: Ontology) -> tuple[float, float]:
    for h in (onset_hpo, *reversed(ontology.term(onset_hpo).ancestors)):
        if h in _ONSET_YEARS:
            return _ONSET_YEARS[h]
    return (0.0, 15.0)


def _sample_demographics(disease: Disease, ontology: Ontology, rng: np.random.Generator
                         ) -> tuple[str, float, str | None, float | None]:
    """Sex (inheritance-aware), current age, and onset consistent with the annotated onset.

    Without an onset annotation no onset is invented (None) and the age is drawn broadly, mostly paediatric
    as rare-disease referrals are.
    """
    inh = set(disease.inheritance)
    onset_hpo = disease.onset[int(rng.integers(len(disease.onset)))] if disease.onset else None
    onset_years: float | None = None
    if onset_hpo is not None:
        lo, hi = onset_range(onset_hpo, ontology)
        onset_years = float(rng.uniform(lo, hi)) if hi > lo else lo
        base = max(onset_years, 0.0)
        delay = float(rng.uniform(0.0, 2.0 if base < 1.0 else 10.0)) if rng.random() < 0.8 else 0.0
        age = base + delay
    else:
        age = float(rng.uniform(0.05, 18.0)) if rng.random() < 0.7 else float(rng.uniform(18.0, 60.0))
    if "HP:0001450" in inh or "HP:0001475" in inh:
        sex = "male"
    elif onset_hpo in _FEMALE_ONSETS or "HP:0034344" in inh:
        sex = "female"
    elif "HP:0001419" in inh:
        sex = "male" if rng.random() < 0.85 else "female"
    else:
        sex = "female" if rng.random() < 0.5 else "male"
    return sex, min(max(age, 2 / 365), 85.0), onset_hpo, onset_years


def _family_history(disease: Disease, sex: str, clue: str | None, rng: np.random.Generator) -> str:
    """One family-history sentence consistent with the mode of inheritance (clue = a present finding's wording)."""
    inh = set(disease.inheritance)
    pr = _pronouns(sex)
    feat = f"similar problems, including {clue}" if clue else "similar problems"
    parent = "mother" if rng.random() < 0.5 else "father"
    sib = "brother" if rng.random() < 0.5 else "sister"
    r = rng.random()
    if "HP:0000006" in inh or "HP:0012274" in inh or "HP:0012275" in inh:
        if r < 0.4:
            return f"{pr['Pos']} {parent} has {feat}."
        if r < 0.55:
            return "Both parents are healthy and were examined; no one else in the family is affected."
    elif "HP:0000007" in inh:
        if r < 0.3:
            return "The parents are first cousins; there is no other family history of note."
        if r < 0.5:
            return f"An older {sib} has {feat}; the parents are unaffected."
        if r < 0.6:
            return f"The parents are consanguineous, and a {sib} has {feat}."
    elif "HP:0001419" in inh or "HP:0001417" in inh:
        if r < 0.4:
            rel = "maternal uncle" if rng.random() < 0.5 else "older brother"
            return f"A {rel} has {feat}; {pr['pos']} mother is well."
    elif "HP:0001423" in inh:
        if r < 0.4:
            return f"{pr['Pos']} mother has a milder form of {feat}."
    elif "HP:0001427" in inh:
        if r < 0.4:
            return f"Several relatives on the mother's side have {feat}."
    return str(rng.choice([
        "Family history is noncontributory.",
        "There is no known family history of similar problems.",
        "No relatives are known to be affected; the parents are healthy.",
    ]))


def sample_findings(disease: Disease, ontology: Ontology, rng: np.random.Generator,
                    level: str | DifficultyLevel = "typical") -> Findings:
    """Step 1 of a simulated case: the HPO ids and context a note will state, per the level's knobs."""
    lv = get_level(level)
    forbidden = (disease.name, *disease.synonyms)
    distinct = distinctive_words(disease, ontology)
    terms = _sample_disease_terms(disease, ontology, rng, lv)
    generalised: dict[str, str] = {}
    present: list[str] = []
    for h in terms:
        if lv.imprecision and rng.random() < lv.imprecision:
            g = _generalise(h, ontology, rng, forbidden, distinct)
            if g != h and g not in present:
                generalised[g] = h
                h = g
        if h not in present:
            present.append(h)
    annotated = {p.hpo_id for p in disease.phenotypes}
    ok = lambda c: not forbidden_in(ontology.label(c), forbidden, distinct)  # noqa: E731
    pool = _noise_pool(ontology)
    noise = _pick_unrelated(rng, int(rng.integers(lv.noise_terms[0], lv.noise_terms[1] + 1)), pool,
                            annotated | set(present), ontology, ok)
    n_absent = int(rng.integers(lv.absent_terms[0], lv.absent_terms[1] + 1))
    related = annotated | set(present) | set(noise)
    closure = _closure(sorted(related), ontology)
    excluded = [h for h in ontology.excluded_phenotypes(disease.id)
                if ok(h) and _unrelated(h, related, closure, ontology)]
    absent = [h for h in excluded if rng.random() < 0.7][:n_absent]
    absent += _pick_unrelated(rng, n_absent - len(absent), pool, related | set(absent), ontology, ok)
    sex, age, onset_hpo, onset_years = _sample_demographics(disease, ontology, rng)
    all_present = present + noise
    order = rng.permutation(len(all_present))
    fam = None
    if lv.give_family_history:
        clue_id = present[int(rng.integers(len(present)))] if present and rng.random() < 0.7 else None
        clue = _wording(clue_id, ontology, rng, 0.5, forbidden, distinct) if clue_id else None
        fam = _family_history(disease, sex, clue, rng)
    return Findings(
        present=tuple(all_present[i] for i in order), absent=tuple(absent), noise=tuple(noise),
        generalised=generalised, sex=sex, age_years=age,
        onset_hpo=onset_hpo if lv.give_onset else None,
        onset_years=onset_years if lv.give_onset else None, family_history=fam,
    )


# ---------------------------------------------------------------------------------------------------------
# rendering


def _pronouns(sex: str) -> dict[str, str]:
    if sex == "female":
        return {"subj": "she", "Subj": "She", "pos": "her", "Pos": "Her"}
    if sex == "male":
        return {"subj": "he", "Subj": "He", "pos": "his", "Pos": "His"}
    return {"subj": "the patient", "Subj": "The patient", "pos": "the patient's", "Pos": "The patient's"}


def _lower_first(s: str) -> str:
    """'Tall stature' -> 'tall stature' but keep acronyms ('EEG abnormality', 'IgA deficiency')."""
    if len(s) > 1 and (s[1].isupper() or s[1].isdigit()):
        return s
    return s[:1].lower() + s[1:]


def _wording(hpo_id: str, ontology: Ontology, rng: np.random.Generator, lay_p: float,
             forbidden: Sequence[str] = (), distinct: Sequence[str] = ()) -> str:
    """The HPO label, an exact synonym or a layperson synonym (whichever does not leak)."""
    t = ontology.term(hpo_id)
    lay = [s for s in t.lay_synonyms if not forbidden_in(s, forbidden, distinct)]
    other = [s for s in t.synonyms if s not in t.lay_synonyms and not forbidden_in(s, forbidden, distinct)]
    r = rng.random()
    if lay and r < lay_p:
        choice = lay[int(rng.integers(len(lay)))]
    elif other and r > 0.75:
        choice = other[int(rng.integers(len(other)))]
    else:
        choice = t.label
    return _lower_first(choice)


def _join(items: Sequence[str], conj: str = "and") -> str:
    items = list(items)
    if not items:
        return ""
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + f" {conj} " + items[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def age_text(years: float) -> str:
    """Age as a clinician writes it: days under 4 weeks, months under 2 years, then years."""
    if years < 28 / 365:
        d = max(1, int(round(years * 365)))
        return f"{d} day" + ("s" if d != 1 else "")
    if years < 2:
        m = max(1, int(years * 12))
        return f"{m} month" + ("s" if m != 1 else "")
    y = int(years)
    return f"{y} years"


def _person(sex: str, years: float) -> str:
    """'a 6-year-old girl', 'an 8-month-old boy', 'a 34-year-old woman'."""
    num_unit = age_text(years).split()
    n, unit = num_unit[0], num_unit[1].rstrip("s")
    if years < 13:
        noun = {"female": "girl", "male": "boy"}.get(sex, "child")
        if years < 28 / 365:
            noun = {"female": "female newborn", "male": "male newborn"}.get(sex, "newborn")
        elif years < 1:
            noun = {"female": "female infant", "male": "male infant"}.get(sex, "infant")
    elif years < 18:
        noun = {"female": "adolescent girl", "male": "adolescent boy"}.get(sex, "adolescent")
    else:
        noun = {"female": "woman", "male": "man"}.get(sex, "adult")
    article = "an" if n.startswith("8") or n in ("11", "18") else "a"
    return f"{article} {n}-{unit}-old {noun}"


def _onset_phrase(onset_years: float | None, onset_hpo: str | None, rng: np.random.Generator) -> str | None:
    if onset_years is None:
        return None
    if onset_years < 0:
        return "abnormalities were first noted on prenatal ultrasound"
    if onset_years == 0:
        return "problems were apparent from birth"
    if onset_years < 28 / 365:
        return "symptoms began in the first weeks of life"
    if rng.random() < 0.5:
        return f"symptoms were first noticed at the age of {age_text(onset_years)}"
    if onset_years < 1:
        return "symptoms began in infancy"
    if onset_years < 5:
        return "symptoms began in early childhood"
    if onset_years < 16:
        return "symptoms began in later childhood"
    if onset_years < 40:
        return "symptoms began in early adulthood"
    if onset_years < 60:
        return "symptoms began in middle age"
    return "symptoms began later in life"


def _negatives(words: Sequence[str], rng: np.random.Generator) -> str:
    if not words:
        return ""
    form = int(rng.integers(4))
    if form == 0:
        return _cap(_join([f"no {w}" for w in words])) + "."
    if form == 1:
        return f"There is no {_join(words, 'or')}."
    if form == 2:
        return f"Denies {_join(words, 'or')}."
    return f"Negative for {_join(words, 'and')}."


def _groups(ids: Sequence[str], words: Sequence[str], ontology: Ontology) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for h, w in zip(ids, words):
        out.setdefault(ontology.system(h) or "other", []).append(w)
    return out


@dataclasses.dataclass
class _Ctx:
    who: str
    pr: dict
    age: str
    onset: str | None
    present: list[str]
    present_ids: list[str]
    absent: list[str]
    family: str | None
    child: bool


def _render_hpi(c: _Ctx, ontology: Ontology, rng: np.random.Generator) -> str:
    chief, rest = c.present[:2], c.present[2:]
    s = [f"{_cap(c.who)} presents with {_join(chief)}." if chief else f"{_cap(c.who)} presents for evaluation."]
    if c.onset:
        s.append(_cap(c.onset) + ".")
    for i in range(0, len(rest), 3):
        lead = str(rng.choice([f"{c.pr['Subj']} also has", "Further history reveals", "Examination shows",
                               "Additional findings include", "There is also"]))
        s.append(f"{lead} {_join(rest[i:i + 3])}.")
    if c.absent:
        s.append(_negatives(c.absent, rng))
    if c.family:
        s.append(c.family)
    return "History of present illness: " + " ".join(s)


def _render_referral(c: _Ctx, ontology: Ontology, rng: np.random.Generator) -> str:
    opening = str(rng.choice(["Dear colleague,", "Dear Clinical Genetics team,", "Dear Dr,"]))
    body = [f"Thank you for seeing {c.who}, whom I am referring for a suspected underlying genetic condition."]
    if c.present:
        body.append(f"{c.pr['Subj'].capitalize()} has {_join(c.present)}." if len(c.present) < 5 else
                    f"The main concerns are {_join(c.present[:3])}. In addition, {c.pr['subj']} has "
                    f"{_join(c.present[3:])}.")
    if c.onset:
        body.append(f"According to the family, {c.onset}.")
    if c.absent:
        body.append("Of note: " + _negatives(c.absent, rng))
    if c.family:
        body.append(c.family)
    body.append("I would be grateful for your assessment and advice on further investigations.")
    who = "Consultant paediatrician" if c.child else "Consultant physician"
    closing = str(rng.choice(["Yours sincerely,\nGeneral practitioner", f"Kind regards,\n{who}",
                              "With best wishes,\nReferring physician"]))
    return f"{opening}\n\n" + " ".join(body) + f"\n\n{closing}"


def _render_discharge(c: _Ctx, ontology: Ontology, rng: np.random.Generator) -> str:
    reason = _join(c.present[:2]) or "evaluation"
    lines = ["DISCHARGE SUMMARY", f"Patient: {c.who}.", f"Reason for admission: {reason}."]
    if c.onset:
        lines.append(f"History: {_cap(c.onset)}.")
    lines.append("Findings:")
    for system, words in _groups(c.present_ids, c.present, ontology).items():
        lines.append(f"- {_cap(system)}: {'; '.join(words)}")
    if c.absent:
        lines.append("Pertinent negatives: " + "; ".join(f"no {w}" for w in c.absent) + ".")
    if c.family:
        lines.append(c.family if c.family.startswith("Family history") else f"Family history: {c.family}")
    lines.append("Diagnosis at discharge: unifying diagnosis not yet established. Plan: outpatient genetics review.")
    return "\n".join(lines)


def _render_clinic(c: _Ctx, ontology: Ontology, rng: np.random.Generator) -> str:
    half = max(1, len(c.present) // 2)
    subj, obj = c.present[:half], c.present[half:]
    s = f"S: {_cap(c.who)} seen in clinic. Reports {_join(subj)}." if subj else f"S: {_cap(c.who)} seen in clinic."
    if c.onset:
        s += f" {_cap(c.onset)}."
    if c.absent:
        s += " " + _negatives(c.absent, rng)
    o = f"O: Exam notable for {_join(obj)}." if obj else "O: Examination otherwise unremarkable."
    lines = [s, o]
    if c.family:
        lines.append(f"FH: {c.family}")
    lines.append("A: Multisystem presentation, suspect a rare genetic disorder. P: Further work-up.")
    return "\n".join(lines)


_RENDERERS = {"hpi": _render_hpi, "referral": _render_referral, "discharge": _render_discharge,
              "clinic": _render_clinic}


def render_note(ontology: Ontology, present_hpo: Sequence[str], absent_hpo: Sequence[str], rng: np.random.Generator,
                *, sex: str = "unknown", age_years: float | None = None, onset_years: float | None = None,
                onset_hpo: str | None = None, family_history: str | None = None, style: str | None = None,
                lay_probability: float = 0.25, forbidden: Sequence[str] = ()) -> str:
    """Step 2: free text stating the findings. Shared with importers (phenopackets), so it only needs ids.

    Findings whose every wording contains a `forbidden` string are left out of the text (the caller's
    `present_hpo` should not list them: filter with the same strings first).
    """
    style = style or STYLES[int(rng.integers(len(STYLES)))]
    if style not in _RENDERERS:
        raise ValueError(f"unknown note style {style!r}; known: {', '.join(STYLES)}")
    pw, pids = [], []
    for h in present_hpo:
        w = _wording(h, ontology, rng, lay_probability, forbidden)
        if not forbidden_in(w, forbidden, ()):
            pw.append(w)
            pids.append(h)
    aw = [w for w in (_wording(h, ontology, rng, lay_probability, forbidden) for h in absent_hpo)
          if not forbidden_in(w, forbidden, ())]
    if age_years is not None:
        who = _person(sex, age_years)
    else:
        who = {"female": "a female patient", "male": "a male patient"}.get(sex, "a patient")
    ctx = _Ctx(who=who, pr=_pronouns(sex), age=age_text(age_years) if age_years is not None else "",
               onset=_onset_phrase(onset_years, onset_hpo, rng), present=pw, present_ids=pids, absent=aw,
               family=family_history, child=age_years is not None and age_years < 18)
    return _RENDERERS[style](ctx, ontology, rng)


# ---------------------------------------------------------------------------------------------------------
# cases


def case_rng(seed: int, disease_id: str, index: int) -> np.random.Generator:
    """Per-case generator from (seed, disease, index): independent of order, process and Python hash salt."""
    digest = hashlib.sha256(f"{seed}|{disease_id}|{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def simulate_case(disease: Disease, ontology: Ontology, rng: np.random.Generator,
                  level: str | DifficultyLevel = "typical", style: str | None = None,
                  case_id: str | None = None) -> Case:
    """One simulated case; retries the rendering if the guard finds a leak and raises if it cannot avoid one."""
    lv = get_level(level)
    forbidden = (disease.name, *disease.synonyms)
    distinct = distinctive_words(disease, ontology)
    f = sample_findings(disease, ontology, rng, lv)
    style = style or STYLES[int(rng.integers(len(STYLES)))]
    leaks: list[str] = []
    for _ in range(RENDER_TRIES):
        text = render_note(ontology, f.present, f.absent, rng, sex=f.sex, age_years=f.age_years,
                           onset_years=f.onset_years, onset_hpo=f.onset_hpo, family_history=f.family_history,
                           style=style, forbidden=(*forbidden, *distinct))
        leaks = find_leaks(text, disease, ontology)
        if not leaks:
            break
    else:
        # The drawn family-history sentence is the one part of the note not filtered against the name: when it
        # is what leaks, say the family history another way (or not at all) rather than give up on the disease.
        if f.family_history and find_leaks(f.family_history, disease, ontology):
            for fam in (*_NEUTRAL_FAMILY_HISTORY, None):
                if fam is not None and find_leaks(fam, disease, ontology):
                    continue
                f = dataclasses.replace(f, family_history=fam)
                for _ in range(RENDER_TRIES):
                    text = render_note(ontology, f.present, f.absent, rng, sex=f.sex, age_years=f.age_years,
                                       onset_years=f.onset_years, onset_hpo=f.onset_hpo, family_history=fam,
                                       style=style, forbidden=(*forbidden, *distinct))
                    leaks = find_leaks(text, disease, ontology)
                    if not leaks:
                        break
                if not leaks:  # else the next neutral sentence, then none at all
                    break
        if leaks:
            raise UnrenderableError(disease.id, f"every rendering of the note leaks the diagnosis ({'; '.join(leaks)})")
    if case_id is None:
        case_id = "sim-" + "".join(f"{int(b):02x}" for b in rng.integers(0, 256, size=8))
    return Case(
        id=case_id, text=text, diagnosis=(disease.id,), diagnosis_name=disease.name,
        present_hpo=f.present, absent_hpo=f.absent, sex=f.sex, age=age_text(f.age_years), level=lv.name,
        source="simulated",
        meta={"style": style, "noise_hpo": list(f.noise), "generalised": dict(f.generalised),
              "onset_hpo": f.onset_hpo or ""},
    )


def simulate_cases(diseases: Sequence[Disease], ontology: Ontology, n_per_disease: int, seed: int,
                   levels: Sequence[str | DifficultyLevel] = ("typical",)) -> list[Case]:
    """n cases per disease, levels cycled over the index; case i of a disease depends only on (seed, id, i)."""
    if n_per_disease < 0:
        raise ValueError(f"n_per_disease must be >= 0, got {n_per_disease}")
    lvs = [get_level(lv) for lv in levels]
    if not lvs:
        raise ValueError("levels must name at least one difficulty level")
    out = []
    for d in diseases:
        for i in range(n_per_disease):
            rng = case_rng(seed, d.id, i)
            cid = "sim-" + hashlib.sha256(f"{seed}|{d.id}|{i}".encode()).hexdigest()[:16]
            out.append(simulate_case(d, ontology, rng, lvs[i % len(lvs)], case_id=cid))
    return out
