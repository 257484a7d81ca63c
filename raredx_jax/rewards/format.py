"""Format reward (think/answer structure) and the DAPO-style overlong length penalty.

The target shape of a completion is::

    <think> ...reasoning... </think>
    <answer>
    1. Disease A
    2. Disease B
    </answer>

:func:`check_format` scores it as the sum of four checks, 0.25 each (partial credit):

===============  ==========================================================================================
``think``        exactly one ``<think>`` and one ``</think>``, in that order, with non-empty reasoning inside
``answer``       exactly one ``<answer>`` and one ``</answer>``, in that order
``entries``      the (last) answer block parses to at least one ranked entry (counts even when truncated)
``structure``    ``think`` and ``answer`` hold, the think block ends before the answer block starts, nothing
                 substantial precedes ``<think>`` or follows ``</answer>`` (at most ``tolerance`` non-space
                 characters, after removing end-of-turn tokens such as ``<|im_end|>``)
===============  ==========================================================================================

So a well-formed completion scores 1.0, a truncated one that opened its answer and listed an entry 0.5 (think +
entries), a completion with no tags at all 0.0. When the chat template pre-fills ``<think>`` into the prompt,
pass ``prefix="<think>"`` so the completion is judged together with it.

:func:`length_penalty` is DAPO's "soft overlong punishment": 0 up to ``max_len - cache_len`` tokens, then
linearly down to -1 at ``max_len``, and -1 beyond (a completion cut at the limit gets -1 when ``truncated``).
"""
from __future__ import annotations

import dataclasses
import re

from raredx_jax.rewards.diagnosis import parse_answer

_T_OPEN = re.compile(r"<\s*think\s*>", re.IGNORECASE)
_T_CLOSE = re.compile(r"<\s*/\s*think\s*>", re.IGNORECASE)
_A_OPEN = re.compile(r"<\s*answer\s*>", re.IGNORECASE)
_A_CLOSE = re.compile(r"<\s*/\s*answer\s*>", re.IGNORECASE)
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<eos>", "<|end|>")

CHECK_WEIGHTS = {"think": 0.25, "answer": 0.25, "entries": 0.25, "structure": 0.25}


@dataclasses.dataclass(frozen=True)
class FormatCheck:
    think: bool
    answer: bool
    entries: bool
    structure: bool

    @property
    def score(self) -> float:
        return float(sum(w for k, w in CHECK_WEIGHTS.items() if getattr(self, k)))

    @property
    def ok(self) -> bool:
        return self.think and self.answer and self.entries and self.structure


def _strip_end_tokens(s: str) -> str:
    for t in END_TOKENS:
        s = s.replace(t, "")
    return s


def check_format(text: str, prefix: str = "", tolerance: int = 8) -> FormatCheck:
    """The four format checks of ``prefix + text`` (see the module doc)."""
    s = _strip_end_tokens((prefix or "") + (text or ""))
    to, tc = list(_T_OPEN.finditer(s)), list(_T_CLOSE.finditer(s))
    ao, ac = list(_A_OPEN.finditer(s)), list(_A_CLOSE.finditer(s))
    think = (
        len(to) == 1 and len(tc) == 1 and to[0].end() <= tc[0].start()
        and bool(s[to[0].end(): tc[0].start()].strip())
    )
    answer = len(ao) == 1 and len(ac) == 1 and ao[0].end() <= ac[0].start()
    entries = bool(parse_answer(s).entries)
    structure = False
    if think and answer:
        before = s[: to[0].start()]
        after = s[ac[0].end():]
        between = s[tc[0].end(): ao[0].start()]
        structure = (
            tc[0].end() <= ao[0].start()
            and len(re.sub(r"\s+", "", before)) <= tolerance
            and len(re.sub(r"\s+", "", after)) <= tolerance
            and len(re.sub(r"\s+", "", between)) <= tolerance
        )
    return FormatCheck(think=think, answer=answer, entries=entries, structure=structure)


def format_reward(text: str, prefix: str = "", tolerance: int = 8) -> float:
    """Format score in [0, 1]: 0.25 per passed check of :func:`check_format`."""
    return check_format(text, prefix=prefix, tolerance=tolerance).score


def length_penalty(length: int, max_len: int, cache_len: int, truncated: bool = False) -> float:
    """DAPO overlong shaping in [-1, 0].

    length: completion length (tokens). max_len: the generation limit. cache_len: width of the soft zone
    before ``max_len`` where the penalty ramps linearly from 0 to -1. ``cache_len <= 0`` gives a hard
    penalty: -1 only when truncated or beyond ``max_len``.
    """
    if max_len <= 0:
        return 0.0
    if truncated or length > max_len:
        return -1.0
    if cache_len <= 0:
        return 0.0
    soft = max_len - cache_len
    if length <= soft:
        return 0.0
    return float(soft - length) / float(cache_len)


__all__ = ["FormatCheck", "check_format", "format_reward", "length_penalty", "CHECK_WEIGHTS", "END_TOKENS"]
