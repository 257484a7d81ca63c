"""Text -> HPO concept recognition for the baseline: the project's dictionary matcher or FastHPOCR, measured.

Why: the HPO baseline ranks diseases from terms; for a note with only text (a JSONL note) the terms come from a
recogniser. `TermMatcher` (baseline.py) is a regex over HPO labels and synonyms of the candidates' terms.
FastHPOCR (`fasthpocr`, Groza et al. 2024) is a kept HPO concept recogniser: it indexes an HPO release (an
``hp.obo``) with clusters of morphologically equivalent tokens, so it finds inflected and reordered wordings too;
it has no negation, so its spans get the same negation rule as `TermMatcher` (the sentence's text before the span).
Its index is built here from the ontology this project ships (no download): `write_obo` writes the phenotype
branch of the hpo3 release, with the synonyms of the extras table, and FastHPOCR indexes that.

`python -m raredx_jax.evaluation.hpo_recognition` measures both on simulated notes against the terms each note was
rendered from (precision and recall of (term, observed/excluded) pairs, per difficulty level) and the baseline's
top-1 that follows; README's table is its output.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from raredx_jax.data.hpo import Ontology, load_ontology, select_diseases
from raredx_jax.data.simulate import LEVELS, simulate_cases
from raredx_jax.evaluation.baseline import NEGATION, PhenotypeRanker, TermMatcher, phenotype_pool
from raredx_jax.evaluation.metrics import rank_of

RECOGNISERS = ("dictionary", "fasthpocr")
ROOT_PHENOTYPE = "HP:0000118"


def phenotype_terms(ontology: Ontology) -> list[str]:
    """Every current term of the phenotype branch (the root included), in id order."""
    ids = [f"HP:{n:07d}" for n in sorted(ontology._labels)]
    return [h for h in ids if not ontology.is_obsolete(h) and (h == ROOT_PHENOTYPE or ontology.is_phenotype(h))]


def write_obo(ontology: Ontology, path: str | Path, hpo_ids: Sequence[str] | None = None) -> Path:
    """An OBO 1.2 file of the phenotype branch (or of ``hpo_ids`` and the root): id, name, EXACT synonyms, is_a
    within the written set. What FastHPOCR's indexer reads (through pronto)."""
    ids = list(hpo_ids) if hpo_ids is not None else phenotype_terms(ontology)
    keep = set(ids) | {ROOT_PHENOTYPE}

    def q(s: str) -> str:
        return s.replace("\\", "\\\\").replace('"', '\\"')

    lines = ["format-version: 1.2", f"data-version: hp/releases/{ontology.version}", "ontology: hp", ""]
    for h in sorted(keep):
        term = ontology.term(h)
        lines += ["[Term]", f"id: {h}", f"name: {term.label}"]
        lines += [f'synonym: "{q(s)}" EXACT []' for s in term.synonyms]
        parents = [p for p in term.parents if p in keep]
        if h != ROOT_PHENOTYPE and not parents:
            parents = [ROOT_PHENOTYPE]  # a subset's term whose parents were left out hangs under the root
        lines += [f"is_a: {p}" for p in parents]
        lines.append("")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def default_index_dir(ontology: Ontology, hpo_ids: Sequence[str] | None = None) -> Path:
    """A cache folder per HPO release (and term subset): the index is built once (about 3 min for all terms)."""
    key = ontology.version + ("" if hpo_ids is None else "-" + hashlib.sha256(
        ",".join(sorted(hpo_ids)).encode()).hexdigest()[:12])
    root = os.environ.get("RAREDX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "raredx_jax"))
    return Path(root) / "fasthpocr" / key


class FastHPOCRMatcher:
    """FastHPOCR over an index of this project's HPO release, with TermMatcher's negation rule.

    ``hpo_ids``: index only these terms (a candidate pool; the default is the whole phenotype branch).
    The index is built into ``index_dir`` when it is not there (atomically: a half-built index is never read).
    ``longest_match``: FastHPOCR's own option to keep only the longest of overlapping spans ("aortic root
    aneurysm", not also "aneurysm"), as the dictionary matcher does; without it precision fell from 93.8 to 75.1
    on README's measurement.
    """

    def __init__(self, ontology: Ontology, hpo_ids: Iterable[str] | None = None, index_dir: str | Path | None = None,
                 longest_match: bool = True):
        from FastHPOCR.HPOAnnotator import HPOAnnotator  # noqa: PLC0415 - optional: FastHPOCR (the [hpocr] extra)

        ids = sorted(set(hpo_ids)) if hpo_ids is not None else None
        self.index_dir = Path(index_dir) if index_dir else default_index_dir(ontology, ids)
        index_file = self.index_dir / "hp.index"
        if not index_file.exists():
            self._build(ontology, ids)
        self._annotator = HPOAnnotator(str(index_file))
        self._ontology = ontology
        self._longest = longest_match

    def _build(self, ontology: Ontology, ids: list[str] | None) -> None:
        from FastHPOCR.IndexHPO import IndexHPO  # noqa: PLC0415 - optional: FastHPOCR (the [hpocr] extra)

        self.index_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.index_dir.parent, prefix=f".{self.index_dir.name}.partial-"))
        try:
            obo = write_obo(ontology, tmp / "hp.obo", ids)
            IndexHPO(str(obo), str(tmp), indexConfig={"allow3LetterAcronyms": False,
                                                      "includeTopLevelCategory": False,
                                                      "allowDuplicateEntries": False}).index()
            if not (tmp / "hp.index").exists():
                raise RuntimeError(f"FastHPOCR wrote no hp.index in {tmp}")
            try:
                os.replace(tmp, self.index_dir)
            except OSError:  # another process built it first
                if not (self.index_dir / "hp.index").exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def match(self, text: str) -> tuple[list[str], list[str]]:
        """(present ids, absent ids) in order of first mention, as `TermMatcher.match`."""
        present: list[str] = []
        absent: list[str] = []
        for sentence in re.split(r"[.;\n]", text):
            if not sentence.strip():
                continue
            spans = self._annotator.annotate(sentence, longestMatch=self._longest)
            for a in sorted(spans, key=lambda a: a.getStartOffset()):
                hid = a.getHPOUri()
                if hid == ROOT_PHENOTYPE or not self._ontology.has_term(hid):
                    continue
                norm = TermMatcher.normalise(sentence[:a.getStartOffset()])
                negated = NEGATION.search(norm) is not None
                if hid not in present and hid not in absent:
                    (absent if negated else present).append(hid)
        return present, absent


