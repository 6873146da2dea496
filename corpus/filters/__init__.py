"""Quality filtering: normalization, heuristic rules, language ID, PII/secret policy, perplexity filter."""

from corpus.filters.language import LanguageGuess, LanguageIdentifier
from corpus.filters.normalize import Normalized, normalize
from corpus.filters.perplexity import NGramLM, flag_perplexity, perplexity_cutoff
from corpus.filters.pii import Detection, PiiScanner, redact
from corpus.filters.quality import NORMALIZATION_CODES, REASON_CODES, Decision, QualityFilter
from corpus.filters.rules import PROFILE_DEFAULTS, Doc, Thresholds, build_rules, resolve_thresholds

__all__ = [
    "NORMALIZATION_CODES",
    "PROFILE_DEFAULTS",
    "REASON_CODES",
    "Decision",
    "Detection",
    "Doc",
    "LanguageGuess",
    "LanguageIdentifier",
    "NGramLM",
    "Normalized",
    "PiiScanner",
    "QualityFilter",
    "Thresholds",
    "build_rules",
    "flag_perplexity",
    "normalize",
    "perplexity_cutoff",
    "redact",
    "resolve_thresholds",
]
