"""Quality rules: per-document features computed once, small rules that compare them with thresholds.

A `Doc` splits the normalized text into lines and words once; the costlier views (word hashes,
n-gram hashes) are computed lazily by the first rule that needs them and shared by the rest.
Each rule is a small unit, `check(doc) -> reason | None`, that also records the values it compared in
`doc.features` and its headroom (how far inside the limit, in [0, 1]) for the quality score.

The rules follow Gopher (Rae et al. 2021, as implemented in datatrove's GopherQuality/Repetition
filters), C4/FineWeb's line heuristics and StarCoder's code filters:
- length in chars and whitespace words; share of control / U+FFFD characters (binary content);
- code: longest line, mean line length (minified), alphanumeric share (binary-like), share of chars in
  runs of >= 64 base64/hex/backslash characters (encoded data);
- prose: mean word length, "#" and ellipsis per word, lines ending in an ellipsis, lines starting
  with a bullet, words without a letter, English stop words (at least 2 of the, be, to, of, and,
  that, have, with; checked only for documents identified as English or not identified);
- repetition: duplicate lines and paragraphs (count share and char share), the most frequent
  n-gram's char share for n = 2..4, and the char share of words covered by a repeat of an earlier
  n-gram for n = 5..10.

Words are maximal runs of non-whitespace (ASCII whitespace) in the UTF-8 bytes, found with numpy, not
str.split: per word a Python loop costs ~60 ns, the vectorised scan ~9 ns per byte in all. A word's
id is a polynomial hash of its bytes mod 2**64 (from one cumulative sum: h(s..e) = (G[e] - G[s]) *
P**-s), and an n-gram's id h_n = h_(n-1) * Q + h(last word); distinct n-grams (n <= 10) collide with
probability ~ pairs / 2**64, i.e. never at document sizes. The top n-gram needs only a sort (counts);
duplicated n-grams need "is there an earlier occurrence?": a plain sort finds the repeated keys, and
only their positions go through a stable sort (a stable argsort of every key costs ~10x a plain sort
of 64-bit keys). Membership tests (stop words, repeated or tied keys) first look up the low 16 bits
of the key in a 65,536-entry table (~2 ns per key) and binary-search only the few that pass (~7 ns
per key for np.searchsorted over all). Byte classes come from bytes.translate, ~4x a numpy table
lookup. Char shares count word
characters (no spaces) over len(text), as datatrove does; a tie for the most frequent n-gram takes
the longest. Duplicated n-grams differ from datatrove's greedy left-to-right skip in one way: every
word covered by a later occurrence of an n-gram is counted once (union of spans), which is the Gopher
paper's definition and is vectorisable. Because a repeated (n+1)-gram covers words that repeated
n-grams also cover, the n = 5 share bounds all larger n: when it is already under every larger n's
limit, those are not computed (their features are then absent). Measured on pydoc topics and license
files: the n-gram rules run at ~34 MB/s per core, 11x a datatrove-style Python version, with
identical top n-gram shares (benchmarks/filters.py).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Protocol

import numpy as np

from corpus.config import FilterConfig, Thresholds

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
BULLETS = ("-", "*", "•", "·", "‣", "◦", "▪", "●", "○", "–")
ELLIPSES = ("...", "…")
ENCODED_RUN = 64  # chars; StarCoder2 drops base64/hex blobs of this length and more

# ASCII letters, and the bytes to delete so that only letters and digits remain (the alphanumeric share).
_WS = b" \t\n\x0b\x0c\r"
_LETTERS = bytes(c for c in range(128) if chr(c).isalpha())
_DIGITS = b"0123456789"
_NOT_ALNUM = bytes(c for c in range(256) if c not in _LETTERS and c not in _DIGITS)
# Base64 / hex / escaped-bytes alphabet -> "a", everything else -> " ".
_ENCODED_MAP = bytes(ord("a") if c in _LETTERS or c in _DIGITS or chr(c) in "+/=\\" else ord(" ") for c in range(256))
_HAS_LETTER = re.compile(r"[^\W\d_]").search
_NON_ALNUM_RE = re.compile(r"[\W_]+")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\f]*\n\s*")


_P = np.uint64(0x9E3779B97F4A7C15)  # odd, so invertible mod 2**64
_P_INV = np.uint64(pow(int(_P), -1, 1 << 64))
_Q = np.uint64(0xC2B2AE3D27D4EB4F)  # n-gram combiner
# Byte -> 1 / 0 translation tables, read as numpy bool arrays after bytes.translate.
_WS_BYTE = bytes(int(c in _WS) for c in range(256))
_ASCII_LETTER_BYTE = bytes(int(c in _LETTERS) for c in range(256))
_HIGH_BYTE = bytes(int(c >= 128) for c in range(256))
_CACHED_POWERS = 1 << 18  # 2 tables x 256 Ki x 8 bytes = 4 MiB kept; longer documents build theirs per call
_powers: list[np.ndarray] = []  # [P**i, P**-i] for i < _CACHED_POWERS, built on first use


def _build_powers(size: int) -> tuple[np.ndarray, np.ndarray]:
    tables = []
    with np.errstate(over="ignore"):
        for base in (_P, _P_INV):
            table = np.empty(size, dtype=np.uint64)
            table[0] = 1
            np.cumprod(np.full(size - 1, base, dtype=np.uint64), out=table[1:])
            tables.append(table)
    return tables[0], tables[1]


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    if n > _CACHED_POWERS:
        return _build_powers(n)
    if not _powers:
        _powers.extend(_build_powers(_CACHED_POWERS))
    return _powers[0], _powers[1]


def hash_words(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hash, byte start, byte end) of each whitespace-separated word in UTF-8 bytes."""
    b = np.frombuffer(data, dtype=np.uint8)
    ws = np.frombuffer(data.translate(_WS_BYTE), dtype=bool)  # bytes.translate: ~4x a numpy table lookup
    padded = np.ones(len(b) + 2, dtype=np.int8)  # whitespace before and after the text
    padded[1:-1] = ws
    edges = padded[1:] - padded[:-1]  # np.diff without its per-call Python overhead (~5 us)
    starts = np.flatnonzero(edges == -1)
    ends = np.flatnonzero(edges == 1)
    pw, inv = _power_tables(len(b) + 1)
    cum = np.zeros(len(b) + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        np.cumsum(b.astype(np.uint64) * pw[: len(b)], out=cum[1:])
        hashes = (cum[ends] - cum[starts]) * inv[starts]
    return hashes, starts, ends


def _stop_word_variants() -> list[str]:
    variants = []
    for word in STOP_WORDS:
        for cased in (word, word.capitalize(), word.upper()):
            variants.extend(cased + suffix for suffix in ("", ",", ".", ";", ":", "!", "?"))
    return variants


_STOP_HASHES = np.unique(hash_words(" ".join(_stop_word_variants()).encode())[0])
_STOP_MAX_BYTES = max(len(v) for v in _stop_word_variants())  # longer words are never looked up
_LOW16 = np.uint64(0xFFFF)
_STOP_TABLE = np.zeros(1 << 16, dtype=bool)
_STOP_TABLE[_STOP_HASHES & _LOW16] = True


_GOPHER_TOP = {2: 0.20, 3: 0.18, 4: 0.16}
_GOPHER_DUP = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}

