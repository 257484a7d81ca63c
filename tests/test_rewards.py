"""Verifier (parse + link + rank), format / length rewards, the combined reward and the RERS leak check.

The verifier table uses a real DiseaseLinker over a dozen real diseases of the shipped ontology.
"""
import numpy as np
import pytest

from raredx_jax.data.case import Case
from raredx_jax.data.hpo import load_ontology
from raredx_jax.data.linking import DiseaseLinker
from raredx_jax.rewards import (
    DEFAULT_LEAK_PHRASES,
    REWARD_BOUNDS,
    REWARDS,
    RewardFn,
    check_format,
    compute_rewards,
    diagnosis_reward,
    format_reward,
    leak_check,
    length_penalty,
    parse_answer,
    register_reward,
    rewards_config,
    verify,
)

MARFAN, MARFAN_ORPHA, LDS1, HCU = "OMIM:154700", "ORPHA:558", "OMIM:609192", "OMIM:236200"
EDS2, STL1, DFNA72, NS1, NS2 = "OMIM:130010", "OMIM:108300", "OMIM:617606", "OMIM:163950", "OMIM:605275"
FABRY, CF, GAUCHER1 = "OMIM:301500", "OMIM:219700", "OMIM:230800"
IDS = [MARFAN, MARFAN_ORPHA, LDS1, HCU, EDS2, STL1, DFNA72, NS1, NS2, FABRY, CF, GAUCHER1]


@pytest.fixture(scope="module")
def linker():
    onto = load_ontology()
    diseases = [onto.disease(i) for i in IDS]
    # the names the table relies on (a changed ontology should fail here, not in a confusing row)
    assert diseases[0].name == "Marfan syndrome" and diseases[1].name == "Marfan syndrome"
    assert diseases[8].name == "Noonan syndrome 2" and "Autosomal dominant deafness 72" in diseases[6].synonyms
    return DiseaseLinker(diseases)


THINK = "<think>Tall stature, lens dislocation and aortic root dilatation.</think>\n"

