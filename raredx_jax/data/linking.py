"""Disease linking: map a free-text disease mention to ontology ids (OMIM:, ORPHA:).

Rewards and evaluation read a model's free-text differential ("Marfan syndrome", "Bardet Biedl syndrome type II",
"OMIM 154700") and must decide which ontology disease each entry names. Matching is tried from the most to the
least certain evidence, and the first levels are plain dictionary look-ups so linking thousands of mentions is
cheap:

1. ``id``        an ontology id written in the mention (``OMIM:154700``, ``MIM #154700``, ``ORPHA 558``)
2. ``name`` / ``synonym``   the normalised mention equals a normalised preferred name / synonym
3. ``reordered`` the same tokens in another order ("Epilepsy, early-onset, 3" = "early onset epilepsy 3")
4. ``loose``     the same after dropping generic words ("syndrome", "disease", "type", ...)
5. ``fuzzy``     character-trigram TF-IDF retrieval of 30 candidates (a sparse dot product in numpy), rescored
                 with an edit similarity (``difflib``, order-insensitive) that penalises disagreeing subtype
                 markers (numbers, single letters: "... type 2" never fuzzily becomes "... type 3") and
                 negated / inverted words ("Non-medullary ...", "Anhidrotic" vs "Hidrotic", hypo- vs hyper-).
                 ``fuzzy="rapidfuzz"`` does the retrieval and edit similarity with rapidfuzz instead (Indel
                 ratio over every string, same penalties, same score scale and threshold).

Normalisation (applied identically to the index and the mention): Unicode folding, case, British spellings,
parentheticals removed, punctuation to spaces, digits split from letters ("1A" -> "1 a"), roman numerals and
number words to arabic ("type IIb" = "type 2b" = "type two b"; a lone "X" stays the chromosome unless it
follows "type"/"group"/...). Names are also indexed without their OMIM "; ABBR" part and "with or without ..."
clause (as synonyms).

Scores: id/name 1.0, synonym 0.99, reordered 0.97, loose 0.93, fuzzy = 0.92 x similarity; ``fuzzy_threshold``
(0.80) applies to every hit (the exact levels are always above it). Measured on all 12,779 hpo3 diseases: every
one of the 16,438 names/synonyms links back to an owner; single typos link correctly at threshold 0.80 (lowest
correct fuzzy score 0.805), while 1% of HPO phenotype labels link fuzzily (mostly true near-synonyms). Cost: the
index builds in ~1 s (+1.5 s for the fuzzy index, on first need); exact look-ups take microseconds, a fuzzy
mention ~2 ms on one CPU core, and results are cached per linker.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import unicodedata
from collections.abc import Sequence
from difflib import SequenceMatcher
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # only for annotations: the linker works on anything with .id, .name, .synonyms
    from raredx_jax.data.hpo import Disease

__all__ = ["LinkHit", "DiseaseLinker", "normalize_tokens", "parse_disease_id"]


@dataclasses.dataclass(frozen=True)
class LinkHit:
    """One candidate disease for a mention; ``how`` says which matching level produced it."""

    id: str
    name: str
    score: float  # in [0, 1]
    how: str  # id | name | synonym | reordered | loose | fuzzy


_SCORES = {"id": 1.0, "name": 1.0, "synonym": 0.99, "reordered": 0.97, "loose": 0.93}
_FUZZY_SCALE = 0.92  # a fuzzy hit never ties with an exact one
DEFAULT_FUZZY_THRESHOLD = 0.80  # see tests/test_data_linking.py for the measured separation
# The fuzzy level's implementation: "builtin" (trigram TF-IDF + difflib) or "rapidfuzz" (optional package);
# measured side by side by `python -m raredx_jax.data.linking_bench` (README, "Disease-name linking").
FUZZY_MATCHERS = ("builtin", "rapidfuzz")
DEFAULT_FUZZY = "builtin"

# --------------------------------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------------------------------

_GREEK = {"α": "alpha", "β": "beta", "γ": "gamma", "δ": "delta", "ε": "epsilon", "κ": "kappa", "λ": "lambda",
          "μ": "mu", "ω": "omega"}
_BRITISH = [  # token-level spelling variants -> US spelling, so "haemophilia" = "hemophilia"
    (re.compile(r"^haem"), "hem"), (re.compile(r"aemia"), "emia"), (re.compile(r"^oedem"), "edem"),
    (re.compile(r"^oesoph"), "esoph"), (re.compile(r"^paed"), "ped"), (re.compile(r"^orthopaed"), "orthoped"),
    (re.compile(r"^leukaem"), "leukem"), (re.compile(r"^foet"), "fet"), (re.compile(r"our$"), "or"),
    (re.compile(r"^ischaem"), "ischem"), (re.compile(r"^coeliac$"), "celiac"), (re.compile(r"^oestr"), "estr"),
    (re.compile(r"^dysaesth"), "dysesth"), (re.compile(r"^anaesth"), "anesth"), (re.compile(r"^hypoaesth"), "hypoesth"),
]
_BRITISH_KEEP = {"four", "our", "your", "pour", "tour", "hour", "sour", "flour", "devour", "contour"}
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
del _NUMBER_WORDS["zero"]


def _to_roman(n: int) -> str:
    out = []
    for value, sym in ((10, "x"), (9, "ix"), (5, "v"), (4, "iv"), (1, "i")):
        while n >= value:
            out.append(sym)
            n -= value
    return "".join(out)


_ROMAN = {_to_roman(i): str(i) for i in range(1, 40)}  # i .. xxxix: only i/v/x, so no English words but "xi"
# A lone "i", "v" or "x" is a numeral only after one of these, or ("i"/"v") as the last word; a lone "x" elsewhere
# is the chromosome ("X-linked", "Fragile X", "Trisomy X").
_ROMAN_CONTEXT = {"type", "types", "group", "class", "form", "grade", "stage", "subtype", "factor",
                  "complementation", "disease", "syndrome", "deficiency", "mucopolysaccharidosis", "mps", "gsd",
                  "collagen", "hyperlipoproteinemia", "hyperlipoproteinaemia", "level", "phase", "and", "or"}
_ROMAN_SUFFIX = re.compile(r"^([ivx]+)([a-h])$")
_NOT_ROMAN = {"via", "vic", "xic", "vie", "ivf"}
_PAREN = re.compile(r"\([^()]*\)|\[[^\[\]]*\]|\{[^{}]*\}")
_DIGIT_LETTER = re.compile(r"(?<=\d)(?=[a-z])|(?<=[a-z])(?=\d)")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")
_NON_ALNUM_KEEP_COMMA = re.compile(r"[^a-z0-9,]+")
_WITH_OR_WITHOUT = re.compile(r",?\s+with or without\b[^,;]*", re.IGNORECASE)
_LIST_PREFIX = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*\u2022])\s+")
# generic words dropped for the `loose` level only (they rarely distinguish two diseases by themselves)
LOOSE_STOP_WORDS = frozenset({"syndrome", "syndromes", "disease", "diseases", "disorder", "disorders", "type",
                              "types", "the", "of", "s", "form"})

_ID_RE = re.compile(r"\b(OMIM|MIM|ORPHANET|ORPHA|ORDO|DECIPHER)\s*[:_#\- ]?\s*#?\s*(\d{1,7})\b", re.IGNORECASE)
_ID_PREFIX = {"omim": "OMIM", "mim": "OMIM", "orphanet": "ORPHA", "orpha": "ORPHA", "ordo": "ORPHA",
              "decipher": "DECIPHER"}


def parse_disease_id(text: str) -> list[str]:
    """Every ontology id written in ``text`` in canonical form (``OMIM:154700``, ``ORPHA:558``)."""
    return [f"{_ID_PREFIX[m.group(1).lower()]}:{int(m.group(2))}" for m in _ID_RE.finditer(text)]


def _fold(text: str) -> str:
    for k, v in _GREEK.items():
        text = text.replace(k, f" {v} ")
    text = unicodedata.normalize("NFKD", text)
    return "".join(c for c in text if not unicodedata.combining(c)).lower()


def _map_token(tok: str, prev: str | None, nxt: str | None) -> list[str]:
    """One token -> normalised token(s). ``prev``/``nxt`` are the neighbours, "," marking a comma boundary."""
    if tok in _NUMBER_WORDS:
        return [_NUMBER_WORDS[tok]]
    seg_start, seg_end = prev in (None, ","), nxt in (None, ",")
    context = prev in _ROMAN_CONTEXT or nxt in ("type", "types")  # "type IC" or "IC type"
    if tok in _ROMAN:
        if (len(tok) > 1 or context
                or (seg_start and seg_end and prev == ",")  # a whole comma part: "Heterotaxy, visceral, I, X-linked"
                or (seg_end and not seg_start and tok != "x")):  # ends a phrase: "Mucolipidosis I"
            return [_ROMAN[tok]]
        return [tok]
    m = _ROMAN_SUFFIX.match(tok)
    if m and tok not in _NOT_ROMAN and m.group(1) in _ROMAN and (len(m.group(1)) > 1 or context
                                                                   or (seg_end and not seg_start)):
        return [_ROMAN[m.group(1)], m.group(2)]
    if tok not in _BRITISH_KEEP and len(tok) > 4:
        for pat, rep in _BRITISH:
            tok = pat.sub(rep, tok)
    return [tok]


@functools.lru_cache(maxsize=200_000)
def normalize_tokens(text: str, drop_parentheticals: bool = True) -> tuple[str, ...]:
    """Tokens of a disease string after the normalisation described in the module docstring."""
    s = _fold(text)
    s = _LIST_PREFIX.sub("", s)
    if drop_parentheticals:
        stripped = s
        for _ in range(3):  # nested parentheses
            stripped = _PAREN.sub(" , ", stripped)
        if _NON_ALNUM.sub("", stripped):  # a string that is only a parenthetical keeps its content
            s = stripped
    s = re.sub(r"['\u2019`]s\b", "", s)  # possessive: "Alzheimer's" = "Alzheimer"
    s = re.sub(r"['\u2019`]", "", s)
    s = s.replace("&", " and ")
    s = re.sub(r"[,;:/]", " , ", s)  # comma-like boundaries are kept as tokens while numerals are read
    s = _NON_ALNUM_KEEP_COMMA.sub(" ", s)
    s = _DIGIT_LETTER.sub(" ", s)
    raw = s.split()
    out: list[str] = []
    for i, tok in enumerate(raw):
        if tok == ",":
            continue
        out.extend(_map_token(tok, raw[i - 1] if i else None, raw[i + 1] if i + 1 < len(raw) else None))
    # "1" and "01" are the same subtype
    return tuple(str(int(t)) if t.isdigit() else t for t in out)


def _sorted_key(tokens: Sequence[str]) -> str:
    return " ".join(sorted(tokens))


def _loose_key(tokens: Sequence[str]) -> str:
    kept = [t for t in tokens if t not in LOOSE_STOP_WORDS]
    return _sorted_key(kept or tokens)


_LONE_ROMAN = {"i": "1", "v": "5", "x": "10"}  # unconverted lone numerals ("type Lattice I" after reordering)


def _markers(tokens: Sequence[str]) -> frozenset[str]:
    """Subtype markers: numbers and single letters ("type 2 a"); two names differing in these are different
    diseases however similar the rest is."""
    return frozenset(_LONE_ROMAN.get(t, t) for t in tokens if t.isdigit() or len(t) == 1)


def _trigrams(norm: str) -> set[str]:
    s = f" {norm} "
    return {s[i:i + 3] for i in range(len(s) - 2)}


_NEGATORS = frozenset({"non", "not", "no", "without", "un"})
_OPPOSITE_PREFIXES = (("hypo", "hyper"), ("an", ""), ("a", ""), ("non", ""), ("in", ""), ("un", ""),
                      ("micro", "macro"), ("brady", "tachy"))


def _opposed_words(a: str, b: str) -> bool:
    """'anhidrotic'/'hidrotic', 'hypoinsulinemia'/'hyperproinsulinemia': one word negates or inverts the other."""
    for p, q in _OPPOSITE_PREFIXES:
        for x, y in ((a, b), (b, a)):
            if x.startswith(p) and y.startswith(q) and len(x) - len(p) >= 4 and not (q == "" and y.startswith(p[-1])):
                # (the last test: "aautosomal" is a doubled letter, not "a-" + "autosomal")
                xs, ys = x[len(p):], y[len(q):]
                if xs == ys or (p and q and xs[:3] == ys[:3]) or (p and q and len(xs) > 5 and xs[-6:] == ys[-6:]):
                    return True
    return False


def _polarity_conflict(m_tokens: Sequence[str], c_tokens: Sequence[str]) -> bool:
    """True when the strings differ by a negation or an opposite prefix, which edit similarity rates as a small
    change although it names the opposite finding ("Non-medullary ..." vs "Medullary ...")."""
    only_m = set(m_tokens) - set(c_tokens)
    only_c = set(c_tokens) - set(m_tokens)
    for extra, other in ((only_m, only_c), (only_c, only_m)):
        for neg in _NEGATORS.intersection(extra):  # unless the other side has it misspelt ("wihtout")
            if not any(SequenceMatcher(None, neg, o).ratio() >= 0.7 for o in other):
                return True
    return any(_opposed_words(a, b) for a in only_m for b in only_c)


class _Similarity:
    """Edit similarity of one mention against many candidates, in [0, 1], order-insensitive, with penalties
    when subtype markers disagree or a word is negated/inverted. The mention is difflib's second sequence, so
    its index is built once; ``quick_ratio`` bounds skip candidates that cannot reach ``floor`` (scored 0)."""

    def __init__(self, m_tokens: tuple[str, ...], floor: float = 0.55):
        self.m_tokens, self.floor = m_tokens, floor
        self.a, self.sa = " ".join(m_tokens), _sorted_key(m_tokens)
        self.m_markers = _markers(m_tokens)
        self._sm = SequenceMatcher(None, autojunk=False)
        self._sm.set_seq2(self.a)
        self._sm_sorted = SequenceMatcher(None, autojunk=False)
        self._sm_sorted.set_seq2(self.sa)

    def __call__(self, c_tokens: tuple[str, ...]) -> float:
        b = " ".join(c_tokens)
        self._sm.set_seq1(b)
        sm = self._sm
        s = sm.ratio() if sm.real_quick_ratio() >= self.floor and sm.quick_ratio() >= self.floor else 0.0
        sb = _sorted_key(c_tokens)
        if sb != b or self.sa != self.a:  # another word order is a slightly weaker match than the same order
            self._sm_sorted.set_seq1(sb)
            if 0.98 * self._sm_sorted.real_quick_ratio() > max(s, self.floor) and \
                    0.98 * self._sm_sorted.quick_ratio() > max(s, self.floor):
                s = max(s, 0.98 * self._sm_sorted.ratio())
        if s <= 0.0:
            return 0.0
        return _penalise(s, self.m_tokens, self.m_markers, c_tokens)


def _penalise(s: float, m_tokens: tuple[str, ...], m_markers: frozenset[str], c_tokens: tuple[str, ...]) -> float:
    """The domain penalties on an edit similarity ``s`` (shared by both fuzzy matchers): subtype markers that
    disagree, and a negated / inverted word."""
    cm = _markers(c_tokens)
    if m_markers != cm:
        # both sides name a subtype and they differ: another disease. One side unspecified: a weaker match.
        s *= 0.75 if (m_markers - cm and cm - m_markers) else 0.9
    if s >= 0.7 and _polarity_conflict(m_tokens, c_tokens):  # only near matches can pass anyway
        s *= 0.85
    return s


def _similarity(m_tokens: tuple[str, ...], c_tokens: tuple[str, ...]) -> float:
    """One-off similarity (see `_Similarity`)."""
    return _Similarity(m_tokens, floor=0.0)(c_tokens)


# --------------------------------------------------------------------------------------------------------------
# linker
# --------------------------------------------------------------------------------------------------------------


class DiseaseLinker:
    """Links disease mentions to the ids of ``diseases`` (see the module docstring for the levels and scores)."""

    _CACHE_SIZE = 65_536

    def __init__(self, diseases: Sequence[Disease], fuzzy_threshold: float = DEFAULT_FUZZY_THRESHOLD,
                 candidates: int = 30, fuzzy: str = DEFAULT_FUZZY):
        if not 0.0 <= fuzzy_threshold <= 1.0:
            raise ValueError(f"fuzzy_threshold must be in [0, 1], got {fuzzy_threshold}")
        if fuzzy not in FUZZY_MATCHERS:
            raise ValueError(f"fuzzy must be one of {', '.join(map(repr, FUZZY_MATCHERS))}, got {fuzzy!r}")
        if fuzzy == "rapidfuzz":
            try:
                import rapidfuzz  # noqa: F401, PLC0415 - optional: the [rapidfuzz] extra, checked when asked for
            except ImportError:
                raise ImportError("fuzzy='rapidfuzz' needs the rapidfuzz package: "
                                  "pip install 'raredx-jax[rapidfuzz]'") from None
        self.fuzzy = fuzzy
        self.fuzzy_threshold = float(fuzzy_threshold)
        self._n_candidates = int(candidates)
        self._names: dict[str, str] = {}
        self._ids: dict[str, str] = {}  # canonical id -> id as the ontology writes it
        self._exact: dict[str, dict[str, str]] = {}  # normalised string -> {disease id: "name"|"synonym"}
        self._reordered: dict[str, set[str]] = {}
        self._loose: dict[str, set[str]] = {}
        self._strings: list[tuple[tuple[str, ...], str]] = []  # unique (tokens, disease id) for fuzzy
        for d in diseases:
            if d.id in self._names:
                continue
            self._names[d.id] = d.name
            for canon in parse_disease_id(d.id) or [d.id]:
                self._ids[canon] = d.id
            self._ids[d.id.upper()] = d.id
            for how, text in [("name", d.name)] + [("synonym", s) for s in d.synonyms]:
                for variant, derived in self._variants(text):
                    self._add(variant, d.id, "synonym" if derived else how)
        self._fuzzy_index: tuple | None = None  # built lazily: exact look-ups need none of it
        self._cache: dict[tuple[str, int], tuple[LinkHit, ...]] = {}  # model answers repeat a lot

    @staticmethod
    def _variants(text: str) -> list[tuple[tuple[str, ...], bool]]:
        """Normalised forms a string is indexed under: without parentheticals, with them, each part of an
        OMIM-style title ``NAME; ABBREVIATION``, and the title without its optional "with or without ..." tail."""
        parts = [text] + ([p for p in text.split(";") if p.strip()] if ";" in text else [])
        head = _WITH_OR_WITHOUT.sub("", text)  # "Epilepsy, early-onset, 3, with or without X" -> "... 3"
        if head != text and head.strip():
            parts.append(head)
        out: list[tuple[tuple[str, ...], bool]] = []  # (tokens, derived: not the string as written)
        for i, p in enumerate(parts):
            for keep in (True, False):
                toks = normalize_tokens(p, keep)
                if toks and toks not in [t for t, _ in out]:
                    out.append((toks, i > 0))
        return out

    def _add(self, tokens: tuple[str, ...], disease_id: str, how: str) -> None:
        key = " ".join(tokens)
        owners = self._exact.setdefault(key, {})
        if owners.get(disease_id) != "name":  # a name beats a synonym of the same disease
            if disease_id not in owners:
                self._strings.append((tokens, disease_id))
            owners[disease_id] = how
        self._reordered.setdefault(_sorted_key(tokens), set()).add(disease_id)
        self._loose.setdefault(_loose_key(tokens), set()).add(disease_id)

    # ---------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._names)

    def name(self, disease_id: str) -> str:
        """Preferred name of a linked id (KeyError naming the id when it is not in this linker)."""
        try:
            return self._names[disease_id]
        except KeyError:
            raise KeyError(f"disease id {disease_id!r} is not among the {len(self._names)} linked diseases") from None

    def normalize(self, text: str) -> str:
        """The normalised key a string is matched under (exposed for tests and debugging)."""
        return " ".join(normalize_tokens(text))

    def owners(self, text: str, any_order: bool = False) -> set[str]:
        """Ids of the diseases owning ``text`` as a name or synonym after normalisation (with ``any_order``: the
        same tokens in any order). A string several diseases own may fairly link to any of them."""
        tokens = normalize_tokens(text)
        if any_order:
            return set(self._reordered.get(_sorted_key(tokens), ()))
        return set(self._exact.get(" ".join(tokens), {}))

    def best(self, mention: str) -> str | None:
        """The best-scoring id at or above the threshold, or None."""
        hits = self.link(mention, top=1)
        return hits[0].id if hits else None

    def link(self, mention: str, top: int = 1, min_score: float | None = None) -> list[LinkHit]:
        """Up to ``top`` hits with score >= ``min_score`` (default: the fuzzy threshold), best first.

        Ties (a string that several diseases own) are broken by level then id, so results are deterministic.
        """
        if not isinstance(mention, str):
            raise TypeError(f"mention must be a str, got {type(mention).__name__}")
        threshold = self.fuzzy_threshold if min_score is None else float(min_score)
        top = max(int(top), 1)
        key = (mention, top)
        hits = self._cache.get(key)
        if hits is None:
            if len(self._cache) >= self._CACHE_SIZE:
                self._cache.clear()
            hits = self._cache[key] = self._link(mention, top)
        return [h for h in hits if h.score >= threshold][:top]

    def _link(self, mention: str, top: int) -> tuple[LinkHit, ...]:
        found: dict[str, LinkHit] = {}

        def add(did: str, score: float, how: str) -> None:
            if did not in found or found[did].score < score:
                found[did] = LinkHit(did, self._names[did], round(float(score), 4), how)

        for canon in parse_disease_id(mention):
            if canon in self._ids:
                add(self._ids[canon], _SCORES["id"], "id")
        bare = mention.strip().lstrip("#")
        if bare.isdigit() and f"OMIM:{int(bare)}" in self._ids:  # a bare MIM number
            add(self._ids[f"OMIM:{int(bare)}"], _SCORES["id"], "id")
        text = _ID_RE.sub(" ", mention)
        tokens = normalize_tokens(text)
        if tokens:
            key = " ".join(tokens)
            for did, how in self._exact.get(key, {}).items():
                add(did, _SCORES[how], how)
            for did in self._reordered.get(_sorted_key(tokens), ()):
                add(did, _SCORES["reordered"], "reordered")
            for did in self._loose.get(_loose_key(tokens), ()):
                add(did, _SCORES["loose"], "loose")
            if len(found) < top:
                for did, sim in self._fuzzy(tokens):
                    add(did, _FUZZY_SCALE * sim, "fuzzy")
        order = {"id": 0, "name": 1, "synonym": 2, "reordered": 3, "loose": 4, "fuzzy": 5}
        hits = sorted(found.values(), key=lambda h: (-h.score, order[h.how], h.id))
        return tuple(hits[:top])

    # ---------------------------------------------------------------------------------------------------------
    def _build_fuzzy(self) -> tuple:
        """Trigram -> (string indices, idf / |string vector|) postings for a sparse TF-IDF cosine in numpy."""
        grams = [_trigrams(" ".join(toks)) for toks, _ in self._strings]
        df: dict[str, int] = {}
        for g in grams:
            for t in g:
                df[t] = df.get(t, 0) + 1
        n = len(grams)
        idf = {t: math.log((n + 1) / (c + 0.5)) for t, c in df.items()}
        rows: dict[str, list[tuple[int, float]]] = {}
        for j, g in enumerate(grams):
            norm = math.sqrt(sum(idf[t] ** 2 for t in g)) or 1.0
            for t in g:
                rows.setdefault(t, []).append((j, idf[t] / norm))
        postings = {t: (np.fromiter((j for j, _ in r), np.int32, len(r)), np.fromiter((w for _, w in r), np.float32,
                                                                                     len(r))) for t, r in rows.items()}
        return postings, idf, n

    _FUZZY_WINDOW = 0.15  # fuzzy hits are exact only within this distance of the best one (enough for top-k)

    def _fuzzy(self, tokens: tuple[str, ...]) -> list[tuple[str, float]]:
        if self.fuzzy == "rapidfuzz":
            return self._fuzzy_rapidfuzz(tokens)
        if self._fuzzy_index is None:
            self._fuzzy_index = self._build_fuzzy()
        postings, idf, n = self._fuzzy_index
        grams = _trigrams(" ".join(tokens))
        q = [t for t in grams if t in postings]
        if not q or n == 0:
            return []
        unseen = math.log((n + 1) / 0.5)  # a trigram no disease string has is as informative as the rarest
        qnorm = math.sqrt(sum(idf.get(t, unseen) ** 2 for t in grams)) or 1.0
        idx = np.concatenate([postings[t][0] for t in q])
        w = np.concatenate([postings[t][1] * (idf[t] / qnorm) for t in q])
        cos = np.bincount(idx, weights=w, minlength=n)
        k = min(self._n_candidates, n)
        cand = np.argpartition(-cos, k - 1)[:k]
        best: dict[str, float] = {}
        sim_to = _Similarity(tokens)
        for j in cand[np.argsort(-cos[cand], kind="stable")]:
            if cos[j] <= 0.1:
                break
            c_tokens, did = self._strings[int(j)]
            sim = sim_to(c_tokens)
            if sim > 0.0 and sim > best.get(did, 0.0):
                best[did] = sim
                # candidates far below the best so far are not worth an exact edit ratio
                sim_to.floor = max(sim_to.floor, sim - self._FUZZY_WINDOW)
        return sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))

    _RAPIDFUZZ_FLOOR = 55.0  # the builtin's candidate floor (`_Similarity`'s 0.55) on rapidfuzz's 0-100 scale

    def _fuzzy_rapidfuzz(self, tokens: tuple[str, ...]) -> list[tuple[str, float]]:
        """The same step with rapidfuzz: the ``candidates`` best strings by Indel similarity (``fuzz.ratio``, a
        full scan in C++), in the written and in the sorted word order (``token_sort_ratio`` with the choices'
        sorted forms precomputed), scored max(ratio, 0.98 x sorted ratio) like the builtin, then the same
        subtype / polarity penalties."""
        from rapidfuzz import fuzz, process  # noqa: PLC0415 - optional: rapidfuzz (the [rapidfuzz] extra)

        if self._fuzzy_index is None:
            self._fuzzy_index = ([" ".join(t) for t, _ in self._strings],
                                 [_sorted_key(t) for t, _ in self._strings])
        plain, ordered = self._fuzzy_index
        a, sa = " ".join(tokens), _sorted_key(tokens)
        floor = self._RAPIDFUZZ_FLOOR
        k = min(self._n_candidates, len(plain))
        cand = {j for _, _, j in process.extract(a, plain, scorer=fuzz.ratio, limit=k, score_cutoff=floor)}
        cand.update(j for _, _, j in process.extract(sa, ordered, scorer=fuzz.ratio, limit=k,
                                                     score_cutoff=floor / 0.98))
        m_markers = _markers(tokens)
        best: dict[str, float] = {}
        for j in cand:
            c_tokens, did = self._strings[j]
            s = fuzz.ratio(a, plain[j]) / 100
            if sa != a or ordered[j] != plain[j]:  # another word order is a slightly weaker match
                s = max(s, 0.98 * fuzz.ratio(sa, ordered[j]) / 100)
            s = _penalise(s, tokens, m_markers, c_tokens)
            if s > best.get(did, 0.0):
                best[did] = s
        return sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))
