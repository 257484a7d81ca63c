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


def test_unknown_exemplar_style_is_named(onto, subset):
    with pytest.raises(ValueError, match="knowledge_exemplar_style"):
        knowledge_records(subset, onto, seed=0, passages_per_disease=2, exemplar_style="essay")