# (id, text, gold ids, expected rank, expected format_ok)
TABLE = [
    ("well_formed", THINK + "<answer>\n1. Marfan syndrome\n2. Loeys-Dietz syndrome 1\n</answer>", [MARFAN], 1, True),
    ("well_formed_rank2", THINK + "<answer>\n1. Marfan syndrome\n2. Loeys-Dietz syndrome 1\n</answer>", [LDS1], 2,
     True),
    ("messy_numbering", "<answer>\n1) Fabry disease\n(2) Cystic fibrosis\n#3 Marfan syndrome\n</answer>", [MARFAN],
     3, True),
    ("numbering_colon_rank_words", "<answer>\nRank 1: Fabry disease\nRank 2: Marfan syndrome\n</answer>", [MARFAN],
     2, True),
    ("bullets", "<answer>\n- Noonan syndrome 1\n* Noonan syndrome 2\n\u2022 Fabry disease\n</answer>", [NS2], 2, True),
    ("roman_numeral_synonym", "<answer>1. Noonan syndrome type II</answer>", [NS2], 1, True),
    ("subtype_not_confused", "<answer>1. Noonan syndrome type II</answer>", [NS1], None, True),
    ("synonym", "<answer>1. Autosomal dominant deafness 72</answer>", [DFNA72], 1, True),
    ("reordered_words", "<answer>\n1. Cystic fibrosis\n2. Type 1 Gaucher disease\n</answer>", [GAUCHER1], 2, True),
    ("comma_name_numbered", "<answer>\n1. Ehlers-Danlos syndrome, classic type, 2\n</answer>", [EDS2], 1, True),
    ("one_line_commas_semicolons", "<answer>Fabry disease, Cystic fibrosis; Stickler syndrome, type I</answer>",
     [STL1], 3, True),
    ("prose_and_headers",
     "<answer>\nMost likely: Cystic fibrosis\nDifferential diagnosis:\n- Fabry disease\n- Marfan syndrome (less "
     "likely)\n</answer>", [MARFAN], 3, True),
    ("confidence_notes",
     "<answer>\n1. Cystic fibrosis (high confidence)\n2. Fabry disease - 20%\n3. Gaucher disease, type I: 0.1\n"
     "</answer>", [GAUCHER1], 3, True),
    ("explanation_after_dash", "<answer>\n1. Marfan syndrome \u2014 explains the lens dislocation\n</answer>",
     [MARFAN], 1, True),
    ("markdown", "<answer>\n1. **Marfan syndrome**\n</answer>", [MARFAN], 1, True),
    ("caps_and_tag_case", "<ANSWER>1. MARFAN SYNDROME</ANSWER>", [MARFAN], 1, True),
    ("bare_ids", "<answer>\n1. OMIM:301500\n2. ORPHA:558\n</answer>", [MARFAN_ORPHA], 2, True),
    ("bare_id_other_record", "<answer>\n1. OMIM:301500\n2. ORPHA:558\n</answer>", [MARFAN], None, True),
    ("trailing_id", "<answer>\n1. Fabry disease\n2. Marfan syndrome (OMIM:154700)\n</answer>", [MARFAN], 2, True),
    ("id_beats_name", "<answer>\n1. Some syndrome (MIM #219700)\n</answer>", [CF], 1, True),
    ("shared_name_counts_for_either_record", "<answer>1. Marfan syndrome</answer>", [MARFAN_ORPHA], 1, True),
    ("repeat_does_not_push_gold_down", "<answer>\n1. Fabry disease\n2. OMIM:301500\n3. Marfan syndrome\n</answer>",
     [MARFAN], 2, True),
    ("inline_numbering", "<answer>1. Fabry disease 2. Marfan syndrome 3. Cystic fibrosis</answer>", [MARFAN], 2,
     True),
    ("unlinked_entry_takes_a_rank", "<answer>\n1. connective tissue disorder\n2. Marfan syndrome\n</answer>",
     [MARFAN], 2, True),
    ("wrong", THINK + "<answer>\n1. Fabry disease\n2. Cystic fibrosis\n</answer>", [MARFAN], None, True),
    ("empty_block", THINK + "<answer>\n</answer>", [MARFAN], None, False),
    ("none_entry", THINK + "<answer>None</answer>", [MARFAN], None, False),
    ("no_answer_tag_prose_not_graded", "<think>I believe this is Marfan syndrome.</think>", [MARFAN], None, False),
    ("empty_text", "", [MARFAN], None, False),
    ("truncated", THINK + "<answer>\n1. Marfan syndrome\n2. Fab", [MARFAN], 1, False),
    ("multiple_blocks_last_counts", "<answer>1. Fabry disease</answer> wait, reconsider. "
     "<answer>1. Marfan syndrome</answer>", [MARFAN], 1, True),
    ("multiple_blocks_first_ignored", "<answer>1. Fabry disease</answer> wait, reconsider. "
     "<answer>1. Marfan syndrome</answer>", [FABRY], None, True),
    ("either_gold_id", "<answer>\n1. Cystic fibrosis\n2. ORPHA:558\n</answer>", [MARFAN, MARFAN_ORPHA], 2, True),
]


@pytest.mark.parametrize("row", TABLE, ids=[r[0] for r in TABLE])
def test_verify_table(linker, row):
    _, text, gold, rank, fmt = row
    v = verify(text, gold, linker, top_k=10)
    assert (v.rank, v.format_ok) == (rank, fmt), (v, parse_answer(text))
    assert len(v.linked) == len(v.entries)
    assert v.correct == (rank == 1)


def test_verify_top_k_cuts_the_list(linker):
    text = "<answer>\n1. Fabry disease\n2. Cystic fibrosis\n3. Marfan syndrome\n</answer>"
    assert verify(text, [MARFAN], linker, top_k=3).rank == 3
    v = verify(text, [MARFAN], linker, top_k=2)
    assert v.rank is None and len(v.entries) == 2
    assert v.hit_at(2) is False


