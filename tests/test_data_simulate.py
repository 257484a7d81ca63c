"""Simulated notes: no leaks over thousands of notes, frequencies follow the annotations, seeds, knobs, styles."""
import dataclasses
import json
import math
import re

import numpy as np
import pytest

from raredx_jax.data.case import Case
from raredx_jax.data.hpo import load_ontology
from raredx_jax.data.simulate import (
    LEVELS,
    STYLES,
    DifficultyLevel,
    case_rng,
    find_leaks,
    get_level,
    render_note,
    simulate_case,
    simulate_cases,
    usable_phenotypes,
)

MARFAN = "OMIM:154700"


# onto, diseases (40 random): conftest fixtures
@pytest.fixture(scope="module")
def cases(onto, diseases):
    return simulate_cases(diseases, onto, 50, seed=0, levels=list(LEVELS))


def normalise_text(s):
    return " " + " ".join(re.sub(r"[^0-9a-z]+", " ", s.lower()).split()) + " "


def _leaks(text, disease):
    """Independent of the module's guard: whole-word, case- and punctuation-insensitive containment."""
    out = []
    for s in (disease.name, *disease.synonyms):
        if re.fullmatch(r"[A-Z0-9-]{2,8}", s):  # abbreviations: case-sensitive whole token
            if re.search(rf"(?<![A-Za-z0-9]){re.escape(s)}(?![A-Za-z0-9])", text):
                out.append(s)
        elif normalise_text(s) in normalise_text(text):
            out.append(s)
    prefix, num = disease.id.split(":")
    if disease.id in text or re.search(rf"{prefix}\W*{num}\b", text, re.I) or (len(num) >= 4 and num in text):
        out.append(disease.id)
    return out


def test_notes_never_contain_name_synonyms_or_ids(cases, diseases):
    assert len(cases) == 2000
    by_id = {d.id: d for d in diseases}
    for c in cases:
        d = by_id[c.diagnosis[0]]
        assert not _leaks(c.text, d), f"case {c.id} leaks {_leaks(c.text, d)}"
        assert not find_leaks(c.text, d, load_ontology()), c.id
        assert "HP:" not in c.text and d.id not in c.id


def test_diseases_named_like_their_findings_never_leak(onto):
    """Diseases whose phenotype labels contain their own name (e.g. 'Aniridia'): those terms are dropped."""
    risky = [d for d in onto.diseases() if len(d.phenotypes) >= 8
             and any(normalise_text(d.name) in normalise_text(p.label) for p in d.phenotypes)][:25]
    assert len(risky) >= 20
    for d in risky:
        assert all(normalise_text(d.name) not in normalise_text(p.label) for p in usable_phenotypes(d, onto))
        for c in simulate_cases([d], onto, 8, seed=1, levels=list(LEVELS)):
            assert not _leaks(c.text, d), (d.id, c.id)
    marfan = onto.disease(MARFAN)  # eponym: 'Marfanoid habitus' style wording must not appear either
    for c in simulate_cases([marfan], onto, 40, seed=2, levels=list(LEVELS)):
        assert "marfan" not in c.text.lower()


def test_frequencies_follow_annotations(onto, diseases):
    """Uncapped typical level: each term appears with its annotated probability (binomial z per term,
    |z| < 4.5, i.e. < 1e-4 false-alarm rate over ~40 terms; and the summed chi-square within 5 sd of df)."""
    def n_known(d):
        return sum(p.frequency is not None and 0.0 < p.frequency < 1.0 for p in usable_phenotypes(d, onto))
    d = max(diseases, key=n_known)
    assert n_known(d) >= 10
    lv = dataclasses.replace(LEVELS["typical"], name="uncapped", min_terms=1, max_terms=10 ** 6,
                             absent_terms=(0, 0), give_family_history=False)
    n = 500
    counts: dict[str, int] = {}
    for i in range(n):
        c = simulate_case(d, onto, case_rng(11, d.id, i), lv, style="hpi")
        for h in c.present_hpo:
            counts[h] = counts.get(h, 0) + 1
    chi2, df = 0.0, 0
    for p in usable_phenotypes(d, onto):
        k = counts.get(p.hpo_id, 0)
        if p.frequency is None:
            continue
        if p.frequency in (0.0, 1.0):
            assert k == round(p.frequency * n), p.hpo_id
            continue
        z = (k - n * p.frequency) / math.sqrt(n * p.frequency * (1 - p.frequency))
        assert abs(z) < 4.5, (p.hpo_id, p.frequency, k)
        chi2, df = chi2 + z * z, df + 1
    assert df >= 10 and chi2 < df + 5 * math.sqrt(2 * df)


