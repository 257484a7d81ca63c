"""Prompt templates render the tags and content the rewards and RERS rely on."""
import pytest

from raredx_jax.data.prompts import (
    SYSTEM_PROMPT,
    closed_set_messages,
    diagnosis_messages,
    format_completion,
    reflection_messages,
)

NOTE = "A 6-year-old girl presents with tall stature and long slender fingers. No seizures."


def test_diagnosis_messages():
    m = diagnosis_messages(NOTE, top_k=3)
    assert [x["role"] for x in m] == ["system", "user"] and m[0]["content"] == SYSTEM_PROMPT
    u = m[1]["content"]
    assert NOTE in u and "top 3" in u and "<think>" in u and "<answer>" in u and "1. ... 2. ..." in u
    with pytest.raises(ValueError, match="top_k"):
        diagnosis_messages(NOTE, top_k=0)
    with pytest.raises(ValueError, match="note"):
        diagnosis_messages("  ")


def test_closed_set_messages():
    m = closed_set_messages(NOTE, ["Marfan syndrome", "Homocystinuria", " "])
    u = m[1]["content"]
    assert "- Marfan syndrome\n- Homocystinuria" in u and NOTE in u and "<answer>" in u
    with pytest.raises(ValueError, match="candidates"):
        closed_set_messages(NOTE, ["Marfan syndrome"])


def test_reflection_messages_give_the_label_only():
    attempt = format_completion("Probably a connective tissue problem.", ["Homocystinuria"])
    m = reflection_messages(NOTE, attempt, "Marfan syndrome")
    u = m[1]["content"]
    assert NOTE in u and attempt in u and "The correct diagnosis is: Marfan syndrome." in u
    assert "Do not say or imply that you were told the answer" in u
    assert "<think>" in u and "<answer>" in u
    with pytest.raises(ValueError, match="gold"):
        reflection_messages(NOTE, attempt, " ")


def test_format_completion_exact():
    assert format_completion(" reasoning ", ["A", "B"]) == "<think>reasoning</think>\n<answer>\n1. A\n2. B\n</answer>"
    with pytest.raises(ValueError, match="ranked_names"):
        format_completion("x", ["", " "])