# --------------------------------------------------------------------------------------------------------
# parsing without a linker
# --------------------------------------------------------------------------------------------------------

PARSE = [
    ("<answer>\n1. A syndrome\n2. B disease\n</answer>", True, ["A syndrome", "B disease"]),
    ("<answer>1) A syndrome\n(2) B disease\n#3 C disease\n[4] D disease\n5: E disease</answer>", True,
     ["A syndrome", "B disease", "C disease", "D disease", "E disease"]),
    ("<answer>- A syndrome\n* B disease\n\u2022 C disease\n+ D disease</answer>", True,
     ["A syndrome", "B disease", "C disease", "D disease"]),
    ("<answer>Final answer: A syndrome, B disease; C disease</answer>", True, ["A syndrome", "B disease", "C disease"]),
    # OMIM-style qualifiers stay attached on an unmarked line
    ("<answer>Deafness, autosomal dominant 72, Stickler syndrome, type IV, Mesomelic dysplasia, Nievergelt type"
     "</answer>", True, ["Deafness, autosomal dominant 72", "Stickler syndrome, type IV",
                         "Mesomelic dysplasia, Nievergelt type"]),
    ("<answer>1. Cardiomyopathy, familial hypertrophic, 10\n2. X syndrome: 0.7\n3. Y disease, 65%\n"
     "4. Z disease (p=0.1)</answer>", True,
     ["Cardiomyopathy, familial hypertrophic, 10", "X syndrome", "Y disease", "Z disease"]),
    ("<answer>1. Immunodeficiency 101 (varicella zoster virus-specific)</answer>", True,
     ["Immunodeficiency 101 (varicella zoster virus-specific)"]),
    ("<answer>1. A syndrome\n2. a  SYNDROME\n3. B disease</answer>", True, ["A syndrome", "B disease"]),
    ("<answer>Top differential:\n\n1. A syndrome</answer>", True, ["A syndrome"]),
    ("<answer>1. A syndrome\n2. B di", False, ["A syndrome", "B di"]),
    # inline numbering only cuts at markers counting 1, 2, 3 (not at the "72." of a name)
    ("<answer>1. Deafness, autosomal dominant 72. 2. B disease</answer>", True,
     ["Deafness, autosomal dominant 72", "B disease"]),
    ("<answer>Top 3: (1) A syndrome (2) B disease (3) C disease</answer>", True,
     ["A syndrome", "B disease", "C disease"]),
    ("<answer></answer>", False, []),
    ("no tags", False, []),
]


@pytest.mark.parametrize("text,fmt,entries", PARSE)
def test_parse_table(text, fmt, entries):
    p = parse_answer(text)
    assert (p.format_ok, p.entries) == (fmt, entries)


def test_parse_ids_and_think():
    p = parse_answer("<think> why </think><answer>1. A syndrome (OMIM: 123)\n2. orphanet 55\n3. MIM #7</answer>")
    assert p.think == "why"
    assert p.entries == ["A syndrome", "ORPHA:55", "OMIM:7"]
    assert p.ids == ["OMIM:123", "ORPHA:55", "OMIM:7"]
    assert parse_answer("<answer>x</answer>").think is None


# --------------------------------------------------------------------------------------------------------
# rewards
# --------------------------------------------------------------------------------------------------------