# Defaults per profile. prose = Gopher's published thresholds (plus FineWeb-style 0.65 language
# confidence); code = StarCoder's (1,000-char lines, mean line <= 100, >= 25% alphanumeric, files
# <= 1 MB) with no natural-language rule; legal = prose with repetition limits about twice as loose,
# because licenses repeat defined terms and bundle several licenses in one file.
PROFILE_DEFAULTS: dict[str, Thresholds] = {
    "prose": Thresholds(
        max_chars=1_000_000,
        min_words=50,
        max_words=100_000,
        max_control_fraction=0.01,
        min_mean_word_length=3.0,
        max_mean_word_length=10.0,
        max_symbol_word_ratio=0.1,
        max_ellipsis_line_fraction=0.3,
        max_bullet_line_fraction=0.9,
        min_alpha_word_fraction=0.8,
        min_stop_words=2,
        max_dup_line_fraction=0.3,
        max_dup_line_char_fraction=0.2,
        max_dup_para_fraction=0.3,
        max_dup_para_char_fraction=0.2,
        max_top_ngram_char_fraction=dict(_GOPHER_TOP),
        max_dup_ngram_char_fraction=dict(_GOPHER_DUP),
        min_language_confidence=0.65,
    ),
    "code": Thresholds(
        min_chars=20,
        max_chars=1_000_000,
        max_control_fraction=0.01,
        max_line_length=1000,
        max_mean_line_length=100.0,
        min_alnum_fraction=0.25,
        max_encoded_data_fraction=0.5,
    ),
    "legal": Thresholds(
        max_chars=1_000_000,
        min_words=20,
        max_words=100_000,
        max_control_fraction=0.01,
        min_mean_word_length=3.0,
        max_mean_word_length=12.0,
        max_symbol_word_ratio=0.1,
        max_ellipsis_line_fraction=0.3,
        max_bullet_line_fraction=0.9,
        min_alpha_word_fraction=0.7,
        min_stop_words=2,
        max_dup_line_fraction=0.6,
        max_dup_line_char_fraction=0.5,
        max_dup_para_fraction=0.6,
        max_dup_para_char_fraction=0.5,
        max_top_ngram_char_fraction={2: 0.4, 3: 0.36, 4: 0.32},
        max_dup_ngram_char_fraction={5: 0.6, 6: 0.58, 7: 0.56, 8: 0.54, 9: 0.52, 10: 0.5},
        min_language_confidence=0.65,
    ),
}


