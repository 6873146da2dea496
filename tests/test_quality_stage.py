"""heuristic_documents -> reference_model -> filtered_documents on tiny hand-made lakes (corpus.stages)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pydoc_data.topics
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_perplexity import _rules_off  # tests/ is on sys.path (pytest's default import mode)

from corpus.config import FilterConfig, PipelineConfig, SourcesManifest, SourceSpec
from corpus.filters import QualityFilter
from corpus.filters.perplexity import NGramLM, perplexity_cutoff
from corpus.lake import Lake, Version
from corpus.reconcile import reconcile
from corpus.stages import filtered as filtered_stage
from corpus.stages.filtered import build_filtered_documents, build_heuristic_documents, count_tokens, drop_reasons
from corpus.stages.io import DOCUMENT_SCHEMA, write_rows
from corpus.stages.perplexity import (
    FoldModels,
    build_reference_model,
    folds_of,
    histogram_png,
    min_documents_for_a_drop,
    reference_sources,
    scored_sources,
)
from corpus.tokenizer import get_encoding

TOPICS = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
LONG_TOPICS = [t for t in TOPICS if len(t) > 2000]  # 34 topics: long enough for stable scores
CODE = [Path(m.__file__).read_text() for m in (json, hashlib, warnings) if m.__file__]


def garbage() -> str:
    """400 uniformly random GPT-2 tokens: every rule is off for prose, only the perplexity filter can see it."""
    ids = np.random.default_rng(0).integers(0, 50256, size=400)
    return get_encoding().decode(ids.tolist())


def rules_off() -> FilterConfig:
    """Prose with its rules, language ID and PII policy off, so that garbage reaches the perplexity filter."""
    return dataclasses.replace(_rules_off(), review_documents=5)


def make_manifest(cfg: FilterConfig, specs: tuple[SourceSpec, ...]) -> SourcesManifest:
    return SourcesManifest(Path("/nonexistent/sources.yaml"), "0" * 64, PipelineConfig(filters=cfg), specs)


def raw_version(lake: Lake, name: str, texts: list[str]) -> Version:
    rows = [
        {
            "doc_id": hashlib.sha256(t.encode()).hexdigest(),
            "source": name,
            "uri": f"{name}/{i}",
            "position": i,
            "byte_offset": 0,
            "byte_length": len(t.encode()),
            "raw_sha256": "0" * 64,
            "text": t,
        }
        for i, t in enumerate(texts)
    ]
    with lake.writer("raw_documents", name) as writer:
        write_rows(writer.path("documents.parquet"), rows, DOCUMENT_SCHEMA)
        counts = {"in": len(rows), "out": len(rows), "dropped": {}}
        return writer.commit(code_version="test", config={}, counts=counts, extra={"out_file": "documents.parquet"})


SPECS = (
    SourceSpec("docs", "pydoc_topics", "prose"),
    SourceSpec("more", "pydoc_topics", "prose"),
    SourceSpec("code", "python_stdlib", "code"),
)
INPUTS = {"docs": [*LONG_TOPICS[::2], garbage(), "   "], "more": LONG_TOPICS[1::2], "code": CODE}


def run_stages(root: Path, cfg: FilterConfig) -> dict[str, Any]:
    lake = Lake(root)
    manifest = make_manifest(cfg, SPECS)
    out: dict[str, Any] = {"manifest": manifest}
    for spec in SPECS:
        raw = raw_version(lake, spec.name, INPUTS[spec.name])
        with lake.writer("heuristic_documents", spec.name) as writer:
            out[f"heuristic/{spec.name}"] = build_heuristic_documents(raw, spec, cfg, writer)
        out[f"raw/{spec.name}"] = raw
    heuristic = [out[f"heuristic/{n}"].version for n in reference_sources(manifest)]
    with lake.writer("reference_model") as writer:
        out["reference"] = build_reference_model(heuristic, manifest, writer)
    for spec in SPECS:
        reference = out["reference"].version if spec.name in scored_sources(manifest) else None
        with lake.writer("filtered_documents", spec.name) as writer, warnings.catch_warnings():
            warnings.simplefilter("error")  # every source here is big enough for a drop: no warning expected
            out[f"filtered/{spec.name}"] = build_filtered_documents(
                out[f"heuristic/{spec.name}"].version,
                reference,
                spec,
                cfg,
                writer,
            )
    return out


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_stages(tmp_path_factory.mktemp("quality") / "lake", rules_off())


def rows(version: Version, name: str) -> list[dict[str, Any]]:
    return pq.read_table(version.file(name)).to_pylist()


def test_planted_garbage_is_dropped_with_reason_and_value(stages: dict[str, Any]) -> None:
    heuristic = stages["heuristic/docs"].version
    output = stages["filtered/docs"]
    version = output.version
    n_topics = len(LONG_TOPICS[::2])
    assert heuristic.counts["dropped"] == {"empty_document": 1}
    assert version.counts["in"] == n_topics + 1
    assert version.counts["out"] == n_topics
    assert version.counts["dropped"] == {"perplexity_too_high": 1}
    assert version.counts["scored"] == n_topics + 1 and version.counts["unscored"] == 0

    decisions = rows(version, "decisions.parquet")
    assert [d["position"] for d in decisions] == list(range(n_topics + 2))  # every raw document, in order
    bad, empty = decisions[n_topics], decisions[n_topics + 1]
    assert (bad["kept"], bad["reason"], bad["stage"], bad["quality"]) == (
        False,
        "perplexity_too_high",
        "perplexity",
        0.0,
    )
    assert (empty["kept"], empty["reason"], empty["stage"], empty["log_perplexity"]) == (
        False,
        "empty_document",
        "heuristic",
        None,
    )
    features = json.loads(str(bad["features"]))
    cutoff = version.extra["perplexity"]["cutoff"]
    assert features["log_perplexity"] == bad["log_perplexity"] > cutoff == features["perplexity_cutoff"]
    scores = [d["log_perplexity"] for d in decisions if d["stage"] != "heuristic"]
    assert cutoff == perplexity_cutoff(scores, 3.0)  # mean + 3 std over the source's scored documents
    kept_scores = [d["log_perplexity"] for d in decisions if d["kept"]]
    assert len(kept_scores) == n_topics and max(kept_scores) < cutoff

    # Tokens lost: the exact GPT-2 count of the dropped document's text.
    heuristic_docs = rows(heuristic, "documents.parquet")
    bad_text = str(heuristic_docs[n_topics]["text"])
    n_tokens = len(get_encoding().encode_ordinary(bad_text))
    assert output.tables["quality_drops"] == [
        {
            "stage": "perplexity",
            "reason": "perplexity_too_high",
            "documents": 1,
            "chars": len(INPUTS["docs"][n_topics]),
            "tokens": n_tokens,
            "estimated_documents": 0,
            "share": round(1 / (n_topics + 1), 6),
        }
    ]
    assert version.counts["dropped_tokens"] == {"perplexity_too_high": n_tokens}
    share = round(1 / (n_topics + 2), 6)
    blank = len(get_encoding().encode_ordinary("   "))
    assert drop_reasons(heuristic, version) == [
        {"stage": "heuristic", "reason": "empty_document", "documents": 1, "tokens": blank, "share": share},
        {"stage": "perplexity", "reason": "perplexity_too_high", "documents": 1, "tokens": n_tokens, "share": share},
    ]
    assert output.summary["documents_in"] == n_topics + 2
    assert output.summary["drop_share"] == round(2 / (n_topics + 2), 4)


def test_kept_documents_pass_through_unchanged(stages: dict[str, Any]) -> None:
    for name, dropped_rows in (("docs", {len(LONG_TOPICS[::2])}), ("more", set()), ("code", set())):
        heuristic = stages[f"heuristic/{name}"].version
        version = stages[f"filtered/{name}"].version
        before = rows(heuristic, "documents.parquet")
        assert rows(version, "documents.parquet") == [r for i, r in enumerate(before) if i not in dropped_rows]


def test_code_is_not_scored(stages: dict[str, Any]) -> None:
    version = stages["filtered/code"].version
    heuristic = stages["heuristic/code"].version
    assert version.manifest["config"] == {"profile": "code", "scored": False}
    assert [ref.asset for ref in version.upstream] == ["heuristic_documents"]  # the model is not an input
    assert version.extra["perplexity"] is None
    assert version.counts["scored"] == 0 and version.counts["unscored"] == heuristic.counts["out"] == len(CODE)
    assert all(d["log_perplexity"] is None for d in rows(version, "decisions.parquet"))
    review = stages["filtered/code"].tables["quality_review"]
    qualities = [r["quality"] for r in review]
    assert len(review) == len(CODE) and qualities == sorted(qualities)  # lowest quality first


def test_counts_reconcile(stages: dict[str, Any]) -> None:
    manifest = stages["manifest"]
    reference = stages["reference"].version
    heuristics = [stages[f"heuristic/{s.name}"].version for s in SPECS]
    assert reconcile(reference, [v for v in heuristics if v.partition in ("docs", "more")]) == []
    for spec, heuristic in zip(SPECS, heuristics, strict=True):
        assert reconcile(heuristic, [stages[f"raw/{spec.name}"]]) == []
        version = stages[f"filtered/{spec.name}"].version
        assert reconcile(version, [heuristic, reference]) == []
        assert version.counts["decisions"] == heuristic.counts["in"]
    assert reference.counts == {
        "in": len(LONG_TOPICS) + 1,  # the 34 topics and the garbage document
        "out": len(LONG_TOPICS) + 1,
        "dropped": {},
        "reference_tokens": reference.counts["reference_tokens"],
        "models": 2,
    }
    assert manifest.pipeline.filters.perplexity_folds == 2


def test_review_lists_the_worst_kept_documents(stages: dict[str, Any]) -> None:
    review = stages["filtered/docs"].tables["quality_review"]
    version = stages["filtered/docs"].version
    kept = sorted((d for d in rows(version, "decisions.parquet") if d["kept"]), key=lambda d: -d["log_perplexity"])
    assert [r["doc_id"] for r in review] == [d["doc_id"] for d in kept[:5]]
    assert [r["rank"] for r in review] == [1, 2, 3, 4, 5]
    perplexity = version.extra["perplexity"]
    assert review[0]["z"] == (review[0]["log_perplexity"] - perplexity["mean"]) / perplexity["std"]
    assert json.loads(review[0]["features"])["log_perplexity"] == review[0]["log_perplexity"]
    assert "data:image/png;base64," in stages["filtered/docs"].markdown


def test_scores_are_cross_fitted(stages: dict[str, Any]) -> None:
    """A document is scored by the model trained on the reference documents outside its fold."""
    reference = stages["reference"].version
    models = FoldModels(reference)
    assert sorted(models.models) == [0, 1]
    enc = get_encoding()
    docs = [
        (str(r["doc_id"]), np.array(enc.encode_ordinary(str(r["text"]))))
        for name in ("docs", "more")
        for r in rows(stages[f"heuristic/{name}"].version, "documents.parquet")
    ]
    folds = folds_of([d for d, _ in docs], 2)
    assert sum(m["documents"] for m in reference.extra["models"]) == len(docs)  # each document trains one of 2
    decisions = rows(stages["filtered/docs"].version, "decisions.parquet")
    score = {d["doc_id"]: d["log_perplexity"] for d in decisions}
    for k in (0, 1):
        held_out = NGramLM.train([t for (_, t), f in zip(docs, folds, strict=True) if f != k], order=3)
        assert held_out.sha256 == reference.extra["models"][k]["sha256"]
        mine = [(d, t) for (d, t), f in zip(docs, folds, strict=True) if f == k and d in score]
        assert mine
        assert [score[d] for d, _ in mine] == held_out.score_batch([t for _, t in mine]).tolist()


def test_reference_model_version_is_reproducible(stages: dict[str, Any], tmp_path: Path) -> None:
    again = run_stages(tmp_path / "lake", rules_off())
    first = stages["reference"].version
    second = again["reference"].version
    assert first.version == second.version
    assert first.extra["model_sha256"] == second.extra["model_sha256"]
    assert len(first.extra["model_sha256"]) == 64
    for entry in first.extra["models"]:
        assert (first.path / entry["path"] / "model.json").read_bytes() == (
            second.path / entry["path"] / "model.json"
        ).read_bytes()
        assert NGramLM.load(second.path / entry["path"], entry["sha256"]).sha256 == entry["sha256"]
    for spec in SPECS:
        assert stages[f"filtered/{spec.name}"].version.version == again[f"filtered/{spec.name}"].version.version


def test_heuristic_manifest_records_resolved_settings(stages: dict[str, Any]) -> None:
    version = stages["heuristic/code"].version
    settings = QualityFilter("code", rules_off(), languages=("en",)).settings()
    assert version.manifest["config"] == {"filter": json.loads(json.dumps(settings))}
    assert version.manifest["config"]["filter"]["thresholds"]["max_line_length"] == 1000


def test_reference_and_scored_sources_follow_config() -> None:
    specs = (SourceSpec("a", "pydoc_topics", "prose"), SourceSpec("b", "jsonl", "legal"), SourceSpec("c", "x", "code"))
    assert reference_sources(make_manifest(FilterConfig(), specs)) == ["a"]
    assert scored_sources(make_manifest(FilterConfig(), specs)) == ["a", "b"]
    assert reference_sources(make_manifest(FilterConfig(perplexity_reference=["b", "a"]), specs)) == ["a", "b"]
    assert scored_sources(make_manifest(FilterConfig(perplexity_profiles=[]), specs)) == []
    with pytest.raises(ValueError, match=r"perplexity_reference names unknown source\(s\) \['z'\]"):
        reference_sources(make_manifest(FilterConfig(perplexity_reference=["z"]), specs))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("perplexity_reference", [], "must name at least one source"),
        ("perplexity_folds", 1, r"perplexity_folds must be an integer in \[2, 16\], got 1"),
        ("perplexity_order", 5, r"perplexity_order must be an integer in \[1, 4\], got 5"),
        ("perplexity_n_std", 0, "perplexity_n_std must be a number > 0, got 0"),
        ("perplexity_profiles", [""], "perplexity_profiles must be a list of names"),
        ("perplexity_cutoff", "mean", r"perplexity_cutoff must be one of \['mean_std', 'median_mad'\], got 'mean'"),
    ],
)
def test_config_rejects_bad_perplexity_settings(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FilterConfig(**{field: value})


def filter_ten_documents(tmp_path: Path, cfg: FilterConfig) -> Any:
    """filtered_documents of a prose source of nine pydoc topics and one garbage document, last."""
    lake = Lake(tmp_path / "lake")
    spec = SourceSpec("few", "pydoc_topics", "prose")
    raw = raw_version(lake, "few", [*LONG_TOPICS[:9], garbage()])
    with lake.writer("heuristic_documents", "few") as writer:
        heuristic = build_heuristic_documents(raw, spec, cfg, writer).version
    with lake.writer("reference_model") as writer:
        reference = build_reference_model([heuristic], make_manifest(cfg, (spec,)), writer).version
    with lake.writer("filtered_documents", "few") as writer:
        return build_filtered_documents(heuristic, reference, spec, cfg, writer)


def test_small_source_warns_that_nothing_can_be_dropped(tmp_path: Path) -> None:
    assert [min_documents_for_a_drop(n) for n in (1.0, 2.0, 2.5, 3.0)] == [3, 6, 8, 11]
    with pytest.warns(UserWarning, match="10 scored documents"):
        version = filter_ten_documents(tmp_path, rules_off()).version
    assert version.counts["dropped"] == {}  # the garbage document's z is at most sqrt(9) = 3


def test_median_mad_cutoff_drops_what_mean_std_cannot(tmp_path: Path) -> None:
    # Three outliers among twenty inflate the std: mean + 3 std keeps them, median + 3 MAD does not.
    rng = np.random.default_rng(3)
    scores = [*rng.normal(5.0, 0.2, 20).tolist(), 6.5, 6.5, 6.5]
    assert perplexity_cutoff(scores, 3.0) > 6.5 > perplexity_cutoff(scores, 3.0, "median_mad")
    assert perplexity_cutoff([4.0] * 5 + [9.0], 3.0, "median_mad") == math.inf  # MAD 0: no spread, no drop
    with pytest.raises(ValueError, match="'mean_std' or 'median_mad'"):
        perplexity_cutoff(scores, 3.0, "iqr")
    # The 10-document source of the test above: the garbage document goes, and the rule is recorded.
    output = filter_ten_documents(tmp_path, dataclasses.replace(rules_off(), perplexity_cutoff="median_mad"))
    assert output.version.counts["dropped"] == {"perplexity_too_high": 1}
    assert output.version.manifest["config"]["cutoff"] == "median_mad"
    assert output.version.extra["perplexity"]["rule"] == "median_mad"
    decisions = rows(output.version, "decisions.parquet")
    assert [d["reason"] for d in decisions if not d["kept"]] == ["perplexity_too_high"]
    assert decisions[9]["kept"] is False  # the garbage document, last


def test_no_reference_documents_turns_the_filter_off(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    spec = SourceSpec("law", "jsonl", "legal")
    manifest = make_manifest(FilterConfig(), (spec,))
    with lake.writer("reference_model") as writer, pytest.warns(UserWarning, match=r"perplexity filter is off"):
        reference = build_reference_model([], manifest, writer).version
    assert reference.extra["models"] == [] and reference.extra["model_sha256"] is None
    assert not FoldModels(reference)


def test_count_tokens_estimates_only_huge_documents(monkeypatch: pytest.MonkeyPatch) -> None:
    enc = get_encoding()
    texts = ["Hello world, this is a test.", "x" * 30]
    monkeypatch.setattr(filtered_stage, "TOKEN_COUNT_MAX_CHARS", 29)
    assert count_tokens(texts) == ([len(enc.encode_ordinary(texts[0])), 8], [False, True])


def test_histogram_is_a_png() -> None:
    png = histogram_png(np.array([1.0, 2.0, 2.5, math.nan]), 2.2, "t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