def test_same_seed_same_notes_and_order_independent(onto, diseases):
    a = simulate_cases(diseases[:6], onto, 4, seed=7, levels=["typical", "hard"])
    b = simulate_cases(diseases[:6], onto, 4, seed=7, levels=["typical", "hard"])
    assert [c.to_json() for c in a] == [c.to_json() for c in b]
    c = simulate_cases(diseases[:6], onto, 4, seed=8, levels=["typical", "hard"])
    assert sum(x.text != y.text for x, y in zip(a, c)) >= 0.9 * len(a)
    rev = simulate_cases(diseases[:6][::-1], onto, 4, seed=7, levels=["typical", "hard"])
    assert {x.id: x.text for x in a} == {x.id: x.text for x in rev}
    assert len({x.id for x in a}) == len(a)


def _disease_terms(c, d):
    ann = {p.hpo_id for p in d.phenotypes}
    return [h for h in c.present_hpo if h in ann or h in c.meta["generalised"]]


def test_sparse_keeps_fewer_terms(cases, diseases):
    by_id = {d.id: d for d in diseases}
    n = {lv: [len(_disease_terms(c, by_id[c.diagnosis[0]])) for c in cases if c.level == lv] for lv in LEVELS}
    assert max(n["sparse"]) <= LEVELS["sparse"].max_terms
    assert max(n["typical"]) <= LEVELS["typical"].max_terms
    assert np.mean(n["sparse"]) < 0.5 * np.mean(n["typical"])


def test_noisy_adds_unrelated_findings(onto, cases, diseases):
    by_id = {d.id: d for d in diseases}
    for c in cases:
        noise = c.meta["noise_hpo"]
        lo, hi = LEVELS[c.level].noise_terms
        assert len(noise) <= hi and set(noise) <= set(c.present_hpo)
        if c.level in ("typical", "sparse", "imprecise"):
            assert not noise
        ann = {p.hpo_id for p in by_id[c.diagnosis[0]].phenotypes}
        for h in noise:
            assert h not in ann and not (set(onto.term(h).ancestors) & ann), (c.id, h)
            assert all(h not in onto.term(a).ancestors for a in ann)
    noisy = [len(c.meta["noise_hpo"]) for c in cases if c.level == "noisy"]
    assert np.mean(noisy) >= 2


def test_imprecision_replaces_terms_by_ancestors(onto, cases, diseases):
    by_id = {d.id: d for d in diseases}
    n_gen = {lv: 0 for lv in LEVELS}
    for c in cases:
        ann = {p.hpo_id for p in by_id[c.diagnosis[0]].phenotypes}
        for general, specific in c.meta["generalised"].items():
            assert specific in ann and general in onto.term(specific).ancestors
            assert general in c.present_hpo and general not in onto.organ_systems
        n_gen[c.level] += len(c.meta["generalised"])
    assert n_gen["typical"] == n_gen["sparse"] == n_gen["noisy"] == 0
    assert n_gen["imprecise"] > 100


def test_absent_findings_are_rendered_and_consistent(onto, cases):
    for c in cases:
        assert not set(c.absent_hpo) & set(c.present_hpo)
        present_closure = set(c.present_hpo).union(*(onto.term(h).ancestors for h in c.present_hpo))
        assert not set(c.absent_hpo) & present_closure  # never "no seizures" next to "focal seizures"
        if c.absent_hpo:
            assert re.search(r"\b(no|denies|negative for)\b", c.text, re.I)
    assert np.mean([len(c.absent_hpo) for c in cases if c.level == "typical"]) >= 1


def test_hard_level_gives_no_onset_or_family(cases):
    for c in cases:
        if c.level in ("hard", "sparse"):
            hit = re.search(r"family history|relatives|parents|mother|father|sister|brother|cousin|consanguin",
                            c.text, re.I) is not None
            assert not hit, c.id
        if c.level == "hard":
            hit = "began" in c.text or "first noticed" in c.text or "apparent from birth" in c.text
            assert c.meta["onset_hpo"] == "" and not hit, c.id