def resolve_thresholds(profile: str, config: FilterConfig | None = None) -> Thresholds:
    """Profile defaults (prose for an unknown name) <- config's top-level values <- config.profiles[profile]."""
    if not isinstance(profile, str) or not profile:
        raise ValueError(f"profile must be a non-empty string, got {profile!r}")
    config = config or FilterConfig()
    base = PROFILE_DEFAULTS.get(profile, PROFILE_DEFAULTS["prose"])
    overrides = {name: getattr(config, name) for name in FilterConfig.THRESHOLDS if getattr(config, name) is not None}
    overrides.update(config.profiles.get(profile, {}))
    thresholds = dataclasses.replace(base, **overrides)
    for lo, hi in (
        ("min_chars", "max_chars"),
        ("min_words", "max_words"),
        ("min_mean_word_length", "max_mean_word_length"),
    ):
        a, b = getattr(thresholds, lo), getattr(thresholds, hi)
        if a is not None and b is not None and a > b:
            raise ValueError(f"filters for profile {profile!r}: {lo} ({a!r}) must be <= {hi} ({b!r})")
    return thresholds


class Doc:
    """A normalized document and its features, each computed once and shared by all rules."""

    def __init__(self, text: str, bad_chars: int = 0, raw_chars: int | None = None) -> None:
        self.text = text
        self.n_chars = len(text)
        self.is_ascii = text.isascii()
        self.bad_chars = bad_chars
        self.raw_chars = self.n_chars if raw_chars is None else raw_chars
        self.language: str | None = None
        self.language_confidence: float | None = None
        self.language_guess: Any = None  # a LanguageGuess precomputed for a batch
        self.reason: str | None = None  # the first failed rule's reason code
        self.next_rule = 0  # index of the next rule to run (a batch pauses before language identification)
        self.features: dict[str, float] = {}
        self.headroom: list[float] = []

    @cached_property
    def ascii_bytes(self) -> bytes:
        """One byte per character (non-ASCII -> "?"), so byte offsets are character offsets."""
        return self.text.encode("ascii", "replace")

    @cached_property
    def lines(self) -> list[str]:
        lines = self.text.split("\n")
        if len(lines) > 1 and not lines[-1]:
            lines.pop()
        return lines

    @cached_property
    def nonblank_lines(self) -> list[str]:
        return [line for line in self.lines if line and not line.isspace()]

    @cached_property
    def utf8(self) -> bytes:
        return self.ascii_bytes if self.is_ascii else self.text.encode("utf-8", "surrogatepass")

    @cached_property
    def _words(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(word hashes, prefix, byte starts, byte ends): prefix[i] = characters in the first i words."""
        hashes, starts, ends = hash_words(self.utf8)
        if self.is_ascii:
            lengths = ends - starts
        else:  # characters = bytes that are not UTF-8 continuation bytes (10xxxxxx)
            b = np.frombuffer(self.utf8, dtype=np.uint8)
            chars = np.zeros(len(b) + 1, dtype=np.int64)
            np.cumsum((b & 0xC0) != 0x80, out=chars[1:])
            lengths = chars[ends] - chars[starts]
        prefix = np.zeros(len(hashes) + 1, dtype=np.int64)
        np.cumsum(lengths, out=prefix[1:])
        return hashes, prefix, starts, ends

    def words_with(self, table: bytes) -> np.ndarray:
        """Per word, whether it holds a byte that the 256-byte translation `table` maps to 1 (others to 0)."""
        _, _, starts, ends = self._words
        counts = np.zeros(len(self.utf8) + 1, dtype=np.int32)
        np.cumsum(np.frombuffer(self.utf8.translate(table), dtype=bool), out=counts[1:])
        return counts[ends] > counts[starts]

    @property
    def word_hashes(self) -> np.ndarray:
        return self._words[0]

    @property
    def word_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(byte starts, byte ends) of the words in `utf8`."""
        return self._words[2], self._words[3]

    @property
    def word_char_prefix(self) -> np.ndarray:
        """prefix[i] = characters in words[:i]; an n-gram at i has prefix[i + n] - prefix[i] characters."""
        return self._words[1]

    @property
    def n_words(self) -> int:
        return len(self._words[0])

    @cached_property
    def _ngram_keys(self) -> dict[int, np.ndarray]:
        return {}

    def ngram_keys(self, n: int) -> np.ndarray:
        """Hash of the n-gram starting at each word (n <= n_words)."""
        cache = self._ngram_keys
        if n not in cache:
            assert self.n_words >= n >= 1, f"ngram_keys({n}) on a document of {self.n_words} words"
            if n == 1:
                cache[1] = self.word_hashes
            else:
                with np.errstate(over="ignore"):
                    cache[n] = self.ngram_keys(n - 1)[:-1] * _Q + self.word_hashes[n - 1 :]
        return cache[n]


class Rule(Protocol):
    name: str
    reasons: ClassVar[tuple[str, ...]]

    def check(self, doc: Doc) -> str | None: ...


def _below(doc: Doc, feature: str, value: float, limit: float, reason: str) -> str | None:
    """Keep when value >= limit; headroom 1 - limit / value."""
    doc.features[feature] = value
    if value < limit:
        return reason
    doc.headroom.append(1.0 - limit / value if value > 0 else 1.0)
    return None


def _above(doc: Doc, feature: str, value: float, limit: float, reason: str) -> str | None:
    """Keep when value <= limit; headroom 1 - value / limit."""
    doc.features[feature] = value
    if value > limit:
        return reason
    doc.headroom.append(1.0 - value / limit if limit > 0 else 1.0)
    return None


@dataclass(frozen=True, slots=True)
class CharCount:
    min_chars: int | None
    max_chars: int | None
    name: str = "char_count"
    reasons: ClassVar[tuple[str, ...]] = ("too_short", "too_long")

    def check(self, doc: Doc) -> str | None:
        if self.min_chars is not None and _below(doc, "n_chars", doc.n_chars, self.min_chars, "too_short"):
            return "too_short"
        if self.max_chars is not None and _above(doc, "n_chars", doc.n_chars, self.max_chars, "too_long"):
            return "too_long"
        return None


@dataclass(frozen=True, slots=True)
class WordCount:
    min_words: int | None
    max_words: int | None
    name: str = "word_count"
    reasons: ClassVar[tuple[str, ...]] = ("too_short", "too_long")

    def check(self, doc: Doc) -> str | None:
        n = doc.n_words
        if self.min_words is not None and _below(doc, "n_words", n, self.min_words, "too_short"):
            return "too_short"
        if self.max_words is not None and _above(doc, "n_words", n, self.max_words, "too_long"):
            return "too_long"
        return None


@dataclass(frozen=True, slots=True)
class ControlChars:
    max_fraction: float
    name: str = "control_chars"
    reasons: ClassVar[tuple[str, ...]] = ("binary_content",)

    def check(self, doc: Doc) -> str | None:
        value = doc.bad_chars / max(doc.raw_chars, 1)
        return _above(doc, "control_fraction", value, self.max_fraction, "binary_content")


@dataclass(frozen=True, slots=True)
class MaxLineLength:
    limit: int
    name: str = "max_line_length"
    reasons: ClassVar[tuple[str, ...]] = ("line_too_long",)

    def check(self, doc: Doc) -> str | None:
        value = max(map(len, doc.lines), default=0)
        return _above(doc, "max_line_length", value, self.limit, "line_too_long")


@dataclass(frozen=True, slots=True)
class MeanLineLength:
    limit: float
    name: str = "mean_line_length"
    reasons: ClassVar[tuple[str, ...]] = ("mean_line_too_long",)

    def check(self, doc: Doc) -> str | None:
        lines = doc.lines
        value = (doc.n_chars - doc.text.count("\n")) / max(len(lines), 1)
        return _above(doc, "mean_line_length", value, self.limit, "mean_line_too_long")


@dataclass(frozen=True, slots=True)
class AlnumFraction:
    limit: float
    name: str = "alnum_fraction"
    reasons: ClassVar[tuple[str, ...]] = ("low_alnum_fraction",)

    def check(self, doc: Doc) -> str | None:
        if doc.is_ascii:
            alnum = len(doc.ascii_bytes.translate(None, _NOT_ALNUM))
        else:
            alnum = len(_NON_ALNUM_RE.sub("", doc.text))
        return _below(doc, "alnum_fraction", alnum / max(doc.n_chars, 1), self.limit, "low_alnum_fraction")


@dataclass(frozen=True, slots=True)
class EncodedData:
    limit: float
    name: str = "encoded_data"
    reasons: ClassVar[tuple[str, ...]] = ("encoded_data",)

    def check(self, doc: Doc) -> str | None:
        mapped = doc.ascii_bytes.translate(_ENCODED_MAP)
        needle = b"a" * ENCODED_RUN
        covered = 0
        pos = mapped.find(needle)
        while pos >= 0:
            end = mapped.find(b" ", pos + ENCODED_RUN)
            end = len(mapped) if end < 0 else end
            covered += end - pos
            pos = mapped.find(needle, end)
        return _above(doc, "encoded_data_fraction", covered / max(doc.n_chars, 1), self.limit, "encoded_data")


@dataclass(frozen=True, slots=True)
class MeanWordLength:
    min_length: float | None
    max_length: float | None
    name: str = "mean_word_length"
    reasons: ClassVar[tuple[str, ...]] = ("short_mean_word_length", "long_mean_word_length")

    def check(self, doc: Doc) -> str | None:
        n = doc.n_words
        value = int(doc.word_char_prefix[-1]) / n if n else 0.0
        if self.min_length is not None and _below(
            doc, "mean_word_length", value, self.min_length, "short_mean_word_length"
        ):
            return "short_mean_word_length"
        if self.max_length is not None and _above(
            doc, "mean_word_length", value, self.max_length, "long_mean_word_length"
        ):
            return "long_mean_word_length"
        return None


@dataclass(frozen=True, slots=True)
class SymbolRatio:
    limit: float
    name: str = "symbol_ratio"
    reasons: ClassVar[tuple[str, ...]] = ("too_many_symbols",)

    def check(self, doc: Doc) -> str | None:
        n = max(doc.n_words, 1)
        text = doc.text
        hashes = text.count("#") / n
        ellipses = (text.count("...") + text.count("…")) / n
        if _above(doc, "hash_word_ratio", hashes, self.limit, "too_many_symbols"):
            return "too_many_symbols"
        return _above(doc, "ellipsis_word_ratio", ellipses, self.limit, "too_many_symbols")


@dataclass(frozen=True, slots=True)
class EllipsisLines:
    limit: float
    name: str = "ellipsis_lines"
    reasons: ClassVar[tuple[str, ...]] = ("too_many_ellipsis_lines",)

    def check(self, doc: Doc) -> str | None:
        lines = doc.nonblank_lines
        hits = sum(1 for line in lines if line.rstrip().endswith(ELLIPSES))
        value = hits / max(len(lines), 1)
        return _above(doc, "ellipsis_line_fraction", value, self.limit, "too_many_ellipsis_lines")


@dataclass(frozen=True, slots=True)
class BulletLines:
    limit: float
    name: str = "bullet_lines"
    reasons: ClassVar[tuple[str, ...]] = ("too_many_bullet_lines",)

    def check(self, doc: Doc) -> str | None:
        lines = doc.nonblank_lines
        hits = sum(1 for line in lines if line.lstrip().startswith(BULLETS))
        value = hits / max(len(lines), 1)
        return _above(doc, "bullet_line_fraction", value, self.limit, "too_many_bullet_lines")


@dataclass(frozen=True, slots=True)
class AlphaWords:
    limit: float
    name: str = "alpha_words"
    reasons: ClassVar[tuple[str, ...]] = ("too_few_alpha_words",)

    def check(self, doc: Doc) -> str | None:
        n = doc.n_words
        letters = doc.words_with(_ASCII_LETTER_BYTE)
        alpha = int(np.count_nonzero(letters))
        if not doc.is_ascii:
            # Words without an ASCII letter but with a non-ASCII character (few: "über", "—", "“") need a
            # Unicode check; digits, "_" and punctuation are never letters, so the whole word is checked.
            starts, ends = doc.word_bounds
            data = doc.utf8
            for i in np.flatnonzero(~letters & doc.words_with(_HIGH_BYTE)).tolist():
                alpha += _HAS_LETTER(data[starts[i] : ends[i]].decode("utf-8", "replace")) is not None
        value = alpha / n if n else 0.0
        return _below(doc, "alpha_word_fraction", value, self.limit, "too_few_alpha_words")


@dataclass(frozen=True, slots=True)
class StopWords:
    minimum: int
    name: str = "stop_words"
    reasons: ClassVar[tuple[str, ...]] = ("too_few_stop_words",)

    def check(self, doc: Doc) -> str | None:
        if doc.language not in (None, "en"):
            return None  # the list is English; another accepted language is not judged by it
        starts, ends = doc.word_bounds
        hashes = doc.word_hashes[ends - starts <= _STOP_MAX_BYTES]  # ~40% of English words are that short
        hits = int(np.count_nonzero(_member(hashes, _STOP_HASHES, _STOP_TABLE)))
        return _below(doc, "stop_words", hits, self.minimum, "too_few_stop_words")


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(repeated items beyond the first of each, their characters)."""
    counts = Counter(items)
    dup_items = len(items) - len(counts)
    dup_chars = sum(len(item) * (k - 1) for item, k in counts.items() if k > 1)
    return dup_items, dup_chars


@dataclass(frozen=True, slots=True)
class DuplicateLines:
    max_fraction: float | None
    max_char_fraction: float | None
    name: str = "duplicate_lines"
    reasons: ClassVar[tuple[str, ...]] = ("dup_line_fraction", "dup_line_char_fraction")

    def check(self, doc: Doc) -> str | None:
        lines = doc.nonblank_lines
        dup, chars = _duplicates(lines)
        if self.max_fraction is not None and _above(
            doc, "dup_line_fraction", dup / max(len(lines), 1), self.max_fraction, "dup_line_fraction"
        ):
            return "dup_line_fraction"
        if self.max_char_fraction is not None:
            value = chars / max(doc.n_chars, 1)
            return _above(doc, "dup_line_char_fraction", value, self.max_char_fraction, "dup_line_char_fraction")
        return None


@dataclass(frozen=True, slots=True)
class DuplicateParagraphs:
    max_fraction: float | None
    max_char_fraction: float | None
    name: str = "duplicate_paragraphs"
    reasons: ClassVar[tuple[str, ...]] = ("dup_para_fraction", "dup_para_char_fraction")

    def check(self, doc: Doc) -> str | None:
        paragraphs = [p for p in _PARAGRAPH_BREAK.split(doc.text.strip()) if p]
        dup, chars = _duplicates(paragraphs)
        if self.max_fraction is not None and _above(
            doc, "dup_para_fraction", dup / max(len(paragraphs), 1), self.max_fraction, "dup_para_fraction"
        ):
            return "dup_para_fraction"
        if self.max_char_fraction is not None:
            value = chars / max(doc.n_chars, 1)
            return _above(doc, "dup_para_char_fraction", value, self.max_char_fraction, "dup_para_char_fraction")
        return None


@dataclass(frozen=True, slots=True)
class TopNGrams:
    limits: dict[int, float]
    name: str = "top_ngrams"
    reasons: ClassVar[tuple[str, ...]] = tuple(f"top_{n}_gram" for n in range(2, 5))

    def check(self, doc: Doc) -> str | None:
        prefix = doc.word_char_prefix
        for n, limit in self.limits.items():
            if doc.n_words < n:
                continue
            keys = doc.ngram_keys(n)
            ordered = np.sort(keys)
            bounds = np.empty(len(ordered) + 1, dtype=bool)  # a run of equal keys starts at each True
            bounds[0] = bounds[-1] = True
            np.not_equal(ordered[1:], ordered[:-1], out=bounds[1:-1])
            edges = np.flatnonzero(bounds)
            starts, runs = edges[:-1], edges[1:] - edges[:-1]
            top = int(runs.max())
            lengths = prefix[n:] - prefix[:-n]
            if top > 1:  # the longest of the most frequent n-grams
                tied = ordered[starts[runs == top]]
                lengths = lengths[keys == tied[0] if len(tied) == 1 else _member(keys, tied)]
            chars = int(lengths.max()) * top
            reason = f"top_{n}_gram"
            if _above(doc, f"top_{n}_gram_char_fraction", chars / max(doc.n_chars, 1), limit, reason):
                return reason
        return None


@dataclass(frozen=True, slots=True)
class DuplicatedNGrams:
    limits: dict[int, float]
    name: str = "duplicated_ngrams"
    reasons: ClassVar[tuple[str, ...]] = tuple(f"duplicated_{n}_grams" for n in range(5, 11))

    def check(self, doc: Doc) -> str | None:
        words = doc.n_words
        prefix = doc.word_char_prefix
        order = sorted(self.limits)
        for i, n in enumerate(order):
            if words < n:
                break
            keys = doc.ngram_keys(n)
            repeat_starts = _repeats(keys)
            # Words covered by a repeat: +1 at each repeat start, -1 n words later, running sum > 0.
            delta = np.zeros(words + 1, dtype=np.int64)
            delta[repeat_starts] += 1
            delta[repeat_starts + n] -= 1
            covered = np.cumsum(delta[:-1]) > 0
            chars = int((prefix[1:] - prefix[:-1])[covered].sum())
            value = chars / max(doc.n_chars, 1)
            reason = f"duplicated_{n}_grams"
            if _above(doc, f"dup_{n}_gram_char_fraction", value, self.limits[n], reason):
                return reason
            rest = order[i + 1 :]
            if rest and value <= min(self.limits[m] for m in rest):
                # Repeated m-grams (m > n) cover a subset of these words: no larger n can fail.
                doc.headroom.extend(1.0 - value / self.limits[m] if self.limits[m] > 0 else 1.0 for m in rest)
                break
        return None


def _member(keys: np.ndarray, values: np.ndarray, table: np.ndarray | None = None) -> np.ndarray:
    """keys[i] in values (sorted), as a bool mask.

    np.searchsorted over every key costs ~7 ns per key; a 65,536-entry table of the values' low 16 bits
    rules out almost every key at ~2 ns, and only the few left are binary-searched. `table` may be
    given when the values are fixed (the stop words).
    """
    if table is None:
        table = np.zeros(1 << 16, dtype=bool)
        table[values & _LOW16] = True
    candidates = np.flatnonzero(table[keys & _LOW16])
    found = keys[candidates]
    at = np.minimum(np.searchsorted(values, found), len(values) - 1)
    mask = np.zeros(len(keys), dtype=bool)
    mask[candidates[values[at] == found]] = True
    return mask


def _repeats(keys: np.ndarray) -> np.ndarray:
    """Positions whose key occurred at an earlier position (every occurrence but the first of each key).

    A plain sort finds the repeated keys and a table lookup their positions; only those go through the
    stable sort that tells the first occurrence, on 16-bit ids of the distinct repeated keys (a radix
    sort). A stable argsort of every 64-bit key costs ~10x a plain sort of them.
    """
    ordered = np.sort(keys)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if not len(repeated):
        return repeated.astype(np.int64)
    members = np.flatnonzero(_member(keys, repeated))  # ascending positions of every repeated key
    distinct = repeated[np.flatnonzero(np.concatenate(([True], repeated[1:] != repeated[:-1])))]
    ids = np.searchsorted(distinct, keys[members])
    if len(distinct) <= 1 << 16:
        ids = ids.astype(np.uint16)  # numpy's stable sort of 16-bit integers is a radix sort: O(n)
    perm = np.argsort(ids, kind="stable")  # stable: each key's earliest position comes first
    grouped = ids[perm]
    first = perm[np.flatnonzero(np.concatenate(([True], grouped[1:] != grouped[:-1])))]
    later = np.ones(len(members), dtype=bool)
    later[first] = False
    return members[later]


def build_rules(t: Thresholds) -> list[Rule]:
    """The rules whose thresholds are set, cheapest first (stop words come last; see QualityFilter)."""
    rules: list[Rule] = []
    if t.min_chars is not None or t.max_chars is not None:
        rules.append(CharCount(t.min_chars, t.max_chars))
    if t.max_control_fraction is not None:
        rules.append(ControlChars(t.max_control_fraction))
    if t.max_line_length is not None:
        rules.append(MaxLineLength(t.max_line_length))
    if t.max_mean_line_length is not None:
        rules.append(MeanLineLength(t.max_mean_line_length))
    if t.min_alnum_fraction is not None:
        rules.append(AlnumFraction(t.min_alnum_fraction))
    if t.max_encoded_data_fraction is not None:
        rules.append(EncodedData(t.max_encoded_data_fraction))
    if t.min_words is not None or t.max_words is not None:
        rules.append(WordCount(t.min_words, t.max_words))
    if t.min_mean_word_length is not None or t.max_mean_word_length is not None:
        rules.append(MeanWordLength(t.min_mean_word_length, t.max_mean_word_length))
    if t.max_symbol_word_ratio is not None:
        rules.append(SymbolRatio(t.max_symbol_word_ratio))
    if t.max_ellipsis_line_fraction is not None:
        rules.append(EllipsisLines(t.max_ellipsis_line_fraction))
    if t.max_bullet_line_fraction is not None:
        rules.append(BulletLines(t.max_bullet_line_fraction))
    if t.min_alpha_word_fraction is not None:
        rules.append(AlphaWords(t.min_alpha_word_fraction))
    if t.max_dup_line_fraction is not None or t.max_dup_line_char_fraction is not None:
        rules.append(DuplicateLines(t.max_dup_line_fraction, t.max_dup_line_char_fraction))
    if t.max_dup_para_fraction is not None or t.max_dup_para_char_fraction is not None:
        rules.append(DuplicateParagraphs(t.max_dup_para_fraction, t.max_dup_para_char_fraction))
    if t.max_top_ngram_char_fraction:
        rules.append(TopNGrams(dict(t.max_top_ngram_char_fraction)))
    if t.max_dup_ngram_char_fraction:
        rules.append(DuplicatedNGrams(dict(t.max_dup_ngram_char_fraction)))
    if t.min_stop_words is not None:
        rules.append(StopWords(t.min_stop_words))
    return rules


RULE_REASONS: dict[str, str] = {
    "too_short": "fewer characters or words than min_chars / min_words",
    "too_long": "more characters or words than max_chars / max_words",
    "binary_content": "share of control characters and U+FFFD in the raw text above max_control_fraction",
    "line_too_long": "a line longer than max_line_length characters",
    "mean_line_too_long": "mean line length above max_mean_line_length (minified or generated code)",
    "low_alnum_fraction": "alphanumeric share of characters below min_alnum_fraction (binary-like, minified)",
    "encoded_data": "share of characters in base64/hex/escape runs of >= 64 above max_encoded_data_fraction",
    "short_mean_word_length": "mean word length below min_mean_word_length",
    "long_mean_word_length": "mean word length above max_mean_word_length",
    "too_many_symbols": "'#' or ellipses per word above max_symbol_word_ratio",
    "too_many_ellipsis_lines": "share of lines ending in an ellipsis above max_ellipsis_line_fraction",
    "too_many_bullet_lines": "share of lines starting with a bullet above max_bullet_line_fraction",
    "too_few_alpha_words": "share of words containing a letter below min_alpha_word_fraction",
    "too_few_stop_words": "fewer than min_stop_words of the, be, to, of, and, that, have, with (English only)",
    "dup_line_fraction": "share of lines that repeat an earlier line above max_dup_line_fraction",
    "dup_line_char_fraction": "characters in repeated lines over all characters above max_dup_line_char_fraction",
    "dup_para_fraction": "share of paragraphs that repeat an earlier one above max_dup_para_fraction",
    "dup_para_char_fraction": "characters in repeated paragraphs above max_dup_para_char_fraction",
    **{
        f"top_{n}_gram": f"characters in the most frequent {n}-gram above max_top_ngram_char_fraction[{n}]"
        for n in range(2, 5)
    },
    **{
        f"duplicated_{n}_grams": f"characters in repeated {n}-grams above max_dup_ngram_char_fraction[{n}]"
        for n in range(5, 11)
    },
}