def test_diagnosis_reward_decays():
    assert [diagnosis_reward(r, 5, "reciprocal") for r in (1, 2, 4, 5, 6, None)] == [1, 0.5, 0.25, 0.2, 0, 0]
    assert [diagnosis_reward(r, 5, "linear") for r in (1, 2, 3, 5, 6)] == pytest.approx([1, 0.8, 0.6, 0.2, 0])
    assert [diagnosis_reward(r, 5, "geometric") for r in (1, 2, 3)] == [1, 0.5, 0.25]
    assert [diagnosis_reward(r, 5, "top1") for r in (1, 2)] == [1, 0]
    assert [diagnosis_reward(r, 5, "topk") for r in (1, 5, 6)] == [1, 1, 0]
    with pytest.raises(ValueError, match="decay"):
        diagnosis_reward(1, 5, "cosine")


def test_diagnosis_reward_from_verification(linker):
    v = verify("<answer>1. Fabry disease\n2. Marfan syndrome</answer>", [MARFAN], linker)
    assert diagnosis_reward(v, top_k=10) == 0.5
    assert diagnosis_reward(v, top_k=1) == 0.0


GOOD = "<think>reasoning</think>\n<answer>\n1. A syndrome\n</answer>"
FORMAT = [
    (GOOD, 1.0),
    (GOOD + "<|im_end|>", 1.0),  # end-of-turn token is not trailing text
    (GOOD + "\nok", 1.0),  # <= tolerance
    (GOOD + "\nAnd here is a long trailing explanation.", 0.75),  # structure lost
    ("<answer>\n1. A syndrome\n</answer>", 0.5),  # no think: answer + entries
    ("<think>reasoning</think>\n<answer>\n1. A syndrome", 0.5),  # truncated: think + entries
    ("<think>reasoning</think>\n<answer>\n</answer>", 0.75),  # no entries: think + answer + structure
    ("<think>  </think><answer>1. A</answer>", 0.5),  # empty reasoning
    ("<think>r</think><answer>1. A</answer><answer>1. B</answer>", 0.5),  # two answers: think + entries
    ("<answer>1. A</answer><think>r</think>", 0.75),  # wrong order: think + answer + entries
    ("Preamble text before.<think>r</think><answer>1. A</answer>", 0.75),
    ("plain prose", 0.0),
]


@pytest.mark.parametrize("text,score", FORMAT)
def test_format_reward_table(text, score):
    assert format_reward(text) == score, check_format(text)


def test_format_prefix_for_prefilled_think():
    text = "reasoning</think>\n<answer>1. A</answer>"
    assert format_reward(text) == 0.5
    assert format_reward(text, prefix="<think>") == 1.0


def test_length_penalty():
    # soft zone (80, 100]: linear 0 -> -1
    assert [length_penalty(n, 100, 20) for n in (10, 80, 90, 100, 120)] == [0, 0, -0.5, -1, -1]
    assert length_penalty(50, 100, 20, truncated=True) == -1
    assert length_penalty(99, 100, 0) == 0 and length_penalty(101, 100, 0) == -1
    assert length_penalty(10_000, 0, 20) == 0  # disabled


def _case(cid, gold, name):
    return Case(id=cid, text="note", diagnosis=(gold,), diagnosis_name=name)


def test_compute_rewards_components_and_total(linker):
    cases = [_case("c1", MARFAN, "Marfan syndrome"), _case("c2", FABRY, "Fabry disease")]
    completions = [
        GOOD.replace("A syndrome", "Marfan syndrome"),  # c1: rank 1, format 1
        "<answer>1. Cystic fibrosis\n2. Marfan syndrome</answer>",  # c1: rank 2, format .5
        "<think>r</think><answer>1. Fabry disease",  # c2: truncated, rank 1, format .5
        "nothing",  # c2: 0
    ]
    cfg = rewards_config()
    cfg.weights = {"diagnosis": 1.0, "format": 0.5, "length": 1.0}
    cfg.combine, cfg.decay = "sum", "reciprocal"  # the plain weighted sum with partial credit (ablation mode)
    cfg.length_max = 100
    cfg.length_cache = 20
    out = compute_rewards(completions, cases, linker, cfg, lengths=[10, 90, 100, 5])
    np.testing.assert_allclose(out["diagnosis"], [1, 0.5, 1, 0])
    np.testing.assert_allclose(out["format"], [1, 0.5, 0.5, 0])
    np.testing.assert_allclose(out["length"], [0, -0.5, -1, 0])
    np.testing.assert_allclose(out["total"], out["diagnosis"] + 0.5 * out["format"] + out["length"], rtol=1e-6)
    np.testing.assert_array_equal(out["rank"], [1, 2, 1, 0])
    np.testing.assert_array_equal(out["pass"], [1, 0, 1, 0])
    np.testing.assert_array_equal(out["format_ok"], [1, 1, 0, 0])
    assert all(v.dtype == np.float32 and v.shape == (4,) for v in out.values())
    # requiring a well-formed answer for the diagnosis reward removes the truncated one's credit
    cfg.diagnosis_requires_format = True
    np.testing.assert_allclose(RewardFn(linker, cfg)(completions, cases, lengths=[1] * 4)["diagnosis"], [1, .5, 0, 0])


