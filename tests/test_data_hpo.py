"""The ontology wrapper on the real hpo3 data plus the shipped extras (frequencies, synonyms, genes)."""
import re

import pytest
from ml_collections import config_dict

from raredx_jax.data.hpo import (
    EXTRAS_ASSET,
    clean_disease_name,
    combine_frequencies,
    core_phenotypes,
    frequency_word,
    load_ontology,
    parse_frequency,
    readable_case,
    select_diseases,
)

MARFAN = "OMIM:154700"


def _spec(**kw):
    base = dict(kind="random", n=40, seed=0, ids="", min_phenotypes=8)
    base.update(kw)
    return config_dict.ConfigDict(base)


def test_ontology_loads_and_is_cached(onto):
    assert load_ontology() is onto
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", onto.version)
    assert EXTRAS_ASSET.exists() and onto.extras_release
    ds = onto.diseases()
    assert len(ds) > 10000
    assert {d.id.split(":")[0] for d in ds} == {"OMIM", "ORPHA"}
    assert len({d.id for d in ds}) == len(ds)


def test_terms(onto):
    t = onto.term("HP:0001166")
    assert t.label == "Arachnodactyly"
    assert "Spider fingers" in t.lay_synonyms and set(t.lay_synonyms) <= set(t.synonyms)
    assert "HP:0000118" in t.ancestors and set(t.parents) <= set(t.ancestors)
    assert onto.has_term("HP:0001166") and not onto.has_term("HP:9999999") and not onto.has_term("nonsense")
    with pytest.raises(KeyError, match="HP:9999999"):
        onto.term("HP:9999999")
    assert onto.is_phenotype("HP:0001166") and not onto.is_phenotype("HP:0000006")
    assert onto.is_inheritance("HP:0000006") and onto.is_onset("HP:0003577")
    assert onto.system("HP:0001083") == "eye"


def test_marfan_is_sane(onto):
    d = onto.disease(MARFAN)
    assert d.name == "Marfan syndrome"
    assert "HP:0000006" in d.inheritance  # autosomal dominant
    assert "FBN1" in d.genes
    ids = {p.hpo_id for p in d.phenotypes}
    assert {"HP:0001166", "HP:0001083", "HP:0001519"} <= ids  # arachnodactyly, ectopia lentis, tall stature
    assert len(d.phenotypes) >= 40
    with_freq = [p for p in d.phenotypes if p.frequency is not None]
    assert len(with_freq) >= 20
    for p in d.phenotypes:
        assert onto.is_phenotype(p.hpo_id) and p.label == onto.label(p.hpo_id)
        if p.frequency is None:
            assert p.frequency_label == ""
        else:
            assert 0.0 <= p.frequency <= 1.0 and p.frequency_label == frequency_word(p.frequency)


def test_all_annotations_well_formed(onto):
    n_onset = 0
    for d in onto.diseases():
        assert d.name and d.name == d.name.strip() and ";" not in d.name, d.id
        letters = [c for c in d.name if c.isalpha()]
        assert not (len(letters) > 8 and all(c.isupper() for c in letters)), d.id  # ALL-CAPS fixed
        assert d.phenotypes
        assert all(onto.is_onset(h) for h in d.onset) and all(onto.is_inheritance(h) for h in d.inheritance)
        assert all(p.frequency is None or 0.0 <= p.frequency <= 1.0 for p in d.phenotypes)
        n_onset += bool(d.onset)
    assert n_onset > 1000


def test_unknown_disease_names_id(onto):
    with pytest.raises(KeyError, match="OMIM:999999"):
        onto.disease("OMIM:999999")


@pytest.mark.parametrize("raw,expected", [
    ("HP:0040280", 1.0), ("HP:0040281", 0.895), ("HP:0040283", 0.17), ("HP:0040285", 0.0),
    ("3/4", 0.75), ("0/7", 0.0), ("25%", 0.25), ("12.5%", 0.125), ("", None), ("1/0", None), ("often", None),
])
def test_parse_frequency(raw, expected):
    assert parse_frequency(raw) == (pytest.approx(expected) if expected is not None else None)


def test_combine_and_words():
    assert combine_frequencies(["1/1", "3/9"]) == pytest.approx(0.4)  # pooled counts, not mean of 1.0 and 0.33
    assert combine_frequencies(["1/2", "HP:0040280"]) == pytest.approx(0.75)
    assert combine_frequencies([]) is None
    assert [frequency_word(p) for p in (1.0, 0.9, 0.5, 0.1, 0.02, 0.0, None)] == [
        "obligate", "very frequent", "frequent", "occasional", "very rare", "excluded", ""]


