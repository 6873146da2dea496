"""span_policy end to end: what reaches the training stream under flag, drop and remove_span, verify and trace.

One `corpus run` per policy of test_pipeline's tiny corpus plus a book that quotes 1,000 characters of a
pydoc topic (an earlier source) inside text of its own: not a near duplicate, but a shared token span.
"""

from __future__ import annotations

import importlib
import itertools
import pydoc_data.topics
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_pipeline import tiny_manifest

from corpus import audit
from corpus.audit import verify
from corpus.lake import Lake, Version
from corpus.release import latest_release, lineage
from orchestration import cli

POLICIES = ("flag", "drop", "remove_span")
SPAN_LENGTH = 32


def quoting_manifest(root: Path, policy: str) -> Path:
    manifest = tiny_manifest(root)
    topics = pydoc_data.topics.topics
    long_topics = [topics[k] for k in sorted(topics) if len(topics[k]) > 3000]
    quoted = long_topics[8][1000:2000]  # not one of the books (those are the first 6)
    own = importlib.import_module("argparse").__doc__ or ""
    (root / "books" / "quoting.txt").write_text(own[:1500] + "\n\n" + quoted + "\n\n" + own[1500:3000])
    for name in ("difflib", "heapq"):
        (root / "books" / f"extra_{name}.txt").write_text(importlib.import_module(name).__doc__ or "")
    text = manifest.read_text().replace(
        "pipeline:\n", f"pipeline:\n  dedup: {{span_length: {SPAN_LENGTH}, span_policy: {policy}}}\n"
    )
    manifest.write_text(text.replace("steps: 12,", "steps: 4, scan_samples: 4,"))
    return manifest


@pytest.fixture(scope="module")
def lakes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for policy in POLICIES:
        root = tmp_path_factory.mktemp(policy)
        manifest = quoting_manifest(root / "src", policy)
        assert cli.main(["run", "--sources", str(manifest), "--lake", str(root / "lake")]) == 0
        out[policy] = root / "lake"
    return out


def version_of(lake: Path, asset: str, partition: str = "_all") -> Version:
    return next(v for v in lineage(Lake(lake), [latest_release(lake)]) if (v.asset, v.partition) == (asset, partition))


def quoting_document(lake: Path) -> tuple[dict, list[dict], np.ndarray]:
    """The quoting book's tokenized row, its spans, and its stored tokens (<|endoftext|> included)."""
    books = version_of(lake, "tokenized_documents", "books")
    index = pq.read_table(books.file("index.parquet")).to_pylist()
    row = next(r for r in index if r["uri"] == "quoting.txt")
    spans = version_of(lake, "repeated_spans")
    hits = [r for r in pq.read_table(spans.file("spans.parquet")).to_pylist() if r["doc_id"] == row["doc_id"]]
    tokens = np.fromfile(books.file("tokens.bin"), dtype="<u2")[row["start"] : row["start"] + row["length"]]
    return row, hits, tokens


def test_the_span_is_found_in_every_lake(lakes: dict[str, Path]) -> None:
    for policy, lake in lakes.items():
        _, hits, _ = quoting_document(lake)
        assert hits, f"{policy}: the quoted topic is not flagged"
        assert {h["earlier_source"] for h in hits} == {"docs"}
        assert all(h["length"] >= SPAN_LENGTH and h["start"] > 0 for h in hits)
        spans = version_of(lake, "repeated_spans")
        assert spans.extra["span_policy"] == policy


def stream_rows(lake: Path, doc_id: str) -> list[dict]:
    mixed = version_of(lake, "mixed_tokens")
    index = pq.read_table(mixed.file("stream_index.parquet")).to_pylist()
    return [r for r in index if r["doc_id"] == doc_id]


