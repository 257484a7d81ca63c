"""DiseaseLinker: ids, names and synonyms link back; perturbed names link at a measured accuracy; junk does not.

The linker grades every answer the model writes (rewards, evaluation), so a mislink is a wrong reward.
Accuracy floors below are set under the measured values (see the comments) so a regression fails loudly.
"""
from __future__ import annotations

import random
import re
import sys

import pytest

from raredx_jax.data.hpo import load_ontology, select_diseases
from raredx_jax.data.linking import DiseaseLinker, LinkHit, normalize_tokens, parse_disease_id

HOWS = {"id", "name", "synonym", "reordered", "loose", "fuzzy"}


@pytest.fixture(scope="module")
def ontology():
    return load_ontology()


@pytest.fixture(scope="module")
def diseases(ontology):
    return ontology.diseases()


@pytest.fixture(scope="module")
def linker(diseases):
    return DiseaseLinker(diseases)


@pytest.fixture(scope="module")
def owners(linker, diseases):
    """normalised string -> ids of every disease owning it as a name or synonym (computed independently of the
    linker's own index, with its public normaliser)."""
    out: dict[str, set[str]] = {}
    for d in diseases:
        for s in (d.name, *d.synonyms):
            out.setdefault(linker.normalize(s), set()).add(d.id)
    return out


@pytest.fixture(scope="module")
def sample(ontology, diseases):
    """A seeded random 300 diseases plus all 40 of the default embedded subset."""
    subset = select_diseases(ontology, {"kind": "random", "n": 40, "seed": 0, "min_phenotypes": 8})
    picked = {d.id: d for d in random.Random(1234).sample(diseases, 300)}
    picked.update({d.id: d for d in subset})
    assert len(subset) == 40
    return list(picked.values())


# ---------------------------------------------------------------------------------------------------------------
# normalisation and ids


@pytest.mark.parametrize("a,b", [
    ("Gaucher disease, type I", "gaucher disease type 1"),
    ("Gaucher disease type one", "GAUCHER DISEASE, TYPE 1"),
    ("Glycogen storage disease IIIa", "glycogen storage disease 3A"),
    ("Mucopolysaccharidosis type IVA", "mucopolysaccharidosis type 4a"),
    ("Neutropenia, severe congenital, V, autosomal recessive", "neutropenia severe congenital 5 autosomal recessive"),
    ("Alzheimer's disease", "Alzheimer disease"),
    ("Haemophilia A", "hemophilia A"),
    ("Marfan syndrome (MFS)", "Marfan syndrome"),
    ("Ehlers–Danlos syndrome", "Ehlers Danlos syndrome"),
    ("Sjögren syndrome", "sjogren syndrome"),
])
def test_normalisation_equates_spelling_variants(a, b):
    assert normalize_tokens(a) == normalize_tokens(b)


@pytest.mark.parametrize("a,b", [
    ("Fragile X syndrome", "Fragile 10 syndrome"),  # a lone X is the chromosome, not a numeral
    ("X-linked hypophosphatemia", "10-linked hypophosphatemia"),
    ("Bardet-Biedl syndrome 2", "Bardet-Biedl syndrome 3"),
    ("Niemann-Pick disease type A", "Niemann-Pick disease type B"),
])
def test_normalisation_keeps_distinctions(a, b):
    assert normalize_tokens(a) != normalize_tokens(b)


def test_parse_disease_id():
    assert parse_disease_id("OMIM:154700") == ["OMIM:154700"]
    assert parse_disease_id("see MIM #154700 and Orphanet 558") == ["OMIM:154700", "ORPHA:558"]
    assert parse_disease_id("ORPHA_558") == ["ORPHA:558"]
    assert parse_disease_id("Marfan syndrome") == []


@pytest.mark.parametrize("mention", ["OMIM:154700", "OMIM 154700", "omim:154700", "MIM #154700", "154700",
                                     "Marfan syndrome (OMIM:154700)"])
def test_omim_id_forms(linker, mention):
    hits = linker.link(mention)
    assert hits and hits[0].id == "OMIM:154700" and hits[0].how == "id" and hits[0].score == 1.0


@pytest.mark.parametrize("mention", ["ORPHA:558", "Orphanet 558", "ORPHA_558", "orpha: 558"])
def test_orpha_id_forms(linker, mention):
    assert linker.best(mention) == "ORPHA:558"


def test_unknown_id_does_not_link(linker):
    assert linker.best("OMIM:999999") is None
    assert linker.best("ORPHA:0") is None


