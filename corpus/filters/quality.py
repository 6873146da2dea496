"""The quality stage for one source: normalize, apply the profile's rules, identify the language, scrub PII.

Order per document, cheapest and most selective first so that a dropped document costs little:
1. empty input -> `empty_document`; raw length over max_chars -> `too_long` before anything else
   touches the text (a 50 MB single line costs one len());
2. normalization (corpus.filters.normalize), recorded in `Decision.normalized`;
3. the profile's rules (corpus.filters.rules) on the normalized text, over features computed once;
4. language identification (corpus.filters.language), then the English stop-word rule;
5. PII and secrets (corpus.filters.pii): spans redacted, or the document dropped, per policy.
The perplexity filter needs the whole source's score distribution, so it runs after this stage
(corpus.filters.perplexity.flag_perplexity).

`Decision.quality` ranks kept documents (e.g. which duplicate to keep): the mean headroom of the
rules it passed (1 - value/limit for an upper limit, 1 - limit/value for a lower one, so 0 = at a
limit, 1 = far from all), times the language confidence when the language was identified.
Dropped documents have quality 0. A dropped document's `text` is the normalized text, not scanned
for PII unless it was dropped by the PII stage itself (then its secret and PII spans are replaced).

Measured (benchmarks/filters.py, CPU time on the 2-core machine while other jobs kept its load average
near 6; the old code run right before under the same load): with `apply_batch`, the pipeline's path,
prose 6.3 -> 10.3 MB/s per core and legal 5.9 -> 9.1, code ~29 (PII scanning is most of it); one
document at a time (`apply`) prose 9.5 and legal 7.5, because lingua's models fall out of the CPU
caches between documents. Language ID (~0.13 ms per document warm, a fast 200-character look), PII,
the n-gram rules and the shared word split are most of what is left; short documents cost the most
per byte.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, ClassVar

from corpus.config import FilterConfig
from corpus.filters.language import LanguageIdentifier
from corpus.filters.normalize import CHANGE_CODES, normalize
from corpus.filters.pii import Detection, PiiScanner
from corpus.filters.rules import (
    RULE_REASONS,
    AlphaWords,
    Doc,
    DuplicatedNGrams,
    MeanWordLength,
    Rule,
    StopWords,
    SymbolRatio,
    Thresholds,
    TopNGrams,
    WordCount,
    build_rules,
    resolve_thresholds,
)

REASON_CODES: dict[str, str] = {
    "empty_document": "the document is empty or only whitespace after normalization",
    **RULE_REASONS,
    "wrong_language": "confidence of the source's accepted languages below min_language_confidence",
    "contains_secret": "a secret (private key, cloud or API token, password) whose policy is drop",
    "contains_pii": "PII (email, phone, IP address, credit card) whose policy is drop",
    "perplexity_too_high": "log-perplexity under the reference n-gram model above the source's mean + 3 std",
}
NORMALIZATION_CODES = CHANGE_CODES
_WORD_RULES = (WordCount, MeanWordLength, SymbolRatio, AlphaWords, StopWords, TopNGrams, DuplicatedNGrams)


@dataclass(frozen=True, slots=True)
class Decision:
    """What the quality stage decided for one document."""

    kept: bool
    reason: str | None  # a key of REASON_CODES when dropped, else None
    text: str  # normalized and redacted: what goes downstream
    quality: float  # in [0, 1]; 0 when dropped
    language: str | None = None
    language_confidence: float | None = None
    normalized: list[str] = field(default_factory=list)  # keys of NORMALIZATION_CODES
    detections: list[Detection] = field(default_factory=list)
    features: dict[str, float] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """JSON-friendly row without the text (for DuckDB / manifests)."""
        return {
            "kept": self.kept,
            "reason": self.reason,
            "quality": self.quality,
            "language": self.language,
            "language_confidence": self.language_confidence,
            "normalized": list(self.normalized),
            "detections": [d.to_dict() for d in self.detections],
            "features": dict(self.features),
        }


@dataclass(frozen=True, slots=True)
class LanguageRule:
    """wrong_language when the accepted languages' summed confidence is below the limit."""

    identifier: LanguageIdentifier
    min_confidence: float
    name: str = "language"
    reasons: ClassVar[tuple[str, ...]] = ("wrong_language",)

    def check(self, doc: Doc) -> str | None:
        guess = doc.language_guess or self.identifier.identify(doc.text)
        doc.language, doc.language_confidence = guess.language, guess.confidence
        doc.features["language_confidence"] = guess.confidence
        doc.features["accepted_language_confidence"] = guess.accepted
        if self.identifier.accepted and guess.accepted < self.min_confidence:
            return "wrong_language"
        return None


