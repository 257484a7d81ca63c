"""Worked diagnostic exemplars of the knowledge corpus: a case in the diagnosis prompt -> the answer format."""
import pytest

from raredx_jax.data.knowledge import knowledge_records
from raredx_jax.data.simulate import find_leaks
from raredx_jax.rewards.diagnosis import parse_answer


@pytest.fixture(scope="module")
def subset(diseases):
    return diseases[:8]


@pytest.mark.parametrize("style", ["note", "vignette"])
def test_exemplars_answer_their_disease_first(onto, subset, style):
    recs = knowledge_records(subset, onto, seed=3, passages_per_disease=4, exemplars_per_disease=4,
                             exemplar_style=style)
    ex = [r for r in recs if r["kind"] == "exemplar"]
    assert len(ex) == 4 * len(subset)
    by_id = {d.id: d for d in subset}
    for r in ex:
        d = by_id[r["disease_id"]]
        system, user = r["prompt"]
        assert system["role"] == "system" and user["content"].startswith("Clinical note:\n")
        note = user["content"].split("\n\n")[0]
        assert not find_leaks(note, d, onto), "the case must not name its diagnosis"
        parsed = parse_answer(r["completion"])
        assert parsed.format_ok and parsed.entries[0] == d.name
        assert parsed.think and d.name in parsed.think
    if style == "note":  # real notes (simulator layouts), several difficulty levels, not one-line vignettes
        assert sum(len(r["prompt"][1]["content"].splitlines()) > 5 for r in ex) > len(ex) // 2


def test_note_exemplars_quote_findings_in_the_order_of_the_note(onto, subset):
    """The reasoning starts by copying the note: every cited finding is written in the note, in note order.
    Why: cited by disease frequency, the tiny model learned to recite the findings of the disease it guessed
    (absent from the note), and RERS's leak check rejected every reflection."""
    import numpy as np

    from raredx_jax.data.knowledge import MAX_CITED_FINDINGS, _exemplar_case

    rng = np.random.default_rng(3)
    n = 0
    for d in subset:
        for i in range(4):
            case = _exemplar_case(d, onto, rng, "note", i)
            if case is None:
                continue
            text, findings, _ = case
            note = text.lower()
            words = [f.split(" (a broader term for ")[0].lower() for f in findings]
            assert 2 <= len(words) <= MAX_CITED_FINDINGS
            pos = [note.find(w) for w in words]
            assert all(p >= 0 for p in pos), (words, note)
            assert pos == sorted(pos), (words, note)
            n += 1
    assert n >= 3 * len(subset)


def test_reflection_attempt_recites_findings_the_note_lacks(onto, subset):
    """The shown failed attempt fails as a policy does (after one finding of the note, the look-alike's own
    findings recited from memory); the target goes back to the note and passes the leak check."""
    from raredx_jax.rewards.combined import leak_check

    recs = knowledge_records(subset, onto, seed=3, passages_per_disease=4, exemplars_per_disease=0,
                             reflection_exemplars_per_disease=2)
    refl = [r for r in recs if r["kind"] == "reflection_exemplar"]
    assert refl
    by_id = {d.id: d for d in subset}
    attempts_lacking_note = 0
    for r in refl:
        user = r["prompt"][1]["content"]
        note = user[len("Clinical note:\n"):user.index("\n\nA previous attempt")]
        attempt = user.split("---\n")[1].rstrip("-\n")
        gold = by_id[r["disease_id"]].name
        attempts_lacking_note += not leak_check(attempt, note, gold, min_findings=2)[0]
        assert leak_check(r["completion"], note, gold)[0]
    assert attempts_lacking_note > len(refl) // 2, "most shown attempts cite fewer than 2 findings of the note"


def test_unknown_exemplar_style_is_named(onto, subset):
    with pytest.raises(ValueError, match="knowledge_exemplar_style"):
        knowledge_records(subset, onto, seed=0, passages_per_disease=2, exemplar_style="essay")


def test_reflection_exemplars_follow_the_rers_contract(onto, subset):
    """Worked reflections: the RERS reflection prompt (note + a failed attempt ranking a look-alike first + the
    gold label) -> reasoning that reaches the gold from the note's findings and passes RERS's leak check."""
    from raredx_jax.data.prompts import reflection_messages
    from raredx_jax.rewards.combined import leak_check

    plain = knowledge_records(subset, onto, seed=3, passages_per_disease=4, exemplars_per_disease=2)
    recs = knowledge_records(subset, onto, seed=3, passages_per_disease=4, exemplars_per_disease=2,
                             reflection_exemplars_per_disease=2)
    assert [r for r in recs if r["kind"] != "reflection_exemplar"] == plain, "adding them changes nothing else"
    refl = [r for r in recs if r["kind"] == "reflection_exemplar"]
    assert len(refl) == 2 * len(subset)
    by_id = {d.id: d for d in subset}
    for r in refl:
        d = by_id[r["disease_id"]]
        user = r["prompt"][1]["content"]
        note = user[len("Clinical note:\n"):user.index("\n\nA previous attempt")]
        attempt = user.split("---\n")[1].rstrip("-\n")
        assert r["prompt"] == reflection_messages(note, attempt, d.name)
        assert not find_leaks(note, d, onto), "the case must not name its diagnosis"
        failed = parse_answer(attempt)
        assert failed.format_ok and failed.entries[0] != d.name, "the shown attempt failed"
        parsed = parse_answer(r["completion"])
        assert parsed.format_ok and parsed.entries[0] == d.name
        assert failed.entries[0] in parsed.entries[1:], "the look-alike is kept lower in the differential"
        ok, why = leak_check(r["completion"], note, d.name)
        assert ok, why


@pytest.mark.parametrize("field", ["exemplars_per_disease", "reflection_exemplars_per_disease"])
def test_negative_exemplar_counts_are_named(onto, subset, field):
    with pytest.raises(ValueError, match=f"data.knowledge_{field} must be >= 0, got -1"):
        knowledge_records(subset, onto, seed=0, passages_per_disease=2, **{field: -1})
