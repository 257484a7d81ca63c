"""Text -> HPO recognisers for the baseline: the OBO written from the shipped release is what pronto (FastHPOCR's
reader) reads; FastHPOCR, indexed from it (a real index of a few terms), finds the terms of a note with the same
negation split as the dictionary matcher; the extraction score counts (term, polarity) pairs per level."""
from __future__ import annotations

import pytest

from raredx_jax.data.case import Case
from raredx_jax.data.hpo import load_ontology
from raredx_jax.evaluation import hpo_recognition as hr
from raredx_jax.evaluation.baseline import TermMatcher

MARFAN_TERMS = ["HP:0000098", "HP:0000218", "HP:0000268", "HP:0000545", "HP:0001166", "HP:0001083", "HP:0002616"]


@pytest.fixture(scope="module")
def ontology():
    return load_ontology()


def test_obo_of_the_shipped_release_reads_in_pronto(ontology, tmp_path):
    import pronto

    path = hr.write_obo(ontology, tmp_path / "hp.obo", MARFAN_TERMS)
    onto = pronto.Ontology(str(path))
    assert {t.id for t in onto.terms()} == set(MARFAN_TERMS) | {hr.ROOT_PHENOTYPE}
    assert onto["HP:0001166"].name == "Arachnodactyly"
    syns = {s.description for s in onto["HP:0001166"].synonyms}
    assert set(ontology.term("HP:0001166").synonyms) == syns and syns  # the extras' synonyms, all EXACT
    # a term whose parents were left out hangs under the root, so the indexer's walk from the root reaches it
    assert {p.id for p in onto["HP:0001166"].superclasses(distance=1, with_self=False)} == {hr.ROOT_PHENOTYPE}
    assert len(hr.phenotype_terms(ontology)) > 15000


def test_extraction_score_counts_term_polarity_pairs():
    class Fixed:
        def match(self, text):
            return (["HP:1", "HP:2"], ["HP:3"]) if text == "a" else ([], ["HP:9"])

    cases = [Case(id="a", text="a", diagnosis=("OMIM:1",), diagnosis_name="x", present_hpo=("HP:1", "HP:3"),
                  absent_hpo=(), level="typical"),
             Case(id="b", text="b", diagnosis=("OMIM:1",), diagnosis_name="x", present_hpo=("HP:5",),
                  absent_hpo=("HP:9",), level="sparse")]
    res = hr.score_extraction(cases, Fixed())["levels"]
    # typical: predicted {1+, 2+, 3-}, gold {1+, 3+}: 1 of 3 right, 1 of 2 found (3 has the wrong polarity)
    assert res["typical"]["precision"] == pytest.approx(1 / 3) and res["typical"]["recall"] == pytest.approx(1 / 2)
    assert res["sparse"]["precision"] == 1.0 and res["sparse"]["recall"] == 0.5
    assert res["all"]["precision"] == pytest.approx(2 / 4) and res["all"]["recall"] == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="unknown HPO recogniser 'metamap'"):
        hr.make_matcher("metamap", None, [])


def test_evaluation_baseline_takes_the_configured_recogniser(ontology):
    from configs.base import get_config
    from raredx_jax.evaluation.runner import Baseline

    assert get_config("cpu").eval.hpo_recogniser == "dictionary"  # the measured better one (README's table)
    cands = [ontology.disease("OMIM:154700")]
    assert isinstance(Baseline(ontology, cands).matcher, TermMatcher)
    with pytest.raises(ValueError, match="unknown HPO recogniser"):
        Baseline(ontology, cands, "metamap")


def test_fasthpocr_index_and_match_with_negation(ontology, tmp_path):
    """A real FastHPOCR index of 7 terms (about 7 s on 2 quiet cores, 40 s under load), built atomically and
    reused; its matches agree with the dictionary matcher on a note worded with labels, and it also finds an
    inflected wording the dictionary matcher misses."""
    index = tmp_path / "idx"
    m = hr.FastHPOCRMatcher(ontology, MARFAN_TERMS, index_dir=index)
    assert (index / "hp.index").exists() and not list(tmp_path.glob(".*partial*"))
    text = ("A 14-year-old girl with arachnodactyly and tall stature. No ectopia lentis; there is no "
            "high palate. Aortic root aneurysm was found.")
    got = m.match(text)
    assert got == (["HP:0001166", "HP:0000098", "HP:0002616"], ["HP:0001083", "HP:0000218"])
    assert got == TermMatcher(ontology, MARFAN_TERMS).match(text)
    # a plural the label does not spell: FastHPOCR's token clusters cover it, the regex over labels does not
    plural = "Aortic root aneurysms were found."
    assert m.match(plural) == (["HP:0002616"], []) and TermMatcher(ontology, MARFAN_TERMS).match(plural) == ([], [])
    again = hr.FastHPOCRMatcher(ontology, MARFAN_TERMS, index_dir=index)  # the cached index: no rebuild
    assert again.match(text) == got