def test_reward_fn_full_config_and_registry(linker):
    from ml_collections import config_dict

    full = config_dict.ConfigDict({"sampling": {"max_new_tokens": 8}, "rewards": {"weights": {"diagnosis": 1.0,
                                                                                             "length": 0.5}}})
    fn = RewardFn(linker, full)
    assert fn.length_max == 8
    out = fn(["<answer>1. Marfan syndrome</answer>"], [{"diagnosis": [MARFAN]}], lengths=[8])
    assert set(out) == {"diagnosis", "length", "total", "rank", "pass", "format_ok", "answers"}
    assert out["length"][0] == -1.0  # hit the limit: truncated
    with pytest.raises(ValueError, match="weights.bogus"):
        RewardFn(linker, config_dict.ConfigDict({"weights": {"bogus": 1.0}}))
    with pytest.raises(ValueError, match="rewards.top_kk"):
        RewardFn(linker, config_dict.ConfigDict({"top_kk": 3}))
    with pytest.raises(ValueError, match="completions"):
        fn(["a", "b", "c"], [MARFAN, FABRY])

    @register_reward("_test_brevity")
    def _brevity(ctx):
        return 1.0 if len(ctx.text) < 40 else 0.0

    try:
        cfg = rewards_config()
        cfg.weights = {"diagnosis": 1.0, "_test_brevity": 0.5}
        out = RewardFn(linker, cfg)(["<answer>1. Marfan syndrome</answer>"] * 2, [MARFAN])  # 1 case x G=2
        np.testing.assert_allclose(out["total"], [1.5, 1.5])
    finally:
        REWARDS.pop("_test_brevity")
        REWARD_BOUNDS.pop("_test_brevity")


# --------------------------------------------------------------------------------------------------------
# RERS leak check
# --------------------------------------------------------------------------------------------------------

NOTE = ("A 14-year-old boy with tall stature, ectopia lentis and arachnodactyly. Echocardiography showed aortic "
        "root dilatation. No hearing loss.")
CLEAN = ("<think>The tall stature with arachnodactyly, the ectopia lentis and the aortic root dilatation point to a "
         "fibrillinopathy.</think>\n<answer>\n1. Marfan syndrome\n</answer>")


def test_leak_check_accepts_grounded_reasoning():
    ok, reason = leak_check(CLEAN, NOTE, "Marfan syndrome")
    assert ok, reason


@pytest.mark.parametrize("phrase", DEFAULT_LEAK_PHRASES)
def test_leak_check_rejects_each_default_phrase(phrase):
    text = CLEAN.replace("point to", f"({phrase.upper()}) point to")
    ok, reason = leak_check(text, NOTE, "Marfan syndrome")
    assert not ok and "leak phrase" in reason


