"""Knowledge corpus: facts (names, ids, findings, genes) in several templates; probes in unseen phrasings."""
import pytest

from raredx_jax.data.knowledge import (
    PASSAGE_TEMPLATES,
    PROBE_TEMPLATES,
    TRAINING_QUESTION_STEMS,
    knowledge_probe,
    knowledge_records,
)

MARFAN = "OMIM:154700"


@pytest.fixture(scope="module")
def diseases(onto, diseases):  # conftest's onto and 40 random diseases, plus Marfan
    return diseases + [onto.disease(MARFAN)]


@pytest.fixture(scope="module")
def records(onto, diseases):
    return knowledge_records(diseases, onto, seed=0, passages_per_disease=12)


def test_record_shape(records, diseases):
    assert len([r for r in records if r["kind"] != "exemplar"]) == 12 * len(diseases)
    assert len([r for r in records if r["kind"] == "exemplar"]) == 3 * len(diseases)
    for r in records:
        assert set(r) == {"prompt", "completion", "disease_id", "kind", "template"}
        assert r["completion"].strip()
        if r["kind"] == "exemplar":
            from raredx_jax.rewards.diagnosis import parse_answer
            parsed = parse_answer(r["completion"])
            assert parsed.format_ok and r["prompt"][0]["role"] == "system"
            assert parsed.entries[0] == next(d.name for d in diseases if d.id == r["disease_id"])
        elif r["kind"] == "passage":
            assert r["prompt"] == ""
        else:
            assert r["kind"] == "qa" and r["prompt"][0]["role"] == "user" and r["prompt"][0]["content"][-1] in "?."


def test_records_carry_the_facts(records, diseases):
    for d in diseases:
        mine = [r for r in records if r["disease_id"] == d.id]
        text = " ".join(r["completion"] + str(r["prompt"]) for r in mine)
        assert d.name in text and d.id in text, d.id
        labels = {p.label.lower() for p in d.phenotypes}
        assert sum(label in text.lower() for label in labels) >= 5, d.id
        passages = [r["completion"] for r in mine if r["kind"] == "passage"]
        assert len(set(passages)) == len(passages) == 6
        assert len({r["template"] for r in mine if r["kind"] == "passage"}) == 6
    marfan = " ".join(r["completion"] for r in records if r["disease_id"] == MARFAN)
    assert "FBN1" in marfan and "autosomal dominant" in marfan
    assert any(w in marfan for w in ("very frequent", "frequent", "occasional"))


def test_templates_are_varied(records):
    assert {r["template"] for r in records if r["kind"] == "passage"} == set(PASSAGE_TEMPLATES)
    qa_templates = {r["template"] for r in records if r["kind"] == "qa"}
    assert {"findings_to_disease", "disease_to_findings", "inheritance"} <= qa_templates
    openings = {r["completion"].split()[0] for r in records if r["kind"] == "passage"}
    assert len(openings) >= 10  # not one sentence shape


def test_contrast_names_a_disease_of_the_set_that_shares_findings(onto, records, diseases):
    names = {d.name: d for d in diseases}
    contrasts = [r for r in records if r["template"] == "contrast"]
    assert contrasts
    checked = 0
    for r in contrasts:
        me = onto.disease(r["disease_id"])
        others = [n for n in names if n != me.name and f" and {n} share " in r["completion"]]
        if others:
            other = names[others[0]]
            assert {p.hpo_id for p in me.phenotypes} & {p.hpo_id for p in other.phenotypes}
            checked += 1
    assert checked >= len(contrasts) // 2


def test_qa_both_directions(records, diseases):
    by_id = {d.id: d for d in diseases}
    f2d = [r for r in records if r["template"] == "findings_to_disease"]
    assert f2d and all(by_id[r["disease_id"]].name in r["completion"] for r in f2d)
    assert all(by_id[r["disease_id"]].name not in r["prompt"][0]["content"] for r in f2d)
    d2f = [r for r in records if r["template"] == "disease_to_findings"]
    assert d2f and all(by_id[r["disease_id"]].name in r["prompt"][0]["content"] for r in d2f)


def test_deterministic(onto, diseases, records):
    assert knowledge_records(diseases, onto, seed=0, passages_per_disease=12) == records
    other = knowledge_records(diseases, onto, seed=1, passages_per_disease=12)
    assert sum(a["completion"] != b["completion"] for a, b in zip(records, other)) > len(records) // 3


def test_probe_uses_held_out_phrasing(onto, diseases, records):
    probe = knowledge_probe(diseases, onto, seed=0, n=100)
    assert len(probe) == 100
    ids = {d.id for d in diseases}
    train_prompts = {r["prompt"][0]["content"] for r in records if r["kind"] == "qa"}
    stems = [t.split("{")[0] for t in PROBE_TEMPLATES]
    for item in probe:
        q = item["messages"][0]["content"]
        assert item["answer_id"] in ids and q not in train_prompts
        assert not q.startswith(TRAINING_QUESTION_STEMS)
        name = onto.disease(item["answer_id"]).name
        assert name not in q and item["answer_id"] not in q
    assert not any(p.startswith(tuple(stems)) for p in train_prompts)
    assert not any(s in r["completion"] for s in stems for r in records)
    assert knowledge_probe(diseases, onto, seed=0, n=100) == probe


def test_bad_sizes(onto, diseases):
    with pytest.raises(ValueError, match="knowledge_passages_per_disease"):
        knowledge_records(diseases, onto, seed=0, passages_per_disease=0)
    with pytest.raises(ValueError, match="n"):
        knowledge_probe(diseases, onto, seed=0, n=-1)
