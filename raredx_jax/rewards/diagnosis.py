"""The diagnosis verifier: parse the ``<answer>`` ranked list, link each entry, report the gold's rank.

Shared by RERS (keep a trajectory only when the gold is at rank 1), GRPO (rank-aware reward) and evaluation
(top-k recall). Everything here is plain Python: it runs on the host on decoded text.

Parsing rules (:func:`parse_answer`), in order:

* The **last** ``<answer>`` block counts (a model that "changes its mind" is judged on its final answer). An
  opening tag without a closing one (a completion cut at ``max_new_tokens``) still yields entries, but
  ``format_ok`` is False. No ``<answer>`` tag at all gives no entries: prose is never graded.
* The block is split into lines; a line with several inline markers (``1. A 2. B``) is split at them.
* Each line loses its list marker: numbering ``1.`` ``1)`` ``1:`` ``#1`` ``(1)`` ``[1]`` ``Rank 1:``, bullets
  ``-`` ``*`` ``•`` ``+`` ``–``, markdown emphasis, and a prose lead-in such as ``Most likely:`` or
  ``Differential diagnosis:`` (a short prefix before ``:`` containing a word like *likely*, *diagnosis*,
  *differential*, *answer*, *consider*). A header line with nothing after its colon is dropped.
* A line **without** a list marker is further split at ``;`` and ``,`` -- but comma pieces that read as
  qualifiers of the previous name (``type IV``, ``autosomal dominant 72``, ``Nievergelt type``, ``infantile
  form``, a number, or any lower-case piece when the line has mixed case) are glued back, because half of
  OMIM's names contain commas (``Deafness, autosomal dominant 72``). Marked lines are never split.
* A trailing ontology id in parentheses or brackets (``Marfan syndrome (OMIM:154700)``) is removed from the
  name and kept in ``ParsedAnswer.ids``; a bare id (``ORPHA:558``) is an entry of its own.
* Confidence notes and explanations are cut: a trailing parenthetical with a confidence word or a
  percentage (``(high confidence)``, ``(70%)``), a spaced dash and what follows (``X - fits the lens
  dislocation``), a trailing ``: 0.7`` / ``, 65%`` / ``: explains ...``.
* Entries like ``none``/``unknown``/``n/a`` are dropped; duplicates (case/space-insensitive, or the same id)
  are dropped keeping the first; at most :data:`MAX_ENTRIES` entries are kept.

:func:`verify` links each of the first ``top_k`` entries with the :class:`~raredx_jax.data.linking.DiseaseLinker`
(an entry's ontology id wins when the linker knows it, else its name is linked; when several diseases tie
for the best score -- "Marfan syndrome" is both OMIM:154700 and ORPHA:558 -- a gold id among them is taken),
removes later entries that link to an already-listed disease (a repeated disease does not push the gold
down), and reports the 1-based rank of the first entry whose id is a gold id.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable

MAX_ENTRIES = 50

_ANSWER_OPEN = re.compile(r"<\s*answer\s*>", re.IGNORECASE)
_ANSWER_CLOSE = re.compile(r"<\s*/\s*answer\s*>", re.IGNORECASE)
_THINK_BLOCK = re.compile(r"<\s*think\s*>(.*?)<\s*/\s*think\s*>", re.IGNORECASE | re.DOTALL)

# Ontology ids: OMIM:154700, OMIM #154700, MIM 154700, ORPHA:558, Orphanet 558, DECIPHER:1.
_ID_RE = re.compile(r"\b(OMIM|MIM|ORPHA(?:NET)?|DECIPHER)\s*[:#]?\s*#?\s*(\d{1,7})\b", re.IGNORECASE)
_ID_PREFIX = {"omim": "OMIM", "mim": "OMIM", "orpha": "ORPHA", "orphanet": "ORPHA", "decipher": "DECIPHER"}

# A list marker at the start of a line: numbering, "Rank 1:", bullets. Applied repeatedly ("- 1. X").
_MARKER = re.compile(
    r"""^\s*(?:
        (?:rank|no\.?|number|dx|diagnosis)\s*\#?\s*\d+\s*[.):\-]?   # Rank 1: / Dx 2 -
      | \#\s*\d+\s*[.):\-]?                                          # #1  #1.  #1:
      | \(\s*\d+\s*\)                                                # (1)
      | \[\s*\d+\s*\]                                                # [1]
      | \d+\s*(?:[.):]|-(?=\s))(?!\d)                                # 1.  1)  1:  1 -
      | [-*\u2022\u00b7\u2023\u25aa\u25cf+\u2013\u2014>](?=\s|\w|\*)  # - * • · ‣ ▪ ● + – — >
    )\s*""",
    re.IGNORECASE | re.VERBOSE,
)
# Inline numbering inside one line: "1. A 2. B 3. C" (a number marker preceded by whitespace or start).
_INLINE_NUM = re.compile(r"(?:(?<=\s)|^)(?:(\d+)\s*[.)]|\((\d+)\)|#(\d+))(?=\s+\S)(?!\s*\d)")

# Prose lead-ins: a short prefix before ':' containing one of these words is dropped.
_PROSE_WORDS = (
    "likely", "probable", "possible", "possibly", "diagnosis", "diagnoses", "differential", "differentials",
    "answer", "consider", "considered", "alternative", "alternatives", "candidate", "candidates", "final",
    "leading", "primary", "top", "best", "suspected", "suspect", "impression", "ranked", "ranking", "option",
    "options", "other", "others", "less", "more", "dx", "ddx", "conclusion", "working",
)
_PROSE_PREFIX = re.compile(r"^([^:]{0,60}?):\s*(.*)$", re.DOTALL)

_CONFIDENCE = re.compile(
    r"(confiden|likel|probab|possib|certain|suspect|favou?r|unlikely|less|more|high|low|moderate|medium|"
    r"score|weight|rank|top|leading|\d\s*%|^\s*p\s*=|^\s*\d*\.\d+\s*$|^\s*\d+\s*/\s*\d+\s*$)",
    re.IGNORECASE,
)
_TRAILING_PAREN = re.compile(r"\s*[(\[]([^()\[\]]*)[)\]]\s*$")
_SPACED_DASH = re.compile(r"\s+[-\u2013\u2014]{1,2}\s+|\s+\u2013|\s+\u2014|\u2014")
_TRAILING_SCORE = re.compile(r"\s*[:,]\s*(?:p\s*=\s*)?(?:\d*\.\d+|\d+(?:\.\d+)?\s*%)\s*$", re.IGNORECASE)
_MARKDOWN = re.compile(r"[*_`]+")
_EMPTY_ENTRIES = {
    "", "none", "n/a", "na", "unknown", "not sure", "unsure", "no diagnosis", "nothing", "-", "?", "...",
    "i don't know", "i do not know", "undetermined", "other", "others", "etc", "etc.",
}

# Comma pieces that qualify the previous name rather than start a new one.
_QUALIFIER = re.compile(
    r"""^(?:
        (?:autosomal|x-linked|y-linked|mitochondrial|digenic|somatic|familial|hereditary|isolated|sporadic|
           primary|secondary|congenital|infantile|juvenile|adult|neonatal|childhood|early|late|severe|mild|
           lethal|classic|classical|atypical|nonsyndromic|syndromic|progressive|recessive|dominant|
           nuclear|susceptibility|modifier|included|with|without|due\ to|and|or|type|types|form|group|
           complementation|variant|subtype|biallelic|monoallelic|benign|malignant|partial|complete|
           multiple|generalized|localized|combined)\b
      | [\w'-]+(?:\s+[\w'-]+)?\s+(?:type|form|variant|subtype|group)$     # Nievergelt type, infantile form
      | [ivx]+[a-z]?\d*$                                              # IV, IIa
      | \d+[a-z]?\d*$                                                 # 72, 2A, 4B
      | [a-z]?\d+[a-z]?$                                              # A1
      | \(.*\)$                                                       # (French-Canadian)
    )""",
    re.IGNORECASE | re.VERBOSE,
)


@dataclasses.dataclass(frozen=True)
class ParsedAnswer:
    """What :func:`parse_answer` found.

    format_ok: a closed ``<answer>...</answer>`` block with at least one entry exists (the last block counts).
    entries: ranked diagnosis mentions, cleaned, deduplicated (may be non-empty when ``format_ok`` is False:
      truncated answer).
    think: the text of the last closed ``<think>`` block before the answer (None when there is none).
    ids: per entry, the ontology id written with it (``"OMIM:154700"``) or None.
    answer_closed / answer_found: whether the last ``<answer>`` block was closed / any opening tag exists.
    """

    format_ok: bool
    entries: list[str]
    think: str | None = None
    ids: list[str | None] = dataclasses.field(default_factory=list)
    answer_found: bool = False
    answer_closed: bool = False


@dataclasses.dataclass(frozen=True)
class Verification:
    """What :func:`verify` found for one completion.

    rank: 1-based position of the first entry linked to a gold id within the first ``top_k`` entries (after
      dropping repeats of an already-listed disease), or None.
    format_ok: as in :class:`ParsedAnswer`.
    linked: the ontology id of each ranked entry (None where an entry did not link), aligned with ``entries``.
    entries: the ranked entries the rank refers to (at most ``top_k``).
    answers: how many entries the answer listed (deduplicated, before the ``top_k`` cut).
    """

    rank: int | None
    format_ok: bool
    linked: list[str | None]
    entries: list[str]
    answers: int = 0  # entries the answer listed before the top_k cut (GRPO's answer-count limit reads it)

    @property
    def correct(self) -> bool:
        """Gold at rank 1 (the RERS keep rule and the GRPO pass)."""
        return self.rank == 1

    def hit_at(self, k: int) -> bool:
        return self.rank is not None and self.rank <= k


# ---------------------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------------------


def normalize_id(text: str) -> str | None:
    """``"omim #154700"`` -> ``"OMIM:154700"``; None when ``text`` is not exactly one ontology id."""
    m = _ID_RE.fullmatch(text.strip().strip(".,;:()[]"))
    if not m:
        return None
    return f"{_ID_PREFIX[m.group(1).lower()]}:{int(m.group(2))}"


def _find_answer_block(text: str) -> tuple[str | None, bool, int]:
    """(content of the last <answer> block, closed?, start offset of its opening tag)."""
    opens = list(_ANSWER_OPEN.finditer(text))
    if not opens:
        return None, False, len(text)  # no answer block: prose is never graded
    last = opens[-1]
    rest = text[last.end():]
    close = _ANSWER_CLOSE.search(rest)
    if close:
        return rest[: close.start()], True, last.start()
    return rest, False, last.start()


def _strip_markers(line: str) -> tuple[str, bool]:
    marked = False
    for _ in range(3):
        line = _MARKDOWN.sub("", line) if line.lstrip().startswith(("**", "__", "`")) else line
        m = _MARKER.match(line)
        if not m or m.end() == 0:
            break
        rest = line[m.end():]
        if not rest.strip() and not marked:
            # "-" alone or "1." alone: nothing to keep
            return "", True
        line, marked = rest, True
    return line, marked


def _strip_prose_prefix(entry: str) -> tuple[str, bool]:
    """Drop 'Most likely:' style lead-ins. Returns (rest, was_header_only)."""
    m = _PROSE_PREFIX.match(entry)
    if not m or _ID_RE.fullmatch(m.group(1).strip() + ":0"):
        return entry, False
    prefix, rest = m.group(1), m.group(2)
    words = re.findall(r"[a-z]+", prefix.lower())
    if words and len(words) <= 6 and any(w in _PROSE_WORDS for w in words):
        return rest, not rest.strip()
    return entry, False


def _clean_entry(entry: str) -> tuple[str, str | None]:
    """Clean one mention; returns (name, id written with it or None)."""
    s = _MARKDOWN.sub("", entry).strip()
    s = s.strip("\"'\u201c\u201d\u2018\u2019 \t")
    found_id: str | None = None

    # A bare id is its own entry.
    bare = normalize_id(s)
    if bare:
        return "", bare

    s, _ = _strip_prose_prefix(s)
    # Repeatedly peel trailing parentheticals: ids, confidence notes.
    for _ in range(4):
        m = _TRAILING_PAREN.search(s)
        if not m:
            break
        inner = m.group(1)
        ids = [f"{_ID_PREFIX[g.group(1).lower()]}:{int(g.group(2))}" for g in _ID_RE.finditer(inner)]
        if ids:
            found_id = found_id or ids[0]
            s = s[: m.start()]
        elif _CONFIDENCE.search(inner):
            s = s[: m.start()]
        else:
            break
    # Explanations after a spaced dash / em dash.
    dash = _SPACED_DASH.search(s)
    if dash and dash.start() > 0:
        s = s[: dash.start()]
    # Trailing scores "X: 0.7", "X, 65%".
    s = _TRAILING_SCORE.sub("", s)
    # "X: explains the ..." (a colon that is not an id and not a lead-in).
    if ":" in s:
        head, _, tail = s.partition(":")
        if head.strip() and not _ID_RE.search(head + ":0"):
            s = head
    # An id written inline without parentheses: "Marfan syndrome OMIM:154700".
    m = _ID_RE.search(s)
    if m:
        found_id = found_id or f"{_ID_PREFIX[m.group(1).lower()]}:{int(m.group(2))}"
        s = (s[: m.start()] + s[m.end():]).strip()
    s = re.sub(r"\s+", " ", s).strip(" \t.,;:-\u2013\u2014\"'")
    if s.lower() in _EMPTY_ENTRIES:
        s = ""
    return s, found_id


def _split_commas(line: str) -> list[str]:
    """Split an unmarked line at ';' and ',' keeping qualifier pieces attached to their name."""
    has_case = line != line.lower() and line != line.upper()
    out: list[str] = []
    for part in re.split(r";|\bor\b(?=\s+[A-Z])", line):
        pieces = [p.strip() for p in part.split(",")]
        group: list[str] = []
        for p in pieces:
            if not p:
                continue
            glue = bool(group) and (
                _QUALIFIER.match(p) is not None or (has_case and p[0].islower())
            )
            if glue:
                group[-1] = f"{group[-1]}, {p}"
            else:
                group.append(p)
        out.extend(group)
    # "X; XSYM" (OMIM symbol after a semicolon) glues back as well.
    merged: list[str] = []
    for p in out:
        if merged and re.fullmatch(r"[A-Z0-9]{2,10}", p):
            merged[-1] = f"{merged[-1]}; {p}"
        else:
            merged.append(p)
    return merged


def _sequential_markers(line: str) -> list[re.Match]:
    """Inline numbering markers that count 1, 2, 3 ... (so "... dominant 72. 2. X" does not cut at "72.")."""
    cands = [(int(next(g for g in m.groups() if g)), m) for m in _INLINE_NUM.finditer(line)]
    if len(cands) < 2:
        return []
    expected = 1 if any(v == 1 for v, _ in cands) else cands[0][0]
    kept = []
    for v, m in cands:
        if v == expected:
            kept.append(m)
            expected += 1
    return kept if len(kept) >= 2 else []


def _split_lines(content: str) -> list[tuple[str, bool]]:
    """Answer block -> [(raw entry text, came from a marked line)]."""
    out: list[tuple[str, bool]] = []
    for raw in re.split(r"[\r\n]+", content):
        if not raw.strip():
            continue
        # Inline numbering "1. A 2. B" -> several lines.
        inline = _sequential_markers(raw)
        segments = [raw]
        if len(inline) >= 2:
            cuts = [m.start() for m in inline]
            if raw[: cuts[0]].strip() and not _strip_prose_prefix(raw[: cuts[0]])[1]:
                cuts = [0] + cuts
            segments = [raw[a:b] for a, b in zip(cuts, cuts[1:] + [len(raw)])]
        for seg in segments:
            body, marked = _strip_markers(seg)
            body = body.strip()
            if not body:
                continue
            body, header_only = _strip_prose_prefix(_MARKDOWN.sub("", body).strip())
            if header_only or not body.strip():
                continue
            # The lead-in may have hidden a marker: "Most likely: 1. X".
            body2, marked2 = _strip_markers(body)
            if marked2:
                body, marked = body2, True
            if marked:
                out.append((body, True))
            else:
                out.extend((p, False) for p in _split_commas(body))
    return out


def _last_think(text: str, before: int) -> str | None:
    blocks = [m for m in _THINK_BLOCK.finditer(text[:before])]
    return blocks[-1].group(1).strip() if blocks else None


def parse_answer(text: str) -> ParsedAnswer:
    """Parse the ranked differential of the last ``<answer>`` block of ``text`` (see the module doc)."""
    text = text or ""
    content, closed, start = _find_answer_block(text)
    think = _last_think(text, start)
    if content is None:
        return ParsedAnswer(False, [], think, [], answer_found=False, answer_closed=False)
    entries: list[str] = []
    ids: list[str | None] = []
    seen: set[str] = set()
    for raw, _ in _split_lines(content):
        name, eid = _clean_entry(raw)
        if not name and not eid:
            continue
        key_name = re.sub(r"[\W_]+", " ", name.lower()).strip()
        keys = {k for k in (key_name and "n:" + key_name, eid and "i:" + eid) if k}
        if keys & seen:
            continue
        seen |= keys
        entries.append(name or eid)  # a bare id stands for itself
        ids.append(eid)
        if len(entries) >= MAX_ENTRIES:
            break
    return ParsedAnswer(
        format_ok=closed and bool(entries), entries=entries, think=think, ids=ids, answer_found=True,
        answer_closed=closed,
    )


# ---------------------------------------------------------------------------------------------------------
# verification
# ---------------------------------------------------------------------------------------------------------


def _candidates(mention: str, linker: Any, ties: int = 8) -> list[str]:
    """Ids the linker gives ``mention`` at its best score (several when a name is shared, e.g. the OMIM and the
    ORPHA entry of "Marfan syndrome"); best first, empty when nothing links."""
    if hasattr(linker, "link"):
        hits = linker.link(mention, top=1)  # top=1 keeps exact matches on the cheap dictionary path
        if not hits:
            return []
        first = hits[0]
        if getattr(first, "how", "") in ("name", "synonym") and hasattr(linker, "owners"):
            # every disease whose name or synonym the mention spells exactly
            return [first.id] + sorted(set(linker.owners(mention)) - {first.id})
        if getattr(first, "how", "") in ("id", "name", "synonym"):
            return [first.id]
        hits = linker.link(mention, top=ties)
        return [h.id for h in hits if h.score >= first.score - 1e-9]
    best = linker.best(mention)
    return [best] if best else []


def _id_candidates(written_id: str, linker: Any) -> list[str]:
    """[id] when the linker knows the written id, else []."""
    if hasattr(linker, "link"):
        return [h.id for h in linker.link(written_id, top=1) if getattr(h, "how", "id") == "id"]
    return [written_id] if linker.best(written_id) == written_id else []


def link_entry(name: str, written_id: str | None, linker: Any, gold: Iterable[str] = ()) -> str | None:
    """Ontology id of one entry.

    A written id the linker knows wins; otherwise the name is linked. When several diseases tie for the
    mention's best score (a name shared by an OMIM and an ORPHA entry), a gold id among them is preferred,
    so the shared name counts as naming the gold; otherwise the linker's first (deterministic) hit is used.
    """
    cands = _id_candidates(written_id, linker) if written_id else []
    if not cands and name:
        cands = _candidates(name, linker)
    if not cands:
        return None
    gold = set(gold)
    return next((c for c in cands if c in gold), cands[0])


def verify(text: str, gold_ids: Iterable[str] | str, linker: Any, top_k: int = 10) -> Verification:
    """Parse ``text``, link its first ``top_k`` entries, and find the gold's rank (see the module doc).

    gold_ids: one id or several (any of them counts, e.g. an OMIM id and its ORPHA equivalent).
    linker: a :class:`~raredx_jax.data.linking.DiseaseLinker` (anything with ``best(mention) -> id | None``).
    """
    gold = {gold_ids} if isinstance(gold_ids, str) else set(gold_ids)
    gold = {normalize_id(g) or g for g in gold}
    parsed = parse_answer(text)
    entries: list[str] = []
    linked: list[str | None] = []
    seen: set[str] = set()
    for name, wid in zip(parsed.entries, parsed.ids):
        if len(entries) >= top_k:
            break
        did = link_entry(name if name != wid else "", wid, linker, gold)
        if did is not None and did in seen:
            continue  # a repeated disease does not take a rank
        if did is not None:
            seen.add(did)
        entries.append(name)
        linked.append(did)
    rank = next((i + 1 for i, d in enumerate(linked) if d is not None and d in gold), None)
    return Verification(rank=rank, format_ok=parsed.format_ok, linked=linked, entries=entries,
                        answers=len(parsed.entries))


# ---------------------------------------------------------------------------------------------------------
# reward
# ---------------------------------------------------------------------------------------------------------

DECAYS = ("reciprocal", "linear", "geometric", "top1", "topk")


def rank_reward(rank: int | None, top_k: int = 10, decay: str = "reciprocal", base: float = 0.5) -> float:
    """Reward for a gold rank: 1.0 at rank 1, decaying within the top ``top_k``, 0.0 beyond or when absent.

    decay:
      reciprocal -> 1 / rank
      linear     -> 1 - (rank - 1) / top_k          (top_k=5: 1, .8, .6, .4, .2)
      geometric  -> base ** (rank - 1)
      top1       -> 1 at rank 1, else 0 (pass/fail)
      topk       -> 1 anywhere in the top k
    """
    if decay not in DECAYS:
        raise ValueError(f"rewards.decay={decay!r}: expected one of {DECAYS}")
    if rank is None or rank < 1 or rank > top_k:
        return 0.0
    if decay == "reciprocal":
        return 1.0 / rank
    if decay == "linear":
        return 1.0 - (rank - 1) / top_k
    if decay == "geometric":
        return float(base ** (rank - 1))
    if decay == "top1":
        return 1.0 if rank == 1 else 0.0
    return 1.0


def diagnosis_reward(
    verification: Verification | int | None, top_k: int = 10, decay: str = "reciprocal", base: float = 0.5
) -> float:
    """Rank-aware diagnosis reward of a :class:`Verification` (or a bare rank); see :func:`rank_reward`."""
    rank = verification.rank if isinstance(verification, Verification) else verification
    return rank_reward(rank, top_k=top_k, decay=decay, base=base)


__all__ = [
    "ParsedAnswer", "Verification", "parse_answer", "verify", "diagnosis_reward", "rank_reward",
    "normalize_id", "link_entry", "DECAYS", "MAX_ENTRIES",
]
