"""reference_model: the Kneser-Ney n-gram models the perplexity filter scores with, cross-fitted by fold.

The reference set (config `filters.perplexity_reference`, default: the heuristic-kept documents of
every prose source) is tokenized with GPT-2 and counted by `corpus.filters.perplexity.NGramLM`.

Cross-fitting. The reference documents are also documents the filter scores, and an n-gram model
scores its own training text far too well: trained at order 3 on 300 tinyshakespeare blocks of 40
lines plus one block of shuffled tokens, the blocks scored 2.21 nats in-sample (a model trained on
every other block scored the rest 4.73), and the shuffled block 2.63, under the 2.77 cut-off (mean +
3 std), because each of its never-seen trigram contexts has one continuation: its own. So every
document gets a fold from its doc_id (the text's sha256, so exact copies share a fold), model k is
trained on the reference documents outside fold k, and a document of fold k, reference or not, is
scored by model k. With 2 folds each model sees half the reference set and training costs the same
as one model on all of it.

Each model is saved in its own directory of the version (`fold<k>/model.json` + `.npy` arrays); the
manifest records every model's sha256 (the hash of its model.json, which holds each array's sha256)
and `model_sha256`, a hash over all of them, which is the reference set's identity in one id.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Sequence

import numpy as np

from corpus.charts import new_chart, png_bytes
from corpus.config import SourcesManifest
from corpus.filters.perplexity import GPT2_EOT, GPT2_VOCAB, NGramLM
from corpus.lake import Version, VersionWriter
from corpus.stages import StageOutput
from corpus.stages.io import iter_batches
from corpus.tokenizer import get_encoding

CODE_VERSION = "reference_model/1"
THREADS = max(1, min(8, os.cpu_count() or 1))


def reference_sources(manifest: SourcesManifest) -> list[str]:
    """Names of the sources whose kept documents train the reference model, in manifest order."""
    cfg = manifest.pipeline.filters
    if cfg.perplexity_reference is None:
        return [s.name for s in manifest.sources if s.profile == "prose"]
    unknown = [name for name in cfg.perplexity_reference if name not in manifest.source_names]
    if unknown:
        raise ValueError(
            f"{manifest.path}: pipeline.filters.perplexity_reference names unknown source(s) {unknown}; "
            f"sources: {manifest.source_names}"
        )
    return [name for name in manifest.source_names if name in cfg.perplexity_reference]


def scored_sources(manifest: SourcesManifest) -> list[str]:
    """Names of the sources the perplexity filter scores (profile in `filters.perplexity_profiles`)."""
    profiles = manifest.pipeline.filters.perplexity_profiles
    return [s.name for s in manifest.sources if s.profile in profiles]


def reference_inputs(manifest: SourcesManifest) -> list[str]:
    """The sources reference_model reads: the reference sources, or none when no source is scored."""
    return reference_sources(manifest) if scored_sources(manifest) else []


def folds_of(doc_ids: Sequence[str], folds: int) -> np.ndarray:
    """Fold of each document: the first 64 bits of its doc_id (a sha256 hex digest) modulo `folds`."""
    return np.fromiter((int(d[:16], 16) % folds for d in doc_ids), dtype=np.int64, count=len(doc_ids))


def tokenize(texts: Sequence[str]) -> list[np.ndarray]:
    enc = get_encoding()
    return [np.asarray(ids, dtype=np.uint16) for ids in enc.encode_ordinary_batch(list(texts), num_threads=THREADS)]


def build_reference_model(
    heuristic: Sequence[Version], manifest: SourcesManifest, writer: VersionWriter
) -> StageOutput:
    """Train one n-gram model per fold on the reference sources' heuristic-kept documents."""
    cfg = manifest.pipeline.filters
    names = reference_inputs(manifest)
    scored = scored_sources(manifest)
    by_name = {v.partition: v for v in heuristic}
    missing = [n for n in names if n not in by_name]
    assert not missing, f"reference sources {missing} have no heuristic_documents version among {sorted(by_name)}"
    used = [by_name[n] for n in names]
    tokens: list[np.ndarray] = []
    fold_ids: list[np.ndarray] = []
    n_in = n_empty = 0
    for version in used:
        for batch in iter_batches(version.file("documents.parquet"), ["doc_id", "text"]):
            ids = tokenize(batch.column("text").to_pylist())
            n_in += len(ids)
            keep = [i for i, t in enumerate(ids) if len(t)]
            n_empty += len(ids) - len(keep)
            tokens.extend(ids[i] for i in keep)
            fold_ids.append(folds_of([batch.column("doc_id")[i].as_py() for i in keep], cfg.perplexity_folds))
    fold = np.concatenate(fold_ids) if fold_ids else np.zeros(0, np.int64)
    models: list[dict[str, object]] = []
    if tokens:
        for k in range(cfg.perplexity_folds):
            train = [t for t, f in zip(tokens, fold, strict=True) if f != k]
            if not train:
                warnings.warn(
                    f"reference_model: every reference document falls in fold {k}, so its documents cannot be "
                    "scored (the perplexity filter keeps them unscored); add reference documents",
                    stacklevel=2,
                )
                continue
            model = NGramLM.train(train, order=cfg.perplexity_order, vocab_size=GPT2_VOCAB, pad_id=GPT2_EOT)
            directory = writer.path(f"fold{k}/model.json").parent
            sha = model.save(directory)
            models.append(
                {
                    "fold": k,
                    "path": f"fold{k}",
                    "sha256": sha,
                    "documents": int(model.meta["documents"]),
                    "tokens": int(model.meta["tokens"]),
                    "ngrams": [len(level.keys) for level in model.orders],
                }
            )
    elif scored:
        warnings.warn(
            f"reference_model: the reference sources {names} have no kept documents, so the perplexity filter is "
            f"off for {scored}; name sources with prose in pipeline.filters.perplexity_reference",
            stacklevel=2,
        )
    model_sha = hashlib.sha256("".join(str(m["sha256"]) for m in models).encode()).hexdigest() if models else None
    counts = {
        "in": n_in,
        "out": n_in - n_empty,
        "dropped": {"no_tokens": n_empty} if n_empty else {},
        "reference_tokens": int(sum(len(t) for t in tokens)),
        "models": len(models),
    }
    version = writer.commit(
        code_version=CODE_VERSION,
        config={
            "reference_sources": names,
            "scored_sources": scored,
            "order": cfg.perplexity_order,
            "folds": cfg.perplexity_folds,
            "encoding": "gpt2",
        },
        upstream=[v.ref() for v in used],
        counts=counts,
        extra={"in_from": ["heuristic_documents"], "models": models, "model_sha256": model_sha},
    )
    summary: dict[str, object] = {
        "reference_sources": ", ".join(names) or "(none)",
        "reference_documents": n_in - n_empty,
        "reference_tokens": counts["reference_tokens"],
        "model_sha256": model_sha or "(no model)",
    }
    lines = ["| fold | documents | tokens | n-grams per order | sha256 |", "| --- | --- | --- | --- | --- |"]
    lines += [
        f"| {m['fold']} | {m['documents']:,} | {m['tokens']:,} | {m['ngrams']} | `{str(m['sha256'])[:16]}` |"
        for m in models
    ]
    return StageOutput(version=version, counts=counts, summary=summary, markdown="\n".join(lines))