def test_clean_disease_name():
    assert clean_disease_name("MARFAN SYNDROME; MFS") == ("Marfan syndrome", ("MFS",))
    name, syns = clean_disease_name("#111620 RADIN BLOOD GROUP ANTIGEN; RD;;BLOOD GROUP--RADIN ANTIGEN")
    assert name == "Radin blood group antigen" and "RD" in syns
    assert clean_disease_name("DEAFNESS, Y-LINKED 2") == ("Deafness, Y-linked 2", ("Y-linked deafness 2",))
    assert "Familial hyperphosphatemic tumoral calcinosis 1" in clean_disease_name(
        "Tumoral calcinosis, hyperphosphatemic, familial, 1")[1]
    assert clean_disease_name("Mitochondrial myopathy (MELAS)")[1] == ("Mitochondrial myopathy", "MELAS")
    assert readable_case("HEPATITIS B VACCINE, RESPONSE TO") == "Hepatitis B vaccine, response to"
    # known limitation: from ALL-CAPS alone an eponym's second half cannot be told from an ordinary word
    assert readable_case("EHLERS-DANLOS SYNDROME, TYPE IIA") == "Ehlers-danlos syndrome, type IIA"
    assert readable_case("Already mixed Case") == "Already mixed Case"


def test_select_random_is_deterministic(onto):
    a = select_diseases(onto, _spec(seed=3))
    b = select_diseases(onto, _spec(seed=3))
    c = select_diseases(onto, _spec(seed=4))
    assert [d.id for d in a] == [d.id for d in b] and len(a) == 40
    assert [d.id for d in a] != [d.id for d in c]
    assert all(len(d.phenotypes) >= 8 for d in a)
    assert len(select_diseases(onto, _spec(kind="all", min_phenotypes=60))) < len(onto.diseases())


def test_select_ids_keeps_order_and_dedupes(onto):
    got = select_diseases(onto, _spec(kind="ids", ids=" ORPHA:558, OMIM:154700,ORPHA:558"))
    assert [d.id for d in got] == ["ORPHA:558", MARFAN]


def test_max_phenotypes_keeps_the_most_frequent_core(onto):
    full = select_diseases(onto, _spec(n=12, seed=1))
    core = select_diseases(onto, _spec(n=12, seed=1, max_phenotypes=6))
    assert [d.id for d in core] == [d.id for d in full]
    freq = lambda p: 0.5 if p.frequency is None else p.frequency  # noqa: E731
    for f, c in zip(full, core):
        present_f = [p for p in f.phenotypes if p.frequency != 0.0]
        present_c = [p for p in c.phenotypes if p.frequency != 0.0]
        assert len(present_c) == min(6, len(present_f))
        # nothing left out is more frequent than anything kept; excluded (frequency 0) facts all stay
        dropped = [p for p in present_f if p not in present_c]
        assert not dropped or max(freq(p) for p in dropped) <= min(freq(p) for p in present_c)
        assert [p for p in f.phenotypes if p.frequency == 0.0] == [p for p in c.phenotypes if p.frequency == 0.0]
        assert (c.name, c.synonyms, c.genes, c.onset, c.inheritance) == (f.name, f.synonyms, f.genes, f.onset,
                                                                          f.inheritance)
    marfan = onto.disease(MARFAN)
    assert core_phenotypes(marfan, 10_000) is marfan  # fewer findings than k: unchanged
    ids = select_diseases(onto, _spec(kind="ids", ids=MARFAN, max_phenotypes=3))
    assert len([p for p in ids[0].phenotypes if p.frequency != 0.0]) == 3


@pytest.mark.parametrize("kw,field", [
    (dict(max_phenotypes=-1), "data.diseases.max_phenotypes"),
    (dict(kind="some"), "data.diseases.kind"),
    (dict(n=0), "data.diseases.n"),
    (dict(n=10 ** 6), "data.diseases.n"),
    (dict(min_phenotypes=-1), "data.diseases.min_phenotypes"),
    (dict(seed=-2), "data.diseases.seed"),
    (dict(kind="ids", ids=""), "data.diseases.ids"),
    (dict(kind="ids", ids="OMIM:154700,OMIM:999999"), "OMIM:999999"),
    (dict(kind="ids", ids="Marfan"), "data.diseases.ids"),
])
def test_select_errors_name_the_field(onto, kw, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        select_diseases(onto, _spec(**kw))