def make_matcher(kind: str, ontology: Ontology, hpo_ids: Iterable[str]) -> Any:
    """A recogniser by name over the same terms ``hpo_ids`` (the candidates' pool, as the baseline uses):
    "dictionary" (TermMatcher) or "fasthpocr" (FastHPOCRMatcher, its index cached per release and pool)."""
    if kind == "dictionary":
        return TermMatcher(ontology, hpo_ids)
    if kind == "fasthpocr":
        return FastHPOCRMatcher(ontology, hpo_ids)
    raise ValueError(f"unknown HPO recogniser {kind!r} (expected one of {', '.join(RECOGNISERS)})")


def score_extraction(cases: Sequence[Any], matcher: Any) -> dict[str, dict[str, float]]:
    """Micro precision/recall of (term, observed|excluded) pairs per level (and "all") against each case's
    rendered terms, plus the matched terms per case id (for the baseline)."""

    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # tp, predicted, gold
    matched: dict[str, tuple[list[str], list[str]]] = {}
    for c in cases:
        present, absent = matcher.match(c.text)
        matched[c.id] = (present, absent)
        pred = {(h, True) for h in present} | {(h, False) for h in absent}
        gold = {(h, True) for h in c.present_hpo} | {(h, False) for h in c.absent_hpo}
        for key in (c.level, "all"):
            k = counts[key]
            k[0] += len(pred & gold)
            k[1] += len(pred)
            k[2] += len(gold)
    out = {lv: {"precision": tp / max(p, 1), "recall": tp / max(g, 1), "n_pred": p, "n_gold": g}
           for lv, (tp, p, g) in counts.items()}
    return {"levels": out, "matched": matched}


def main(argv: Sequence[str] | None = None) -> int:
    """Measure the recognisers on simulated notes; prints README's table (markdown)."""

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--diseases", type=int, default=40, help="random diseases with >= 8 findings (seed --seed)")
    ap.add_argument("--per-disease", type=int, default=10, help="simulated notes per disease (levels cycled)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recognisers", default=",".join(RECOGNISERS))
    args = ap.parse_args(argv)

    ontology = load_ontology()
    diseases = select_diseases(ontology, dict(kind="random", n=args.diseases, seed=args.seed, ids="",
                                              min_phenotypes=8))
    diseases = [ontology.disease(d.id) for d in diseases]
    cases = simulate_cases(diseases, ontology, args.per_disease, seed=args.seed + 1000, levels=tuple(LEVELS))
    pool = phenotype_pool(ontology, diseases)
    ranker = PhenotypeRanker(ontology, diseases)
    rows = []
    for kind in args.recognisers.split(","):
        t0 = time.time()
        matcher = make_matcher(kind, ontology, pool)
        t1 = time.time()
        res = score_extraction(cases, matcher)
        t2 = time.time()
        top1: dict[str, list[int]] = {}
        for c in cases:
            present, absent = res["matched"][c.id]
            ranked = [d for d, _ in ranker.rank(present, absent, top=1)]
            hit = int(rank_of(ranked, c.diagnosis) == 1)
            for key in (c.level, "all"):
                top1.setdefault(key, []).append(hit)
        for lv in (*LEVELS, "all"):
            m = res["levels"][lv]
            rows.append((kind, lv, len(top1[lv]), m["precision"], m["recall"], sum(top1[lv]) / len(top1[lv])))
        print(f"[hpo_recognition] {kind}: setup {t1 - t0:.1f} s, {len(cases)} notes in {t2 - t1:.1f} s",
              file=sys.stderr, flush=True)
    print(f"{len(cases)} simulated notes: {args.diseases} random diseases (seed {args.seed}, >= 8 findings), "
          f"{args.per_disease} per disease, levels cycled; HPO {ontology.version}\n")
    print("| recogniser | level | notes | precision | recall | baseline top-1 |")
    print("|---|---|---|---|---|---|")
    for kind, lv, n, p, r, t in rows:
        print(f"| {kind} | {lv} | {n} | {100 * p:.1f} | {100 * r:.1f} | {100 * t:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