def test_leak_check_requires_note_findings():
    # names the diagnosis but no findings of the note
    ok, reason = leak_check("<think>This is clearly Marfan syndrome.</think><answer>1. Marfan syndrome</answer>",
                            NOTE, "Marfan syndrome")
    assert not ok and "finding" in reason
    # one finding is not enough for min_findings=2; enough with min_findings=1
    one = "<think>Arachnodactyly suggests Marfan syndrome.</think>"
    assert not leak_check(one, NOTE, "Marfan syndrome")[0]
    assert leak_check(one, NOTE, "Marfan syndrome", min_findings=1)[0]
    # words of the gold name never count as findings
    assert not leak_check("Marfan syndrome", "Marfan syndrome, tall stature", "Marfan syndrome", min_findings=1)[0]
    # a note with a single finding needs only one
    assert leak_check("tall stature noted", "Tall stature.", "X", min_findings=3)[0]
    assert leak_check("", NOTE, "X") == (False, "empty reasoning")


def test_leak_check_custom_phrases_are_word_bounded():
    assert leak_check(CLEAN, NOTE, "Marfan syndrome", phrases=["fibrillin"])[0]  # inside a word: not a hit
    ok, reason = leak_check(CLEAN, NOTE, "Marfan syndrome", phrases=["fibrillinopathy"])
    assert not ok and "fibrillinopathy" in reason


def test_reward_fn_reads_the_base_config(linker):
    from configs.base import get_config

    fn = RewardFn(linker, get_config())  # no `rewards` section yet: defaults, length limit from sampling
    assert fn.length_max == get_config().sampling.max_new_tokens
    out = fn([GOOD.replace("A syndrome", "Marfan syndrome")], [_case("c", MARFAN, "Marfan syndrome")])
    assert out["total"][0] == pytest.approx(1.0 + 0.2 * 1.0)


def test_grounding_gate_zeroes_right_answers_that_do_not_cite_the_note(linker):
    case = Case(id="m", text=NOTE, diagnosis=(MARFAN,), diagnosis_name="Marfan syndrome")
    recited = "<think>This is clearly Marfan syndrome.</think>\n<answer>\n1. Marfan syndrome\n</answer>"
    wrong_grounded = CLEAN.replace("1. Marfan syndrome", "1. Fabry disease")
    completions = [CLEAN, recited, wrong_grounded]
    cfg = rewards_config()
    cfg.weights = {"diagnosis": 1.0}
    np.testing.assert_allclose(RewardFn(linker, cfg)(completions, [case])["diagnosis"], [1, 1, 0])
    cfg.diagnosis_requires_grounding = True
    out = RewardFn(linker, cfg)(completions, [case])
    np.testing.assert_allclose(out["diagnosis"], [1, 0, 0])  # only the grounded right answer earns it
    np.testing.assert_array_equal(out["pass"], [1, 1, 0])  # pass still reports the verifier's rank
    cfg.leak_min_findings = 0  # the gate uses the leak check's own settings
    np.testing.assert_allclose(RewardFn(linker, cfg)(completions, [case])["diagnosis"], [1, 1, 0])
    with pytest.raises(ValueError, match="diagnosis_requires_grounding needs cases with a note"):
        RewardFn(linker, cfg)([CLEAN], [MARFAN])


# --------------------------------------------------------------------------------------------------------
# the default reward follows top-1 (issue: the reward paid for wrong first answers)
# --------------------------------------------------------------------------------------------------------

def _answer(names, think="Tall stature and lens dislocation.", close=True):
    body = "\n".join(f"{i}. {n}" for i, n in enumerate(names, 1))
    return f"<think>{think}</think>\n<answer>\n{body}\n" + ("</answer>" if close else "")


class _Prompted:
    """A case as GRPO hands it to the reward: the Case plus how many answers its prompt allows."""

    def __init__(self, case, max_answers):
        self.case, self.max_answers = case, max_answers

    def __getattr__(self, name):
        return getattr(self.case, name)


