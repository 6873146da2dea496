"""Language identification with lingua (lingua-language-detector, models shipped inside the wheel).

Lingua scores character 1- to 5-gram models of each candidate language; its cost grows with the
text and with the number of candidates (measured here: about 0.5 us per character with 10
candidates, 2.5 us with all 75). Two choices keep it affordable:
- a restricted candidate set: the source's accepted languages plus `DEFAULT_CANDIDATES`, 20 languages
  that make up most of the web. Text in a language outside the set is attributed to the nearest
  candidate, which is still "not accepted" unless that is an accepted language;
- a bounded sample: at most `sample_chars` characters (default 400), half from the start and half
  from the middle of the document, cut at whitespace; beyond about 300 characters lingua's answer
  for one-language text rarely changes, and a document's language is decided by its bulk.
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
    ) -> None:
        self.accepted = check_languages(accepted, "languages")
        others = check_languages(DEFAULT_CANDIDATES if candidates is None else candidates, "filters.lid_languages")
        self.candidates = tuple(sorted(set(self.accepted) | set(others)))
        if len(self.candidates) < 2:
            raise ValueError(
                f"filters.lid_languages: need at least 2 candidate languages to tell them apart, got {self.candidates}"
            )
        self.sample_chars = sample_chars
        self._detector = _detector(self.candidates)
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

    def identify(self, text: str) -> LanguageGuess:
        values = self._detector.compute_language_confidence_values(sample(text, self.sample_chars))
        return self._guess(values)

    def identify_batch(self, texts: Sequence[str]) -> list[LanguageGuess]:
        """Like identify, on lingua's thread pool (all cores)."""
        samples = [sample(t, self.sample_chars) for t in texts]
        return [self._guess(v) for v in self._detector.compute_language_confidence_values_in_parallel(samples)]