# ---------------------------------------------------------------------------------------------------------------
# every name and synonym links back


def test_every_name_and_synonym_links_back(linker, owners, sample):
    n = 0
    for d in sample:
        for s in (d.name, *d.synonyms):
            hits = linker.link(s)
            assert hits, f"{d.id}: {s!r} did not link"
            own = owners[linker.normalize(s)]
            assert hits[0].id in own, f"{d.id}: {s!r} linked to {hits[0].id} ({hits[0].name!r}), owners {own}"
            assert hits[0].how in ("name", "synonym") and hits[0].score >= 0.99
            n += 1
    print(f"\n{n} names/synonyms of {len(sample)} diseases all link back to an owner")
    assert n >= len(sample)


def test_shared_string_returns_every_owner(linker):
    """'Marfan syndrome' is both OMIM:154700 and ORPHA:558: top-k returns both, deterministically ordered."""
    hits = linker.link("Marfan syndrome", top=5)
    ids = [h.id for h in hits if h.score == 1.0]
    assert {"OMIM:154700", "ORPHA:558"} <= set(ids)
    assert hits == linker.link("Marfan syndrome", top=5)
    assert all(isinstance(h, LinkHit) and 0.0 <= h.score <= 1.0 and h.how in HOWS for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


# ---------------------------------------------------------------------------------------------------------------
# perturbed names

_TO_ROMAN = {str(i): r for i, r in enumerate(
    ",I,II,III,IV,V,VI,VII,VIII,IX,X,XI,XII,XIII,XIV,XV,XVI,XVII,XVIII,XIX,XX".split(",")) if i}
_FROM_ROMAN = {r: a for a, r in _TO_ROMAN.items()}


def perturb_case(s: str, r: random.Random) -> str | None:
    k = r.randrange(3)
    return s.lower() if k == 0 else s.upper() if k == 1 else "".join(
        c.upper() if r.random() < 0.5 else c.lower() for c in s)


def perturb_numerals(s: str, r: random.Random) -> str | None:
    """Arabic <-> roman where writers actually use either: after 'type', or a trailing / comma-delimited
    subtype number (not inside chemical names like '5-phosphate'; not a lone X outside 'type X', which reads
    as the chromosome)."""
    toks = re.split(r"(\s+|,)", s)
    out, changed = [], False
    for i, t in enumerate(toks):
        prev = next((x for x in reversed(toks[:i]) if x.strip()), "")
        nxt = next((x for x in toks[i + 1:] if x.strip()), "")
        positional = prev.lower() == "type" or (nxt in ("", ",") and t != "10")
        if t in _TO_ROMAN and positional:
            out.append(_TO_ROMAN[t])
            changed = True
        elif t in _FROM_ROMAN and (len(t) > 1 or prev.lower() == "type"):
            out.append(_FROM_ROMAN[t])
            changed = True
        else:
            out.append(t)
    return "".join(out) if changed else None


def perturb_order(s: str, r: random.Random) -> str | None:
    """OMIM's inverted 'Head, modifier' order uninverted, or two neighbouring words swapped."""
    if "," in s:
        parts = [p.strip() for p in s.split(",") if p.strip()]
        r.shuffle(parts)
        out = " ".join(parts)
    else:
        w = s.split()
        if len(w) < 2:
            return None
        i = r.randrange(len(w) - 1)
        w[i], w[i + 1] = w[i + 1], w[i]
        out = " ".join(w)
    return out if out != s else None


def perturb_typo(s: str, r: random.Random) -> str | None:
    """One deletion / substitution / transposition / insertion inside a word of >= 5 letters (not a numeral)."""
    spans = [m for m in re.finditer(r"[A-Za-z]{5,}", s) if not re.fullmatch(r"[IVXivx]+", m.group())]
    if not spans:
        return None
    m = r.choice(spans)
    w = m.group()
    i = r.randrange(1, len(w) - 1)
    k = r.randrange(4)
    c = r.choice("abcdefghijklmnopqrstuvwxyz")
    nw = (w[:i] + w[i + 1:], w[:i] + c + w[i + 1:], w[:i] + w[i + 1] + w[i] + w[i + 2:], w[:i] + c + w[i:])[k]
    return s[:m.start()] + nw + s[m.end():] if nw != w else None


def perturb_all(s: str, r: random.Random) -> str | None:
    out = s
    for f in (perturb_numerals, perturb_order, perturb_case, perturb_typo):
        out = f(out, r) or out
    return out if out != s else None


# Floors, with the values measured on hpo3 1.5.1 (HPO 2025-11-24, 12,779 diseases) in brackets:
#   case 0.99 [1.000], numerals 0.97 [1.000], order 0.97 [1.000], typo 0.97 [1.000], all four at once 0.95 [0.991].
# Why these: a mislinked answer is a wrong reward. The curriculum bins a case's pass rate in steps of 1/G
# (G = 8 samples per prompt, 12.5%), so <= 3% label noise on any one kind of variation cannot move a case
# across a difficulty bin on average; stacking all four variations on one mention is harsher than what models
# write, hence 5%. The floors sit 1-3 points under the measurement so a real regression (e.g. numerals no
# longer normalised: ~90% on the numeral set) fails, while a new ontology release does not.
FLOORS = {"case": 0.99, "numerals": 0.97, "order": 0.97, "typo": 0.97, "all": 0.95}
PERTURB = {"case": perturb_case, "numerals": perturb_numerals, "order": perturb_order, "typo": perturb_typo,
           "all": perturb_all}


@pytest.fixture(scope="module")
def numbered(diseases):
    """300 seeded diseases whose name carries a subtype numeral (few of `sample` do: numerals need more)."""
    pool = [d for d in diseases if re.search(r"(^|[\s,])(\d{1,2}|[IVX]+)($|[\s,])", d.name)]
    return random.Random(99).sample(pool, 300)


@pytest.mark.parametrize("kind", list(PERTURB))
def test_perturbed_names_link_accurately(linker, sample, numbered, kind):
    r = random.Random(f"perturb-{kind}")
    ok = total = 0
    misses = []
    for d in (numbered if kind == "numerals" else sample):
        for s in (d.name, *d.synonyms):
            p = PERTURB[kind](s, r)
            if p is None:
                continue
            # fair targets: the disease itself, any disease owning the same string, or the same words in another
            # order when the perturbation itself reordered them (e.g. 'Goldberg-Shprintzen' vs 'Shprintzen-Goldberg')
            fair = {d.id} | linker.owners(s) | linker.owners(s, any_order=True)
            got = linker.best(p)
            total += 1
            ok += got in fair
            if got not in fair and len(misses) < 5:
                misses.append((s, p, got))
    acc = ok / total
    print(f"\nlinker accuracy on {kind} perturbations: {ok}/{total} = {acc:.3f} (floor {FLOORS[kind]}); "
          f"e.g. misses {misses}")
    assert total >= 250
    assert acc >= FLOORS[kind], misses


def test_different_subtype_number_is_not_a_fuzzy_match(linker, sample):
    """'X syndrome 1007' must not fuzzily become 'X syndrome 7': a subtype number is not a typo."""
    checked = 0
    for d in sample:
        m = re.fullmatch(r"(.*\D)(\d+)", d.name)
        if not m:
            continue
        fake = f"{m.group(1)}{int(m.group(2)) + 1000}"
        assert linker.best(fake) is None, (d.name, fake, linker.link(fake))
        checked += 1
    assert checked >= 30


# ---------------------------------------------------------------------------------------------------------------
# junk


@pytest.mark.parametrize("mention", ["headache", "xyzzy", "fever", "", "   ", "the patient is doing well",
                                     "asdfgh qwerty", "not sure", "1.", "common cold", "anxiety"])
def test_unrelated_strings_do_not_link(linker, mention):
    assert linker.best(mention) is None
    assert all(h.score < linker.fuzzy_threshold for h in linker.link(mention, top=5, min_score=0.0))


def test_phenotype_labels_rarely_link_fuzzily(linker, ontology):
    """Near-negatives: HPO phenotype labels are medical phrases that look like disease names. Measured 1.0% of
    a 3,000-label sample link fuzzily above the threshold (mostly legitimate near-synonyms such as 'Anorectal
    anomaly' -> 'Anorectal anomalies'); 3% bounds the damage from a loose threshold."""
    labels = sorted({ontology.label(p.hpo_id) for d in ontology.diseases()[:3000] for p in d.phenotypes})
    labels = random.Random(7).sample(labels, 1000)
    fuzzy = [lab for lab in labels if (h := linker.link(lab)) and h[0].how == "fuzzy"]
    rate = len(fuzzy) / len(labels)
    print(f"\nHPO labels linking fuzzily above threshold: {len(fuzzy)}/{len(labels)} = {rate:.3f}")
    assert rate <= 0.03, fuzzy[:10]


def test_threshold_validation_and_types(diseases):
    with pytest.raises(ValueError, match="fuzzy_threshold"):
        DiseaseLinker(diseases[:5], fuzzy_threshold=1.5)
    small = DiseaseLinker(diseases[:5])
    with pytest.raises(TypeError, match="mention"):
        small.link(None)  # type: ignore[arg-type]
    with pytest.raises(KeyError, match="OMIM:1"):
        small.name("OMIM:1")
    assert len(small) == 5


# ---------------------------------------------------------------------------------------------------------------
# the fuzzy matcher option: builtin (trigram TF-IDF + difflib) or rapidfuzz, same levels, scores and threshold

from raredx_jax.data import linking_bench  # noqa: E402
from raredx_jax.data.linking import FUZZY_MATCHERS  # noqa: E402


@pytest.fixture(scope="module")
def linkers(diseases, linker):
    return {"builtin": linker, "rapidfuzz": DiseaseLinker(diseases, fuzzy="rapidfuzz")}


@pytest.mark.parametrize("matcher", FUZZY_MATCHERS)
@pytest.mark.parametrize("mention,want,how", [
    ("Marfan syndrome", "OMIM:154700", "name"),
    ("Gaucher disease, type I", "OMIM:230800", "name"),
    ("Marfn syndrome", "OMIM:154700", "fuzzy"),  # deletion
    ("Gaucher diseaese type 1", "OMIM:230800", "fuzzy"),  # insertion
    ("Bardet-Biedl syndorme 2", "OMIM:615981", "fuzzy"),  # swap
    ("deficiency Prlolidase", "OMIM:170100", "fuzzy"),  # word order + typo
])
def test_both_fuzzy_matchers_link_exact_and_perturbed_names(linkers, matcher, mention, want, how):
    hits = linkers[matcher].link(mention, top=5)
    assert hits and hits[0].how == how, hits
    assert want in {h.id for h in hits if h.score == hits[0].score}, hits  # a string two ids share: either
    assert hits[0].score >= linkers[matcher].fuzzy_threshold


@pytest.mark.parametrize("matcher", FUZZY_MATCHERS)
@pytest.mark.parametrize("mention", ["Bardet-Biedl syndrome 1002", "headache", "asdfgh qwerty", "anxiety"])
def test_both_fuzzy_matchers_refuse_wrong_subtypes_and_junk(linkers, matcher, mention):
    assert linkers[matcher].best(mention) is None, linkers[matcher].link(mention, top=3, min_score=0.0)


def test_fuzzy_option_is_validated(diseases):
    with pytest.raises(ValueError, match=r"^fuzzy must be one of 'builtin', 'rapidfuzz', got 'difflib'$"):
        DiseaseLinker(diseases[:5], fuzzy="difflib")
    assert DiseaseLinker(diseases[:5]).fuzzy == "builtin"  # the default stays the measured builtin


def test_rapidfuzz_missing_is_one_clear_line(diseases, monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidfuzz", None)  # what `import rapidfuzz` sees when it is not installed
    with pytest.raises(ImportError, match=r"^fuzzy='rapidfuzz' needs the rapidfuzz package: pip install "
                                          r"'raredx-jax\[rapidfuzz\]'$"):
        DiseaseLinker(diseases[:5], fuzzy="rapidfuzz")


def test_linking_bench_measures_both_matchers_alike(ontology, diseases):
    """A small run of `python -m raredx_jax.data.linking_bench`: both matchers link seeded typos at the rate
    the full run measured (0.99-1.00 on 400+400 diseases; README) and false-link at most 5% of the negatives."""
    pos, neg = linking_bench.build_inputs(ontology, 30, seed=0)
    pos = {k: pos[k] for k in ("exact", "typo-insert", "typo-delete", "typo-swap", "order+typo")}
    neg = {"hpo-label": neg["hpo-label"][:100], "wrong-subtype": neg["wrong-subtype"]}
    res = {m: linking_bench.measure(diseases, m, pos, neg) for m in FUZZY_MATCHERS}
    print("\n" + linking_bench.table(res))
    for m, r in res.items():
        assert all(r["n"][k] >= 25 for k in pos), r["n"]
        assert r["acc"]["exact"] == 1.0, m
        assert min(r["acc"][k] for k in pos) >= 0.95, (m, r["acc"])
        # full run: 2.1% of HPO labels, 1.4% of made-up subtypes; a few of a few dozen here
        assert max(r["false"].values()) <= 0.08, (m, r["false"])
    assert all(res["rapidfuzz"]["false"][k] <= res["builtin"]["false"][k] for k in neg), res
    with pytest.raises(SystemExit):
        linking_bench.main(["--matchers", "builtin,levenshtein"])