def test_default_reward_never_ranks_a_wrong_first_answer_above_a_right_one(linker):
    """Every pairing inside a group: right first answer (any format, any length, truncated or not) scores
    strictly more than a wrong first answer (gold at rank 2..5, perfect format, shortest); the group of
    [rank 2, miss, miss, miss] that used to hand the rank-2 completion a positive advantage is now flat."""
    case = _Prompted(_case("c1", MARFAN, "Marfan syndrome"), max_answers=5)
    right = [_answer(["Marfan syndrome"]), _answer(["Marfan syndrome", "Fabry disease"], close=False),
             "<answer>1. Marfan syndrome</answer>", _answer(["Marfan syndrome", "Cystic fibrosis"], think="x " * 200)]
    wrong = [_answer(["Fabry disease", "Marfan syndrome"]), _answer(["Cystic fibrosis", "Fabry disease",
                                                                    "Marfan syndrome"]),
             _answer(["Fabry disease"]), "nothing"]
    texts = right + wrong
    lengths = [10, 160, 3, 160, 5, 5, 5, 1]  # right answers at their worst length, wrong at their best
    cfg = rewards_config()
    cfg.length_max, cfg.length_cache = 160, 32
    out = RewardFn(linker, cfg)(texts, [case], lengths=lengths)
    tot = out["total"]
    assert tot[:4].min() > tot[4:].max(), tot
    np.testing.assert_array_equal(out["pass"], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(tot[4:], 0.0)  # no shaping for wrong answers: a group of misses is flat
    fn = RewardFn(linker, cfg)
    assert fn.aligned and fn.right_min == pytest.approx(0.8) and fn.wrong_max == 0.0


def test_listing_the_candidates_does_not_pay(linker):
    """Closed-set prompts allow all candidates but one: copying the candidate list earns no diagnosis reward
    whatever its order; an open prompt's answer longer than the k asked for earns none either."""
    names = ["Marfan syndrome", "Fabry disease", "Cystic fibrosis", "Gaucher disease type I", "Homocystinuria"]
    case = _Prompted(_case("c1", MARFAN, "Marfan syndrome"), max_answers=len(names) - 1)
    fn = RewardFn(linker, rewards_config())
    out = fn([_answer(names), _answer(names[::-1]), _answer(names[:1]), _answer(names[:4])], [case])
    np.testing.assert_array_equal(out["diagnosis"], [0, 0, 1, 1])
    np.testing.assert_array_equal(out["answers"], [5, 5, 1, 4])
    np.testing.assert_array_equal(out["total"][:2], 0.0)
    open_case = _Prompted(case.case, max_answers=3)
    np.testing.assert_array_equal(fn([_answer(names[:4]), _answer(names[:3])], [open_case])["diagnosis"], [0, 1])
    # without a limit on the payload (a plain Case) nothing is enforced
    assert fn([_answer(names)], [case.case])["diagnosis"][0] == 1.0


def test_misaligned_weights_are_refused_in_gated_mode(linker):
    cfg = rewards_config()
    cfg.weights = {"diagnosis": 1.0, "length": 1.0}  # a right answer at the length limit would score 0 = a miss
    with pytest.raises(ValueError, match="first answer is wrong"):
        RewardFn(linker, cfg)
    cfg.weights, cfg.decay = {"diagnosis": 1.0, "length": 0.6}, "reciprocal"  # 1 - 0.6 < rank-2's 0.5
    with pytest.raises(ValueError, match="first answer is wrong"):
        RewardFn(linker, cfg)
    cfg.weights["length"] = 0.4  # 1 - 0.4 > 0.5: aligned even with partial credit
    assert RewardFn(linker, cfg).aligned
    cfg.combine = "sum"  # the legacy sum is reported as misaligned, not refused
    cfg.weights = {"diagnosis": 1.0, "format": 0.2, "length": 0.5}
    assert not RewardFn(linker, cfg).aligned
    cfg.combine = "product"
    with pytest.raises(ValueError, match="combine"):
        RewardFn(linker, cfg)