class FoldModels:
    """The models of a reference_model version, loaded and verified against the recorded sha256."""

    def __init__(self, reference: Version) -> None:
        extra = reference.extra
        self.folds = int(reference.manifest["config"]["folds"])
        self.sha256 = extra.get("model_sha256")
        self.models: dict[int, NGramLM] = {}
        for entry in extra.get("models", []):
            self.models[int(entry["fold"])] = NGramLM.load(reference.path / entry["path"], entry["sha256"])

    def __bool__(self) -> bool:
        return bool(self.models)

    def score(self, doc_ids: Sequence[str], texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(log-perplexity, token count) per document; nan where the document has no token or no model."""
        ids = tokenize(texts)
        lengths = np.fromiter((len(t) for t in ids), dtype=np.int64, count=len(ids))
        out = np.full(len(ids), np.nan)
        fold = folds_of(doc_ids, self.folds)
        for k, model in self.models.items():
            rows = np.flatnonzero(fold == k)
            if len(rows):
                out[rows] = model.score_batch([ids[i] for i in rows])
        return out, lengths


def min_documents_for_a_drop(n_std: float) -> int:
    """The fewest scored documents for which one can exceed mean + n_std * std (Samuelson: z <= sqrt(n - 1))."""
    return math.floor(n_std**2 + 1) + 1


def histogram_png(values: np.ndarray, cutoff: float, title: str) -> bytes:
    """A 480x240 PNG histogram of log-perplexities with the cut-off as a red line (matplotlib Agg)."""
    fig, ax = new_chart()
    finite = values[np.isfinite(values)]
    if len(finite):
        ax.hist(finite, bins=min(50, max(5, len(finite) // 4)), color="#4c72b0")
    if math.isfinite(cutoff):
        ax.axvline(cutoff, color="#c44e52", lw=1.2, label=f"cut-off {cutoff:.2f}")
        ax.legend(fontsize=7, frameon=False)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("log-perplexity (nats/token)", fontsize=8)
    ax.set_ylabel("documents", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    return png_bytes(fig)
