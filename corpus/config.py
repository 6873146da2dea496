"""The sources manifest: one YAML file that names a run's sources and its pipeline settings.

Everything is validated when the file is loaded, before any work starts: an unknown key, an unknown
source kind, a missing path, a duplicate name or a path escaping the manifest's directory raises a
`ManifestError` that names the file, the field and the bad value. Relative paths resolve against the
manifest's own directory, so a manifest and its data can move together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SOURCE_KINDS = (
    "python_stdlib",
    "pydoc_topics",
    "installed_licenses",
    "text_files",
    "jsonl",
    "parquet",
)
PATH_KINDS = ("text_files", "jsonl", "parquet")
PROFILES = ("prose", "code", "legal")
# A source name is a Dagster partition key and a directory name in the lake.
SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ManifestError(ValueError):
    """The sources manifest is invalid; the message names the file, the field and the value."""


PERPLEXITY_CUTOFFS = ("mean_std", "median_mad")


@dataclass(frozen=True)
class Thresholds:
    """The quality rules' thresholds (corpus.filters.rules documents each rule).

    In a resolved profile (corpus.filters.rules.resolve_thresholds) None disables the rule; at the top level
    of `FilterConfig`, which extends this class, None means "the profile's default".
    """

    min_chars: int | None = None
    max_chars: int | None = None
    min_words: int | None = None
    max_words: int | None = None
    max_line_length: int | None = None
    min_stop_words: int | None = None
    max_mean_line_length: float | None = None
    min_mean_word_length: float | None = None
    max_mean_word_length: float | None = None
    max_symbol_word_ratio: float | None = None
    max_ellipsis_line_fraction: float | None = None
    max_bullet_line_fraction: float | None = None
    min_alpha_word_fraction: float | None = None
    max_dup_line_fraction: float | None = None
    max_dup_line_char_fraction: float | None = None
    max_dup_para_fraction: float | None = None
    max_dup_para_char_fraction: float | None = None
    min_alnum_fraction: float | None = None
    max_encoded_data_fraction: float | None = None
    max_control_fraction: float | None = None
    min_language_confidence: float | None = None
    max_top_ngram_char_fraction: dict[int, float] | None = None
    max_dup_ngram_char_fraction: dict[int, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(Thresholds)}


@dataclass(frozen=True)
class FilterConfig(Thresholds):
    """Quality-filter settings (`pipeline.filters`); corpus.filters.rules documents every rule.

    A threshold left at None takes the source profile's default (`PROFILE_DEFAULTS` in
    corpus/filters/rules.py); a value set here overrides it for every profile. `profiles` overrides
    thresholds per profile name and wins over the top level; a name that is not prose/code/legal starts
    from the prose defaults, and inside `profiles` a null value disables that rule. `pii` maps a
    detector kind (or the groups "pii" / "secrets") to redact | drop | keep.
    """

    # Threshold names by the validation they get; together exactly the fields of `Thresholds`.
    COUNT_THRESHOLDS = ("min_chars", "max_chars", "min_words", "max_words", "max_line_length", "min_stop_words")
    POSITIVE_THRESHOLDS = ("max_mean_line_length", "min_mean_word_length", "max_mean_word_length")
    RATIO_THRESHOLDS = ("max_symbol_word_ratio",)
    FRACTION_THRESHOLDS = (
        "max_ellipsis_line_fraction",
        "max_bullet_line_fraction",
        "min_alpha_word_fraction",
        "max_dup_line_fraction",
        "max_dup_line_char_fraction",
        "max_dup_para_fraction",
        "max_dup_para_char_fraction",
        "min_alnum_fraction",
        "max_encoded_data_fraction",
        "max_control_fraction",
        "min_language_confidence",
    )
    # n -> limit; Gopher's n ranges (top n-gram for n = 2..4, duplicated n-grams for n = 5..10).
    NGRAM_THRESHOLDS = (("max_top_ngram_char_fraction", 2, 4), ("max_dup_ngram_char_fraction", 5, 10))
    THRESHOLDS = (
        *COUNT_THRESHOLDS,
        *POSITIVE_THRESHOLDS,
        *RATIO_THRESHOLDS,
        *FRACTION_THRESHOLDS,
        *(name for name, _, _ in NGRAM_THRESHOLDS),
    )
    PII_KINDS = ("email", "phone", "ip_address", "credit_card")
    SECRET_KINDS = ("private_key", "aws_access_key", "aws_secret_key", "github_token", "slack_token", "generic_secret")
    PII_GROUPS = ("pii", "secrets")
    PII_ACTIONS = ("redact", "drop", "keep")

    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    pii: dict[str, str] = field(default_factory=dict)
    phone_region: str | None = "US"
    secret_min_entropy: float = 3.5
    lid_languages: tuple[str, ...] | None = None
    lid_sample_chars: int = 400
    # Language ID first reads a sample this short (None: off) and keeps its answer when the accepted
    # languages' confidence is >= lid_decisive_confidence or <= 1 - it (corpus.filters.language).
    lid_fast_sample_chars: int | None = 200
    lid_decisive_confidence: float = 0.95
    max_drop_fraction: float = 0.5
    # Perplexity filter (corpus.stages.perplexity). Only sources whose profile is listed are scored: a
    # prose n-gram model gives code a high perplexity whatever its quality, so code is not scored.
    perplexity_profiles: tuple[str, ...] = ("prose", "legal")
    # Source names whose heuristic-kept documents train the reference model; None = every prose source.
    perplexity_reference: tuple[str, ...] | None = None
    perplexity_order: int = 3
    perplexity_n_std: float = 3.0  # drop above mean + n_std * std of the source's log-perplexities
    # "mean_std" (the default, as specified): mean + n_std * std. "median_mad": median + n_std * 1.4826 * MAD,
    # a robust spread that a few extreme documents cannot inflate (mean + 3 std can never drop anything among
    # fewer than 11 documents, and outliers mask each other); no drop when MAD is 0.
    perplexity_cutoff: str = "mean_std"
    # Cross-fitting: each document is scored by a model trained without its fold (corpus.stages.perplexity
    # says why: in-sample scores reward memorised text).
    perplexity_folds: int = 2
    review_documents: int = 20  # worst-scoring kept documents listed per source for review

    def __post_init__(self) -> None:
        self._check_perplexity()
        for name in self.THRESHOLDS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, self.check_threshold(name, value, "filters"))
        for lo, hi in (("min_chars", "max_chars"), ("min_words", "max_words")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise ValueError(f"filters.{lo} ({a!r}) must be <= filters.{hi} ({b!r})")
        if not isinstance(self.profiles, Mapping):
            raise ValueError(f"filters.profiles must be a mapping of profile name to thresholds, got {self.profiles!r}")
        profiles: dict[str, dict[str, Any]] = {}
        for profile, overrides in self.profiles.items():
            if not isinstance(profile, str) or not profile:
                raise ValueError(f"filters.profiles: profile names must be non-empty strings, got {profile!r}")
            if not isinstance(overrides, Mapping):
                raise ValueError(f"filters.profiles.{profile} must be a mapping, got {overrides!r}")
            unknown = sorted(set(overrides) - set(self.THRESHOLDS))
            if unknown:
                raise ValueError(f"filters.profiles.{profile}: unknown threshold(s) {unknown}")
            where = f"filters.profiles.{profile}"
            profiles[profile] = {
                k: None if v is None else self.check_threshold(k, v, where) for k, v in overrides.items()
            }
        object.__setattr__(self, "profiles", profiles)
        if not isinstance(self.pii, Mapping):
            raise ValueError(f"filters.pii must be a mapping of kind to action, got {self.pii!r}")
        for kind, action in self.pii.items():
            if kind not in (*self.PII_KINDS, *self.SECRET_KINDS, *self.PII_GROUPS):
                known = [*self.PII_GROUPS, *self.PII_KINDS, *self.SECRET_KINDS]
                raise ValueError(f"filters.pii: unknown kind {kind!r}; known: {known}")
            if action not in self.PII_ACTIONS:
                raise ValueError(f"filters.pii.{kind} must be one of {list(self.PII_ACTIONS)}, got {action!r}")
        object.__setattr__(self, "pii", dict(self.pii))
        if self.phone_region is not None and not (
            isinstance(self.phone_region, str) and len(self.phone_region) == 2 and self.phone_region.isupper()
        ):
            raise ValueError(
                f"filters.phone_region must be a two-letter region code like 'US', got {self.phone_region!r}"
            )
        if not isinstance(self.secret_min_entropy, (int, float)) or not 0.0 <= self.secret_min_entropy <= 8.0:
            raise ValueError(
                f"filters.secret_min_entropy must be in [0, 8] bits per char, got {self.secret_min_entropy!r}"
            )
        if self.lid_languages is not None:
            langs = [self.lid_languages] if isinstance(self.lid_languages, str) else self.lid_languages
            if not isinstance(langs, (list, tuple)) or not all(
                isinstance(x, str) and len(x) == 2 and x.isalpha() and x.islower() for x in langs
            ):
                raise ValueError(f"filters.lid_languages must be ISO 639-1 codes like ['en', 'de'], got {langs!r}")
            object.__setattr__(self, "lid_languages", tuple(langs))
        if isinstance(self.lid_sample_chars, bool) or not isinstance(self.lid_sample_chars, int):
            raise ValueError(f"filters.lid_sample_chars must be an integer, got {self.lid_sample_chars!r}")
        if self.lid_sample_chars < 50:
            raise ValueError(f"filters.lid_sample_chars must be >= 50, got {self.lid_sample_chars!r}")
        fast = self.lid_fast_sample_chars
        if fast is not None and (isinstance(fast, bool) or not isinstance(fast, int) or fast < 50):
            raise ValueError(f"filters.lid_fast_sample_chars must be an integer >= 50 or null, got {fast!r}")
        decisive = self.lid_decisive_confidence
        if isinstance(decisive, bool) or not isinstance(decisive, (int, float)) or not 0.5 < decisive <= 1.0:
            raise ValueError(f"filters.lid_decisive_confidence must be in (0.5, 1], got {decisive!r}")
        if not 0.0 <= self.max_drop_fraction <= 1.0:
            raise ValueError(f"filters.max_drop_fraction must be in [0, 1], got {self.max_drop_fraction!r}")

    def _check_perplexity(self) -> None:
        for name in ("perplexity_profiles", "perplexity_reference"):
            value = getattr(self, name)
            if value is None and name == "perplexity_reference":
                continue
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) and x for x in items):
                raise ValueError(f"filters.{name} must be a list of names, got {value!r}")
            if name == "perplexity_reference" and not items:
                raise ValueError(
                    "filters.perplexity_reference must name at least one source (leave it unset for every prose "
                    "source; set perplexity_profiles: [] to turn the perplexity filter off)"
                )
            object.__setattr__(self, name, tuple(items))
        for name, lo, hi in (("perplexity_order", 1, 4), ("perplexity_folds", 2, 16), ("review_documents", 0, 10_000)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"filters.{name} must be an integer in [{lo}, {hi}], got {value!r}")
        if self.perplexity_cutoff not in PERPLEXITY_CUTOFFS:
            raise ValueError(
                f"filters.perplexity_cutoff must be one of {list(PERPLEXITY_CUTOFFS)}, got {self.perplexity_cutoff!r}"
            )
        n_std = self.perplexity_n_std
        if isinstance(n_std, bool) or not isinstance(n_std, (int, float)) or not 0 < n_std < float("inf"):
            raise ValueError(f"filters.perplexity_n_std must be a number > 0, got {n_std!r}")
        object.__setattr__(self, "perplexity_n_std", float(n_std))

    @classmethod
    def check_threshold(cls, name: str, value: Any, where: str) -> Any:
        """Validate one threshold value; return it normalised (n-gram keys as int, fractions as float)."""
        ngram_ranges = {key: (lo, hi) for key, lo, hi in cls.NGRAM_THRESHOLDS}
        if name in ngram_ranges:
            lo, hi = ngram_ranges[name]
            if not isinstance(value, Mapping) or not value:
                raise ValueError(f"{where}.{name} must be a non-empty mapping n -> fraction, got {value!r}")
            out: dict[int, float] = {}
            for n, limit in value.items():
                try:
                    n_int = int(n)
                except (TypeError, ValueError):
                    raise ValueError(f"{where}.{name}: n must be an integer in [{lo}, {hi}], got {n!r}") from None
                if not lo <= n_int <= hi:
                    raise ValueError(f"{where}.{name}: n must be in [{lo}, {hi}], got {n!r}")
                out[n_int] = cls.check_threshold("max_fraction", limit, f"{where}.{name}.{n}")
            return dict(sorted(out.items()))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}.{name} must be a number, got {value!r}")
        if name in cls.COUNT_THRESHOLDS:
            if int(value) != value or value < 0:
                raise ValueError(f"{where}.{name} must be an integer >= 0, got {value!r}")
            return int(value)
        if name in cls.POSITIVE_THRESHOLDS:
            if value <= 0:
                raise ValueError(f"{where}.{name} must be > 0, got {value!r}")
            return float(value)
        if name in cls.RATIO_THRESHOLDS:
            if value < 0:
                raise ValueError(f"{where}.{name} must be >= 0, got {value!r}")
            return float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{where}.{name} must be in [0, 1], got {value!r}")
        return float(value)


assert set(FilterConfig.THRESHOLDS) == {f.name for f in dataclasses.fields(Thresholds)}, "groups != Thresholds"


@dataclass(frozen=True)
class DedupConfig:
    """Exact and MinHash near-duplicate settings (see corpus.minhash for the S-curve)."""

    shingle_size: int = 5
    num_perm: int = 112
    bands: int = 14
    rows: int = 8
    threshold: float = 0.8
    max_duplicate_ratio: float = 0.04
    seed: int = 1
    # Token span pass (corpus.spans.find_repeated_spans): spans of >= span_length tokens shared with an
    # earlier document are flagged; 128 is the seed's "128-gram level".
    span_length: int = 128
    # MinHash permutation scheme, named as datasketch names it: "legacy" ((a*h + b) mod (2^61 - 1), the
    # only scheme before datasketch 2.0) or "affine32" (datasketch 2.x's default: fmix32, then a*h + b
    # mod 2^32; ~2x faster signatures). Signatures of different schemes must never be compared.
    scheme: str = "legacy"
    # How LSH candidates are confirmed against `threshold` (corpus.dedup): "exact" = Jaccard of the two
    # documents' hashed shingle sets (texts re-read for documents that share a band), "estimate" = the
    # signature estimate (sd 0.038 at J = 0.8: on installed license texts it gave pair precision 0.84).
    confirm: str = "exact"
    # Exact confirmation stops and falls back to the estimate (with a warning) past this many pairs. It
    # costs ~20-30 ns per shingle compared (~50 us per pair of 1,000-shingle documents: 1M pairs ~50 s); the
    # shingle sets wait in a temporary file (8 bytes per shingle) and only one block of pairs' sets is in memory.
    max_exact_pairs: int = 1_000_000
    # What the span pass does with a document sharing >= span_length tokens with an earlier one: "flag"
    # (report only), "drop" (the whole document) or "remove_span" (cut the shared tokens).
    span_policy: str = "flag"
    # How confirmed pairs become clusters (corpus.dedup): "star" = centres taken in keep-rule order, each
    # cluster a centre plus documents whose own Jaccard with it is >= threshold (installed license texts:
    # pair precision 0.97, recall 0.96); "transitive" = connected components (union-find) of confirmed
    # pairs, which chain A~B~C into one cluster even when J(A, C) < threshold (precision 0.87, recall 1.0).
    cluster: str = "star"

    def __post_init__(self) -> None:
        if self.confirm not in ("exact", "estimate"):
            raise ValueError(f"dedup.confirm must be 'exact' or 'estimate', got {self.confirm!r}")
        if self.cluster not in ("star", "transitive"):
            raise ValueError(f"dedup.cluster must be 'star' or 'transitive', got {self.cluster!r}")
        pairs = self.max_exact_pairs
        if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 0:
            raise ValueError(f"dedup.max_exact_pairs must be an integer >= 0, got {self.max_exact_pairs!r}")
        if self.span_policy not in ("flag", "drop", "remove_span"):
            raise ValueError(f"dedup.span_policy must be 'flag', 'drop' or 'remove_span', got {self.span_policy!r}")
        if self.shingle_size < 1:
            raise ValueError(f"dedup.shingle_size must be >= 1, got {self.shingle_size!r}")
        if self.scheme not in ("legacy", "affine32"):
            raise ValueError(f"dedup.scheme must be 'legacy' or 'affine32', got {self.scheme!r}")
        if self.span_length < 1:
            raise ValueError(f"dedup.span_length must be >= 1, got {self.span_length!r}")
        if self.bands < 1 or self.rows < 1:
            raise ValueError(f"dedup.bands and dedup.rows must be >= 1, got {self.bands}x{self.rows}")
        if self.bands * self.rows > self.num_perm:
            raise ValueError(
                f"dedup.bands x dedup.rows = {self.bands * self.rows} exceeds dedup.num_perm = {self.num_perm}"
            )
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"dedup.threshold must be in (0, 1], got {self.threshold!r}")
        if not 0.0 <= self.max_duplicate_ratio <= 1.0:
            raise ValueError(f"dedup.max_duplicate_ratio must be in [0, 1], got {self.max_duplicate_ratio!r}")


@dataclass(frozen=True)
class TrainingConfig:
    """The smoke-training run: a tiny GPT, a few optimizer steps over the verified shards."""

    steps: int = 50
    # 3.3M parameters (3.2M of them the tied 50,257 x 64 embedding): ~0.4 s per step at batch 4, L 256 on
    # 2 CPU cores, so the default run's two 50-step trainings take ~45 s; a GPU makes them near-instant.
    batch_size: int = 4
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    learning_rate: float = 3e-3
    min_loss_drop: float = 0.05
    require_gpu: bool = False
    eval_batches: int = 4
    # The loss-drop check compares the mean of the first k step losses with the mean of the last k,
    # k = min(loss_window, steps // 2) (see corpus.train).
    loss_window: int = 5
    grad_clip: float = 1.0  # global grad-norm clip; 0 disables it
    dropout: float = 0.0
    # Gradient-similarity poisoning scan (corpus.poison): samples scanned, samples per vmap chunk, and the
    # robust z-score below which a sample is flagged. At d_model 128, L 256 one sample cost ~0.6 s on one
    # CPU core; a chunk holds chunk x L x 50,257 fp32 logits (206 MB at chunk 4, d_model independent).
    scan_samples: int = 64
    scan_chunk_size: int = 4
    scan_z_threshold: float = -3.5

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "d_model",
            "n_layers",
            "n_heads",
            "eval_batches",
            "loss_window",
            "scan_samples",
            "scan_chunk_size",
        ):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"training.{name} must be >= 1, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"training.d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.learning_rate <= 0:
            raise ValueError(f"training.learning_rate must be > 0, got {self.learning_rate!r}")
        if self.grad_clip < 0:
            raise ValueError(f"training.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"training.dropout must be in [0, 1), got {self.dropout!r}")
        if self.scan_z_threshold >= 0:
            raise ValueError(
                f"training.scan_z_threshold must be < 0 (flags low similarity), got {self.scan_z_threshold!r}"
            )


@dataclass(frozen=True)
class PipelineConfig:
    """Run-wide settings. Every key is optional in the manifest; these are the defaults."""

    encoding: str = "gpt2"
    max_length: int = 256
    stride: int = 256
    temperature: float = 0.7
    validation_fraction: float = 0.01
    seed: int = 1234
    token_budget: int | None = None
    max_epochs: float = 4.0
    windows_per_shard: int = 4096
    packed_rows_per_shard: int = 4096
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def __post_init__(self) -> None:
        if self.encoding != "gpt2":
            raise ValueError(f"pipeline.encoding: only 'gpt2' is supported, got {self.encoding!r}")
        if self.max_length < 1:
            raise ValueError(f"pipeline.max_length must be >= 1, got {self.max_length!r}")
        if self.stride < 1:
            raise ValueError(f"pipeline.stride must be >= 1, got {self.stride!r}")
        if not 0.0 < self.temperature <= 1.0:
            raise ValueError(f"pipeline.temperature must be in (0, 1], got {self.temperature!r}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"pipeline.validation_fraction must be in [0, 1), got {self.validation_fraction!r}")
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"pipeline.token_budget must be >= 1 when set, got {self.token_budget!r}")
        if self.max_epochs <= 0:
            raise ValueError(f"pipeline.max_epochs must be > 0, got {self.max_epochs!r}")
        if self.windows_per_shard < 1:
            raise ValueError(f"pipeline.windows_per_shard must be >= 1, got {self.windows_per_shard!r}")
        if self.packed_rows_per_shard < 1:
            raise ValueError(f"pipeline.packed_rows_per_shard must be >= 1, got {self.packed_rows_per_shard!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SourceSpec:
    """One source of documents. `path` is absolute after loading."""

    name: str
    kind: str
    profile: str = "prose"
    path: Path | None = None
    glob: str = "**/*.txt"
    text_field: str = "text"
    text_column: str = "text"
    languages: tuple[str, ...] = ("en",)
    priority: int = 0
    weight: float | None = None
    min_share: float | None = None
    max_share: float | None = None
    max_epochs: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["path"] = None if self.path is None else str(self.path)
        out["languages"] = list(self.languages)
        return out


@dataclass(frozen=True)
class SourcesManifest:
    path: Path
    sha256: str
    pipeline: PipelineConfig
    sources: tuple[SourceSpec, ...]

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def source(self, name: str) -> SourceSpec:
        for spec in self.sources:
            if spec.name == name:
                return spec
        raise KeyError(f"no source named {name!r} in {self.path} (sources: {', '.join(self.source_names)})")


_SOURCE_KEYS = {f.name for f in dataclasses.fields(SourceSpec)} - {"priority"}


# Scalar field types (as annotations read under `from __future__ import annotations`) and what YAML must give.
_SCALARS: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "an integer"),
    "float": ((int, float), "a number"),
    "bool": ((bool,), "true or false"),
    "str": ((str,), "a string"),
}


def _check_scalars(cls: type, raw: Mapping[str, Any], where: str, prefix: str) -> None:
    """Each scalar setting has its declared type (YAML's `true` is not an integer, `2.5` not a row count),
    so a wrong value is named here instead of failing later inside a stage."""
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        kind = str(f.type).replace(" ", "")
        optional = kind.endswith("|None")
        base = kind.removesuffix("|None")
        if base not in _SCALARS:
            continue
        value = raw[f.name]
        if value is None and optional:
            continue
        types, want = _SCALARS[base]
        if not isinstance(value, types) or (base != "bool" and isinstance(value, bool)):
            raise ManifestError(
                f"{where}: {prefix}{f.name} must be {want}{' or null' if optional else ''}, got {value!r}"
            )


def _section(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise ManifestError(f"{where} must be a mapping, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    path, _, section = where.rpartition(": ")
    _check_scalars(cls, raw, path, f"{section}.")
    try:
        return cls(**raw)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{where}: {exc}") from exc


def _pipeline(raw: Any, where: str) -> PipelineConfig:
    if raw is None:
        return PipelineConfig()
    if not isinstance(raw, Mapping):
        raise ManifestError(f"{where}: 'pipeline' must be a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    sections = {
        "filters": _section(FilterConfig, raw.pop("filters", None), f"{where}: pipeline.filters"),
        "dedup": _section(DedupConfig, raw.pop("dedup", None), f"{where}: pipeline.dedup"),
        "training": _section(TrainingConfig, raw.pop("training", None), f"{where}: pipeline.training"),
    }
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ManifestError(f"{where}: unknown pipeline key(s) {unknown}; known keys: {sorted(known)}")
    _check_scalars(PipelineConfig, raw, where, "pipeline.")
    try:
        return PipelineConfig(**raw, **sections)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{where}: {exc}") from exc


def _source(raw: Any, index: int, root: Path, where: str) -> SourceSpec:
    at = f"{where}: sources[{index}]"
    if not isinstance(raw, Mapping):
        raise ManifestError(f"{at} must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _SOURCE_KEYS)
    if unknown:
        raise ManifestError(f"{at}: unknown key(s) {unknown}; known keys: {sorted(_SOURCE_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not SOURCE_NAME.match(name):
        raise ManifestError(f"{at}.name must match {SOURCE_NAME.pattern} (letters, digits, _ . -), got {name!r}")
    at = f"{where}: source {name!r}"
    kind = raw.get("kind")
    if kind not in SOURCE_KINDS:
        raise ManifestError(f"{at}: unknown kind {kind!r}; known kinds: {', '.join(SOURCE_KINDS)}")
    profile = raw.get("profile", "prose")
    if not isinstance(profile, str) or not profile:
        raise ManifestError(f"{at}: profile must be a non-empty string, got {profile!r}")
    fields: dict[str, Any] = {k: v for k, v in raw.items() if k not in ("name", "kind", "profile", "path")}
    if "languages" in fields:
        langs = fields["languages"]
        if isinstance(langs, str):
            langs = [langs]
        if not isinstance(langs, list) or not all(isinstance(x, str) for x in langs):
            raise ManifestError(f"{at}: languages must be a list of language codes, got {raw['languages']!r}")
        fields["languages"] = tuple(langs)
    for key in ("weight", "min_share", "max_share", "max_epochs"):
        value = fields.get(key)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ManifestError(f"{at}: {key} must be a non-negative number, got {value!r}")
        if key in ("min_share", "max_share") and value > 1:
            raise ManifestError(f"{at}: {key} must be in [0, 1], got {value!r}")
    path: Path | None = None
    if kind in PATH_KINDS:
        raw_path = raw.get("path")
        if not isinstance(raw_path, str) or not raw_path:
            raise ManifestError(f"{at}: kind {kind!r} needs a 'path'")
        candidate = Path(raw_path).expanduser()
        if not candidate.is_absolute():
            candidate = (root / candidate).resolve()
            if not candidate.is_relative_to(root.resolve()):
                raise ManifestError(
                    f"{at}: path {raw_path!r} escapes the manifest's directory {root}; use an absolute path"
                )
        if not candidate.exists():
            raise ManifestError(f"{at}: path {raw_path!r} does not exist (resolved to {candidate})")
        if kind == "text_files" and not candidate.is_dir():
            raise ManifestError(f"{at}: kind 'text_files' needs a directory, {candidate} is not one")
        if kind in ("jsonl", "parquet") and not candidate.is_file():
            raise ManifestError(f"{at}: kind {kind!r} needs a file, {candidate} is not one")
        path = candidate
    elif "path" in raw:
        raise ManifestError(f"{at}: kind {kind!r} takes no 'path'")
    glob = fields.get("glob", "**/*.txt")
    if not isinstance(glob, str) or not glob or glob.startswith("/") or ".." in Path(glob).parts:
        raise ManifestError(f"{at}: glob {glob!r} must be a relative pattern that stays inside the source directory")
    try:
        return SourceSpec(name=name, kind=kind, profile=profile, path=path, priority=index, **fields)
    except TypeError as exc:
        raise ManifestError(f"{at}: {exc}") from exc


def load_manifest(path: str | Path) -> SourcesManifest:
    """Read and validate a sources manifest; raise `ManifestError` before any work is done."""
    manifest_path = Path(path).expanduser().resolve()
    if not manifest_path.is_file():
        raise ManifestError(f"sources manifest {manifest_path} does not exist")
    data = manifest_path.read_bytes()
    try:
        raw = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ManifestError(f"{manifest_path}: not valid UTF-8 YAML: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise ManifestError(f"{manifest_path}: expected a mapping with 'pipeline' and 'sources'")
    unknown = sorted(set(raw) - {"pipeline", "sources"})
    if unknown:
        raise ManifestError(f"{manifest_path}: unknown top-level key(s) {unknown}; known: ['pipeline', 'sources']")
    where = str(manifest_path)
    pipeline = _pipeline(raw.get("pipeline"), where)
    raw_sources = raw.get("sources")
    if not isinstance(raw_sources, list) or not raw_sources:
        raise ManifestError(f"{manifest_path}: 'sources' must be a non-empty list")
    root = manifest_path.parent
    sources = tuple(_source(item, i, root, where) for i, item in enumerate(raw_sources))
    seen: set[str] = set()
    for spec in sources:
        if spec.name in seen:
            raise ManifestError(f"{manifest_path}: duplicate source name {spec.name!r}")
        seen.add(spec.name)
    return SourcesManifest(
        path=manifest_path,
        sha256=hashlib.sha256(data).hexdigest(),
        pipeline=pipeline,
        sources=sources,
    )


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON form of a config object (sorted keys, no whitespace)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()
