"""The classic baseline clinicians' tools use: rank diseases by HPO phenotype similarity (Phrank-style).

score(case, disease) = sum of information content over the terms shared by the ancestor closures of the case's
terms and the disease's annotated terms (Jagadeesh et al., Phrank, Genet Med 2019). IC(t) = -log2 of the
fraction of candidate diseases whose annotation closure contains t, so specific shared findings count more.
Excluded findings subtract the IC of terms a disease is annotated with (a mild penalty, as in LIRICAL-like
tools). When a case has only text, terms come from dictionary matching of HPO labels and synonyms in the note,
with simple negation handling ("no X", "denies X", "X absent").
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Sequence

from raredx_jax.data.hpo import Disease, Ontology

NEGATION = re.compile(r"\b(no|not|denies|denied|without|negative for|absence of|absent|free of|never had|"
                       r"no evidence of|no history of|ruled out)\b[^.;:\n]*$", re.I)


class PhenotypeRanker:
    """Phrank-style ranking over a candidate disease set (the trained subset or all annotated diseases)."""

    def __init__(self, ontology: Ontology, diseases: Sequence[Disease]):
        self.ontology = ontology
        self.diseases = list(diseases)
        self._closure_cache: dict[str, frozenset[str]] = {}
        self.disease_closure = [self.closure(p.hpo_id for p in d.phenotypes) for d in self.diseases]
        counts = Counter(t for c in self.disease_closure for t in c)
        n = len(self.diseases)
        self.ic = {t: -math.log2(c / n) for t, c in counts.items()}

    def _term_closure(self, hpo_id: str) -> frozenset[str]:
        if hpo_id not in self._closure_cache:
            term = self.ontology.term(hpo_id)
            self._closure_cache[hpo_id] = frozenset((hpo_id, *term.ancestors))
        return self._closure_cache[hpo_id]

    def closure(self, hpo_ids: Iterable[str]) -> frozenset[str]:
        out: set[str] = set()
        for h in hpo_ids:
            if self.ontology.has_term(h):
                out |= self._term_closure(h)
        return frozenset(out)

    def scores(self, present: Sequence[str], absent: Sequence[str] = ()) -> list[float]:
        q, neg = self.closure(present), self.closure(absent)
        out = []
        for c in self.disease_closure:
            # fsum: exact, so a score does not depend on the set's iteration order (string hashes differ per
            # process); with a plain sum, tied diseases differed in the last bit and the id tie-break lost
            s = math.fsum(self.ic.get(t, 0.0) for t in q & c)
            s -= 0.5 * math.fsum(self.ic.get(t, 0.0) for t in (neg & c) - q)
            out.append(s)
        return out

    def rank(self, present: Sequence[str], absent: Sequence[str] = (), top: int = 10) -> list[tuple[str, float]]:
        """[(disease id, score)] best first; ties broken by id for determinism."""
        scored = sorted(zip((d.id for d in self.diseases), self.scores(present, absent)),
                        key=lambda x: (-x[1], x[0]))
        return scored[:top]


class TermMatcher:
    """Dictionary matcher: HPO phenotype labels and synonyms found in free text, split by negation."""

    def __init__(self, ontology: Ontology, hpo_ids: Iterable[str], min_len: int = 4):
        self._phrases: dict[str, str] = {}
        for h in sorted(set(hpo_ids)):
            term = ontology.term(h)
            for phrase in (term.label, *term.synonyms):
                key = self.normalise(phrase)
                if len(key) >= min_len:
                    self._phrases.setdefault(key, h)
        # longest phrases first so "short stature" wins over "stature"
        keys = sorted(self._phrases, key=len, reverse=True)
        self._regex = re.compile(r"\b(" + "|".join(re.escape(k) for k in keys) + r")\b") if keys else None

    @staticmethod
    def normalise(text: str) -> str:
        return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9 ]", " ", text.lower())).strip()

    def match(self, text: str) -> tuple[list[str], list[str]]:
        """(present ids, absent ids) in order of first mention."""
        present: list[str] = []
        absent: list[str] = []
        if self._regex is None:
            return present, absent
        for sentence in re.split(r"[.;\n]", text):
            norm = self.normalise(sentence)
            for m in self._regex.finditer(norm):
                hid = self._phrases[m.group(1)]
                negated = NEGATION.search(norm[:m.start()]) is not None
                target = absent if negated else present
                if hid not in present and hid not in absent:
                    target.append(hid)
        return present, absent


def phenotype_pool(ontology: Ontology, diseases: Sequence[Disease]) -> set[str]:
    """Terms a note about these diseases may mention: their annotations and the ancestors of those."""
    pool: set[str] = set()
    for d in diseases:
        for p in d.phenotypes:
            pool.add(p.hpo_id)
            pool.update(a for a in ontology.term(p.hpo_id).ancestors if ontology.is_phenotype(a))
    return pool
