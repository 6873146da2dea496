"""Language identification with lingua (lingua-language-detector, models shipped inside the wheel).

Lingua scores character n-gram models of each candidate language; its cost grows with the text and
with the number of Latin-script candidates (measured here, 400-character samples: ~90 us for one
language plus ~12 us per Latin-script candidate; a non-Latin-script candidate is nearly free, lingua
rules it out by script). Three choices keep it affordable:
- a restricted candidate set: the source's accepted languages plus `DEFAULT_CANDIDATES`, 20 languages
  that make up most of the web. Text in a language outside the set is attributed to the nearest
  candidate, which is still "not accepted" unless that is an accepted language;
- a bounded sample: at most `sample_chars` characters (default 400), half from the start and half
  from the middle of the document, cut at whitespace; a document's language is decided by its bulk;
- a cheap first look: lingua first reads a `fast_chars` sample (default 200, same construction, about
  half the cost), and its answer stands when it is decisive, i.e. the accepted languages' summed
  confidence is >= `decisive` (default 0.95) or <= 1 - `decisive`, and the sample had letters. Only
  the rest are read again on the full sample with every candidate. When the fast sample is pure
  ASCII the first look also leaves out `NON_ASCII_LANGUAGES` (cs, pl, sv, tr, vi: their running text
  always has letters like ą ř å ğ ơ), 5 of the 12 Latin-script models. Measured on the default
  corpus' 284 prose and legal documents plus 31 excerpts in 15 other languages (Tk's message
  catalogues): 5 of 315 needed the second look, no accept/reject decision differed from the full
  sample alone, and the reported top language differed for 3 rejected excerpts in languages that are
  no candidate (Finnish, Esperanto). At 150-160 characters 1-2 decisive answers disagreed, so 200 is
  kept. A document that is half one language and half another can be decided differently by the
  200- and the 400-character sample (both are then a guess).
Low-accuracy mode (trigrams only) is used: it is as accurate as high-accuracy mode on samples over
120 characters and faster on short ones. Confidences are lingua's relative confidences over the
candidate set (they sum to 1); a document is accepted when the confidences of its accepted
languages add up to at least the threshold.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

DEFAULT_CANDIDATES = (
    "en", "de", "fr", "es", "it", "pt", "nl", "pl", "sv", "cs",
    "ru", "uk", "tr", "ar", "fa", "hi", "zh", "ja", "ko", "vi",
)  # fmt: skip


# Latin-script candidates whose running text always has non-ASCII letters (ą ł ř ů å ö ğ ı ơ ư ...):
# an ASCII-only sample is not in one of them, so the fast look at such a sample leaves them out.
NON_ASCII_LANGUAGES = frozenset({"cs", "pl", "sv", "tr", "vi"})


class LanguageIdError(RuntimeError):
    """lingua is not installed."""


def _lingua() -> ModuleType:
    """The lingua module, imported lazily so that the code profile never needs it."""
    try:
        import lingua
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise LanguageIdError(
            "language identification needs lingua-language-detector: pip install 'lingua-language-detector>=2.1'"
        ) from exc
    return lingua


def supported_languages() -> set[str]:
    """ISO 639-1 codes lingua can identify."""
    lingua = _lingua()
    return {lang.iso_code_639_1.name.lower() for lang in lingua.Language.all()}


def check_languages(codes: Sequence[str], field: str) -> tuple[str, ...]:
    """Validate ISO 639-1 codes against lingua; ValueError names the field and the bad code."""
    supported = supported_languages()
    out = []
    for code in codes:
        if not isinstance(code, str) or code.lower() not in supported:
            raise ValueError(f"{field}: {code!r} is not an ISO 639-1 code that lingua supports")
        out.append(code.lower())
    return tuple(out)


@functools.lru_cache(maxsize=16)
def _detector(codes: tuple[str, ...]) -> Any:
    lingua = _lingua()
    languages = [lingua.Language.from_iso_code_639_1(getattr(lingua.IsoCode639_1, c.upper())) for c in codes]
    return lingua.LanguageDetectorBuilder.from_languages(*languages).with_low_accuracy_mode().build()


@dataclass(frozen=True, slots=True)
class LanguageGuess:
    language: str | None  # ISO 639-1 of the most likely candidate; None when the sample has no letters
    confidence: float  # that candidate's confidence
    accepted: float  # summed confidence of the accepted languages


def sample(text: str, sample_chars: int) -> str:
    """At most sample_chars characters: the start and the middle of the text, cut at whitespace."""
    if len(text) <= sample_chars:
        return text
    half = sample_chars // 2
    head = text[:half]
    cut = head.rfind(" ")
    head = head[:cut] if cut > half // 2 else head
    mid = len(text) // 2
    body = text[mid : mid + half]
    cut = body.find(" ")
    body = body[cut + 1 :] if 0 <= cut < half // 2 else body
    return head + "\n" + body


class LanguageIdentifier:
    """Identify a document's language among the accepted ones plus common others."""

    def __init__(
        self,
        accepted: Sequence[str],
        candidates: Sequence[str] | None = None,
        sample_chars: int = 400,
        fast_chars: int | None = 200,
        decisive: float = 0.95,
    ) -> None:
        self.accepted = check_languages(accepted, "languages")
        others = check_languages(DEFAULT_CANDIDATES if candidates is None else candidates, "filters.lid_languages")
        self.candidates = tuple(sorted(set(self.accepted) | set(others)))
        if len(self.candidates) < 2:
            raise ValueError(
                f"filters.lid_languages: need at least 2 candidate languages to tell them apart, got {self.candidates}"
            )
        self.sample_chars = sample_chars
        # A fast look as long as the full one would only repeat it.
        self.fast_chars = fast_chars if fast_chars is not None and fast_chars < sample_chars else None
        if not 0.5 < decisive <= 1.0:
            raise ValueError(f"filters.lid_decisive_confidence must be in (0.5, 1], got {decisive!r}")
        self.decisive = decisive
        self._detector = _detector(self.candidates)
        # The fast look at an ASCII-only sample leaves out the Latin-script languages whose running text
        # always carries non-ASCII letters (unless accepted): each Latin-script model costs ~6 us per
        # 200 characters, and lingua's models are large enough that the cost doubles when other work
        # has evicted them from the CPU caches between documents.
        ascii_candidates = tuple(c for c in self.candidates if c not in NON_ASCII_LANGUAGES or c in self.accepted)
        self._ascii_detector = _detector(ascii_candidates) if len(ascii_candidates) >= 2 else self._detector
        self._accepted = set(self.accepted)

    def _guess(self, values: list[Any]) -> LanguageGuess:
        if not values or values[0].value <= 0:
            return LanguageGuess(None, 0.0, 0.0)  # no letters lingua knows in the sample
        top = values[0]
        accepted = 0.0
        for value in values:
            if value.language.iso_code_639_1.name.lower() in self._accepted:
                accepted += value.value
        # lingua's batch mode sums on a thread pool, so the last bits of a confidence vary run to run;
        # rounding to 1e-9 keeps decisions, quality scores and so version ids reproducible.
        return LanguageGuess(
            top.language.iso_code_639_1.name.lower(), round(float(top.value), 9), round(float(accepted), 9)
        )

    def _decisive(self, guess: LanguageGuess) -> bool:
        """A fast answer stands when it is sure either way; a sample without letters says nothing."""
        if guess.language is None:
            return False
        return guess.accepted >= self.decisive or guess.accepted <= 1.0 - self.decisive

    def _fast_detector(self, fast_sample: str) -> Any:
        return self._ascii_detector if fast_sample.isascii() else self._detector

    def identify(self, text: str) -> LanguageGuess:
        if self.fast_chars is not None and len(text) > self.fast_chars:
            fast = sample(text, self.fast_chars)
            guess = self._guess(self._fast_detector(fast).compute_language_confidence_values(fast))
            if self._decisive(guess):
                return guess
        values = self._detector.compute_language_confidence_values(sample(text, self.sample_chars))
        return self._guess(values)

    def identify_batch(self, texts: Sequence[str]) -> list[LanguageGuess]:
        """Like identify, on lingua's thread pool (all cores)."""
        guesses: list[LanguageGuess | None] = [None] * len(texts)
        if self.fast_chars is not None:
            fast = {i: sample(t, self.fast_chars) for i, t in enumerate(texts) if len(t) > self.fast_chars}
            for is_ascii in (True, False):
                group = [i for i, s in fast.items() if s.isascii() == is_ascii]
                detector = self._ascii_detector if is_ascii else self._detector
                values = detector.compute_language_confidence_values_in_parallel([fast[i] for i in group])
                for i, v in zip(group, values, strict=True):
                    guess = self._guess(v)
                    if self._decisive(guess):
                        guesses[i] = guess
        again = [i for i, g in enumerate(guesses) if g is None]
        samples = [sample(texts[i], self.sample_chars) for i in again]
        for i, v in zip(again, self._detector.compute_language_confidence_values_in_parallel(samples), strict=True):
            guesses[i] = self._guess(v)
        assert all(g is not None for g in guesses), "identify_batch left a document without a guess"
        return [g for g in guesses if g is not None]