def test_what_reaches_the_training_stream(lakes: dict[str, Path]) -> None:
    mixed = {p: version_of(lake, "mixed_tokens") for p, lake in lakes.items()}
    assert len({v.version for v in mixed.values()}) == 3  # the policy is part of the version
    assert [mixed[p].manifest["config"]["span_policy"] for p in POLICIES] == list(POLICIES)
    for policy, lake in lakes.items():
        row, hits, tokens = quoting_document(lake)
        rows = stream_rows(lake, row["doc_id"])
        plan = version_of(lake, "mixture_plan")
        flagged = pq.read_table(version_of(lake, "repeated_spans").file("documents.parquet")).to_pylist()
        if policy == "flag":
            assert rows and all(r["offset"] == 0 and r["length"] == row["length"] for r in rows)
            assert plan.counts["dropped"] == {}
        elif policy == "drop":
            assert rows == []
            dropped = {r["doc_id"] for r in flagged if r["action"] == "drop"}
            assert plan.counts["dropped"] == {"repeated_span": len(dropped)}
            index = pq.read_table(mixed[policy].file("stream_index.parquet"), columns=["doc_id"]).column("doc_id")
            assert not dropped & set(index.to_pylist())
        else:
            assert rows
            keep = np.ones(row["length"], dtype=bool)
            for h in hits:
                keep[h["start"] : h["start"] + h["length"]] = False
            expected_pieces = np.flatnonzero(np.diff(np.concatenate(([0], keep.astype(np.int8), [0]))))
            expected = [(int(a), int(b - a)) for a, b in zip(expected_pieces[::2], expected_pieces[1::2], strict=True)]
            for split in ("train", "validation"):
                stream = np.fromfile(mixed[policy].file(f"{split}.bin"), dtype="<u2")
                for epoch in sorted({r["epoch"] for r in rows if r["split"] == split}):
                    pieces = [r for r in rows if r["split"] == split and r["epoch"] == epoch]
                    assert [(r["offset"], r["length"]) for r in pieces] == expected
                    assert all(
                        a["stream_start"] + a["length"] == b["stream_start"] for a, b in itertools.pairwise(pieces)
                    )
                    got = np.concatenate([stream[r["stream_start"] : r["stream_start"] + r["length"]] for r in pieces])
                    assert np.array_equal(got, tokens[keep])
            assert sum(r["length"] for r in rows if r["epoch"] == rows[0]["epoch"]) == int(keep.sum())
            assert plan.counts["removed_span_tokens"] > 0
        # The plan counted the tokens the stream holds: realized shares match it.
        assert mixed[policy].extra["worst_share_error_pp"] <= 0.5
        train_tokens = sum(r["realized_tokens"] for r in mixed[policy].extra["mixture"])
        assert train_tokens == mixed[policy].counts["train_tokens"]


def test_verify_and_trace_pass_under_every_policy(lakes: dict[str, Path]) -> None:
    for policy, lake in lakes.items():
        result = verify(lake)
        assert result.ok, (policy, result.problems)
        windows = version_of(lake, "training_windows")
        stride, length = windows.extra["stride"], windows.extra["max_length"]
        row, _, _ = quoting_document(lake)
        rows = stream_rows(lake, row["doc_id"])
        samples = [("train-00000.bin", 0), ("packed:train", 0)]
        for r in rows[:2]:
            # A window across the start of every piece: under remove_span, one straddles a cut.
            at = r["stream_start"] + (1 if r["offset"] else 3)
            w = max(0, (at - 1) // stride)
            shard = next(
                s
                for s in windows.extra["shards"]
                if s["split"] == r["split"] and s["first_window"] <= w < s["first_window"] + s["windows"]
            )
            samples.append((shard["path"], w - shard["first_window"]))
            assert w * stride < at < w * stride + length + 1
        for shard, index in samples:
            replay = audit.replay_sample(lake, shard, index)
            assert replay["equal"], (policy, shard, index)
        if policy == "remove_span":
            cut = next(r for r in rows if r["offset"] > 0)
            w = (cut["stream_start"] - 1) // stride
            shard = next(
                s
                for s in windows.extra["shards"]
                if s["split"] == cut["split"] and s["first_window"] <= w < s["first_window"] + s["windows"]
            )
            traced = audit.trace_sample(lake, shard["path"], w - shard["first_window"])
            mine = [d for d in traced["documents"] if d["doc_id"] == row["doc_id"]]
            assert len(mine) == 2  # both sides of the cut, each with its own offsets in the document
            assert mine[0]["token_offsets"][1] < mine[1]["token_offsets"][0] == cut["offset"]
        fate = audit.trace_document(lake, row["doc_id"])
        if policy == "drop":
            assert fate["placements"] == [] and fate["fate"].startswith("dropped by repeated_spans: ")
            assert fate["fate"].endswith("tokens repeat an earlier document (dedup.span_policy drop)")
        else:
            assert (
                fate["fate"]
                == f"trained on: {len({(r['split'], r['epoch']) for r in rows})} placements in the mixed stream"
            )