class QualityFilter:
    """Normalization, quality rules, language and PII policy for one source profile."""

    def __init__(
        self,
        profile: str = "prose",
        config: FilterConfig | None = None,
        languages: Sequence[str] = ("en",),
        pii_policy: Mapping[str, str] | None = None,
    ) -> None:
        self.profile = profile
        self.config = config or FilterConfig()
        self.thresholds: Thresholds = resolve_thresholds(profile, self.config)
        self.rules: list[Rule] = build_rules(self.thresholds)
        self.identifier: LanguageIdentifier | None = None
        if self.thresholds.min_language_confidence is not None:
            self.identifier = LanguageIdentifier(
                languages,
                self.config.lid_languages,
                self.config.lid_sample_chars,
                self.config.lid_fast_sample_chars,
                self.config.lid_decisive_confidence,
            )
            at = next((i for i, r in enumerate(self.rules) if isinstance(r, StopWords)), len(self.rules))
            self.rules.insert(at, LanguageRule(self.identifier, self.thresholds.min_language_confidence))
        self.pii = PiiScanner(
            self.config.pii if pii_policy is None else pii_policy,
            phone_region=self.config.phone_region,
            secret_min_entropy=self.config.secret_min_entropy,
        )
        # Seconds per step when set to a dict (benchmarks); None keeps the loop free of timer calls.
        self.timings: dict[str, float] | None = None

    def settings(self) -> dict[str, Any]:
        """Everything that decides the outcome, JSON-able: for the version manifest and its fingerprint."""
        libraries = {}
        for name in ("ftfy", "lingua-language-detector", "phonenumbers", "numpy"):
            try:
                libraries[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                libraries[name] = None
        return {
            "profile": self.profile,
            "thresholds": self.thresholds.to_dict(),
            "languages": list(self.identifier.accepted) if self.identifier else None,
            "lid_candidates": list(self.identifier.candidates) if self.identifier else None,
            "lid_sample_chars": self.identifier.sample_chars if self.identifier else None,
            # Recorded only when the fast look is on, so that manifests written before it still rebuild.
            **(
                {
                    "lid_fast_sample_chars": self.identifier.fast_chars,
                    "lid_decisive_confidence": self.identifier.decisive,
                }
                if self.identifier is not None and self.identifier.fast_chars is not None
                else {}
            ),
            "pii_policy": dict(sorted(self.pii.policy.items())),
            "phone_region": self.pii.phone_region,
            "secret_min_entropy": self.pii.secret_min_entropy,
            "libraries": libraries,  # ftfy's and lingua's models and heuristics change between releases
        }

    def apply(self, text: str) -> Decision:
        """Decide one document."""
        state = self._start(text)
        return state if isinstance(state, Decision) else self._finish(*state)

    def apply_batch(self, texts: Sequence[str]) -> list[Decision]:
        """Decide many documents; language identification of the survivors runs on lingua's thread pool."""
        states = [self._start(t) for t in texts]
        if self.identifier is not None:
            at = next(i for i, r in enumerate(self.rules) if isinstance(r, LanguageRule))
            survivors = [s[0] for s in states if not isinstance(s, Decision) and self._run(s[0], at) is None]
            if survivors:
                t0 = time.perf_counter()
                guesses = self.identifier.identify_batch([doc.text for doc in survivors])
                self._tick("language", t0)
                for doc, guess in zip(survivors, guesses, strict=True):
                    doc.language_guess = guess
        return [s if isinstance(s, Decision) else self._finish(*s) for s in states]

    # --- internals -------------------------------------------------------------------------------

    def _tick(self, name: str, t0: float) -> None:
        if self.timings is not None:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def _start(self, text: str) -> Decision | tuple[Doc, list[str]]:
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        t0 = time.perf_counter() if self.timings is not None else 0.0
        if not text or text.isspace():
            return Decision(False, "empty_document", text, 0.0, features={"n_chars": float(len(text))})
        max_chars = self.thresholds.max_chars
        if max_chars is not None and len(text) > max_chars:
            return Decision(False, "too_long", text, 0.0, features={"n_chars": float(len(text))})
        norm = normalize(text)
        self._tick("normalize", t0)
        doc = Doc(norm.text, norm.bad_chars, len(text))
        if not doc.text or doc.text.isspace():
            doc.reason = "binary_content" if doc.bad_chars else "empty_document"
        elif self.timings is not None:
            t0 = time.perf_counter()
            _ = doc.lines  # attribute the shared splits to their own row
            if any(isinstance(rule, _WORD_RULES) for rule in self.rules):
                _ = doc.word_hashes
            self._tick("split", t0)
        return doc, norm.changes

    def _run(self, doc: Doc, stop: int) -> str | None:
        """Run rules[doc.next_rule:stop]; the first failure is stored on the doc and returned."""
        timings = self.timings
        while doc.reason is None and doc.next_rule < stop:
            rule = self.rules[doc.next_rule]
            doc.next_rule += 1
            if timings is None:
                doc.reason = rule.check(doc)
            else:
                t0 = time.perf_counter()
                doc.reason = rule.check(doc)
                self._tick(rule.name, t0)
        return doc.reason

    def _finish(self, doc: Doc, changes: list[str]) -> Decision:
        reason = self._run(doc, len(self.rules))
        if reason is not None:
            return self._dropped(doc, changes, reason)
        t0 = time.perf_counter() if self.timings is not None else 0.0
        text, detections, reason = self.pii.apply(doc.text)
        self._tick("pii", t0)
        if reason is not None:
            return self._dropped(doc, changes, reason, text, detections)
        quality = sum(doc.headroom) / len(doc.headroom) if doc.headroom else 1.0
        if doc.language_confidence is not None:
            quality *= doc.language_confidence
        return Decision(
            kept=True,
            reason=None,
            text=text,
            quality=round(min(1.0, max(0.0, quality)), 12),
            language=doc.language,
            language_confidence=doc.language_confidence,
            normalized=changes,
            detections=detections,
            features=doc.features,
        )

    def _dropped(
        self,
        doc: Doc,
        changes: list[str],
        reason: str,
        text: str | None = None,
        detections: list[Detection] | None = None,
    ) -> Decision:
        assert reason in REASON_CODES, f"rule returned unknown reason code {reason!r}"
        return Decision(
            kept=False,
            reason=reason,
            text=doc.text if text is None else text,
            quality=0.0,
            language=doc.language,
            language_confidence=doc.language_confidence,
            normalized=changes,
            detections=detections or [],
            features=doc.features,
        )