def test_family_history_follows_inheritance(onto):
    ad = onto.disease(MARFAN)
    ar = next(d for d in onto.diseases() if d.inheritance == ("HP:0000007",) and len(d.phenotypes) >= 15)
    lv = "typical"
    ad_text = " ".join(c.text for c in simulate_cases([ad], onto, 80, seed=3, levels=[lv]))
    ar_text = " ".join(c.text for c in simulate_cases([ar], onto, 80, seed=3, levels=[lv]))
    assert re.search(r"(mother|father) has similar problems", ad_text)
    assert not re.search(r"cousins|consanguineous", ad_text)
    assert re.search(r"cousins|consanguineous", ar_text) and re.search(r"(brother|sister) has similar", ar_text)
    assert not re.search(r"(Her|His) (mother|father) has similar", ar_text)


def test_styles_render(onto):
    d = onto.disease(MARFAN)
    marks = {"hpi": "History of present illness", "referral": "Dear", "discharge": "DISCHARGE SUMMARY",
             "clinic": "O: "}
    for style in STYLES:
        c = simulate_case(d, onto, np.random.default_rng(0), "typical", style=style)
        assert marks[style] in c.text and c.meta["style"] == style
    with pytest.raises(ValueError, match="note style"):
        simulate_case(d, onto, np.random.default_rng(0), "typical", style="tweet")


def test_render_note_drops_forbidden_wordings(onto):
    text = render_note(onto, ["HP:0001166", "HP:0001083"], ["HP:0001250"], np.random.default_rng(0),
                       sex="female", age_years=6.0, style="hpi", forbidden=("Ectopia lentis", "lens"))
    assert "6-year-old girl" in text and "ectopia lentis" not in text.lower()


def test_level_validation():
    with pytest.raises(ValueError, match="keep_fraction"):
        DifficultyLevel("bad", keep_fraction=0.0)
    with pytest.raises(ValueError, match="noise_terms"):
        DifficultyLevel("bad", noise_terms=(3, 1))
    with pytest.raises(ValueError, match="typical"):
        get_level("impossible")
    assert {"typical", "sparse", "noisy", "imprecise", "hard"} <= set(LEVELS)


def test_case_json_roundtrip(cases):
    for c in cases[:50]:
        assert Case.from_json(json.loads(json.dumps(c.to_json()))) == c
    d = cases[0].to_json()
    with pytest.raises(ValueError, match="diagnosis"):
        Case.from_json({k: v for k, v in d.items() if k != "diagnosis"})
    with pytest.raises(TypeError, match="sex"):
        Case.from_json({**d, "sex": 1})
    with pytest.raises(ValueError, match="sex"):
        Case.from_json({**d, "sex": "other"})
    with pytest.raises(ValueError, match="unknown field"):
        Case.from_json({**d, "gene": "FBN1"})


def test_disease_named_like_a_family_history_sentence_renders(onto):
    """Issue 18 item 11: OMIM:260660 'Cousin syndrome' ended the kind=all build ('every rendering of the note
    leaks the diagnosis (distinctive word 'cousin')'): the drawn family history "The parents are first cousins"
    named it. Now such a note says the family history neutrally; nothing names the disease, and a disease that
    truly cannot be rendered raises UnrenderableError (a ValueError naming it) for the build to leave out."""
    from raredx_jax.data.simulate import UnrenderableError

    d = onto.disease("OMIM:260660")
    cs = simulate_cases([d], onto, 40, seed=0, levels=list(LEVELS))
    assert len(cs) == 40
    assert not any(re.search(r"\bcousin", c.text, re.I) or find_leaks(c.text, d, onto) for c in cs)
    assert any("family history" in c.text.lower() for c in cs)
    # a disease every finding of which names it: the error names the disease and is a ValueError
    named = dataclasses.replace(d, synonyms=tuple(p.label for p in d.phenotypes))
    with pytest.raises(UnrenderableError, match="OMIM:260660") as e:
        simulate_case(named, onto, case_rng(0, d.id, 0))
    assert isinstance(e.value, ValueError) and e.value.disease_id == "OMIM:260660"
