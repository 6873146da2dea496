import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus.config import SourceSpec
from corpus.sources import Quarantined, RawRecord, SourceError, read_source


def items(spec: SourceSpec) -> tuple[list[RawRecord], list[Quarantined]]:
    out = list(read_source(spec))
    return [i for i in out if isinstance(i, RawRecord)], [i for i in out if isinstance(i, Quarantined)]


def test_jsonl_reader_quarantines_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    lines = [
        json.dumps({"text": "first good"}).encode(),
        b"",
        b'{"text": "broken',
        json.dumps({"body": "no text field"}).encode(),
        json.dumps({"text": 42}).encode(),
        b'{"text": "bad \xff utf8"}',
        json.dumps({"text": "nul \u0000 byte"}).encode(),
        json.dumps({"text": "   "}).encode(),
        b"[1, 2]",
        json.dumps({"text": "last good"}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    docs, bad = items(SourceSpec(name="chat", kind="jsonl", path=path))
    assert [(d.text, d.position) for d in docs] == [("first good", 1), ("last good", 10)]
    assert [(q.position, q.reason) for q in bad] == [
        (3, "malformed_json"),
        (4, "missing_text_field"),
        (5, "text_not_string"),
        (6, "invalid_utf8"),
        (7, "nul_bytes"),
        (8, "empty_text"),
        (9, "not_an_object"),
    ]
    raw = path.read_bytes()
    assert raw[docs[1].byte_offset : docs[1].byte_offset + docs[1].byte_length].startswith(b'{"text": "last good"}')
    assert all(q.uri == "chat.jsonl" and q.raw_sha256 == docs[0].raw_sha256 for q in bad)


def test_text_files_reader(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("one document")
    (tmp_path / "two.txt").write_bytes(b"latin-1 \xe9t\xe9")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "skip.md").write_text("not matched")
    docs, bad = items(SourceSpec(name="books", kind="text_files", path=tmp_path, glob="**/*.txt"))
    assert [(d.uri, d.text) for d in docs] == [("a/one.txt", "one document")]
    assert sorted((q.uri, q.reason) for q in bad) == [("empty.txt", "empty_text"), ("two.txt", "invalid_utf8")]


def test_text_files_symlink_escaping_root_is_quarantined(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("secret elsewhere")
    root = tmp_path / "root"
    root.mkdir()
    (root / "link.txt").symlink_to(outside)
    docs, bad = items(SourceSpec(name="books", kind="text_files", path=root))
    assert docs == [] and [q.reason for q in bad] == ["path_escapes_root"]


def test_parquet_reader(tmp_path: Path) -> None:
    path = tmp_path / "web.parquet"
    pq.write_table(pa.table({"text": ["good one", None, "", "good two"], "n": [1, 2, 3, 4]}), path)
    docs, bad = items(SourceSpec(name="web", kind="parquet", path=path, text_column="text"))
    assert [(d.position, d.text) for d in docs] == [(0, "good one"), (3, "good two")]
    assert [(q.position, q.reason) for q in bad] == [(1, "null_text"), (2, "empty_text")]


def test_parquet_reader_wrong_column_and_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "web.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(SourceError, match="has no column 'text'"):
        list(read_source(SourceSpec(name="web", kind="parquet", path=path)))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"definitely not parquet")
    with pytest.raises(SourceError, match="not a readable Parquet file"):
        list(read_source(SourceSpec(name="web", kind="parquet", path=junk)))


def test_embedded_sources_are_deterministic() -> None:
    for kind in ("pydoc_topics", "installed_licenses"):
        first = list(read_source(SourceSpec(name="x", kind=kind)))
        assert first == list(read_source(SourceSpec(name="x", kind=kind)))
        assert sum(isinstance(i, RawRecord) for i in first) > 10
    topics = [i for i in read_source(SourceSpec(name="x", kind="pydoc_topics")) if isinstance(i, RawRecord)]
    assert topics[0].uri.startswith("pydoc_data/topics.py#")
    assert [t.position for t in topics] == list(range(len(topics)))


def test_a_source_without_documents_says_why_before_anything_is_written(tmp_path: Path) -> None:
    from corpus.lake import Lake
    from corpus.stages.raw import build_raw_documents

    (tmp_path / "notes.md").write_text("not a .txt file")
    spec = SourceSpec(name="books", kind="text_files", path=tmp_path, glob="**/*.txt")
    with Lake(tmp_path / "lake").writer("raw_documents", "books") as writer:
        with pytest.raises(
            SourceError, match=r"source 'books' \(.*\) yielded no documents \(no file matches glob '\*\*/\*\.txt'\)"
        ):
            build_raw_documents(spec, writer)
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "broken\n')
    spec = SourceSpec(name="chat", kind="jsonl", path=tmp_path / "bad.jsonl")
    with Lake(tmp_path / "lake").writer("raw_documents", "chat") as writer:
        with pytest.raises(SourceError, match=r"yielded no documents \(malformed_json: 1\)"):
            build_raw_documents(spec, writer)
    (bad,) = items(spec)[1]
    assert bad.detail == "Unterminated string starting at: column 10"


def test_quarantine_rows_reconcile_with_the_dropped_counts(tmp_path: Path) -> None:
    """raw_documents names quarantine.parquet as its dropped_file: its reasons must match counts.dropped."""
    from corpus.lake import Lake
    from corpus.reconcile import reconcile
    from corpus.stages.raw import QUARANTINE_SCHEMA, build_raw_documents

    lines = [json.dumps({"text": "good"}), '{"text": broken', json.dumps({"text": 1}), '{"x": 2}']
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    spec = SourceSpec(name="chat", kind="jsonl", path=tmp_path / "chat.jsonl")
    with Lake(tmp_path / "lake").writer("raw_documents", "chat") as writer:
        version = build_raw_documents(spec, writer).version
    assert version.extra["dropped_file"] == "quarantine.parquet" and reconcile(version) == []
    pq.write_table(pa.Table.from_pylist([], schema=QUARANTINE_SCHEMA), version.path / "quarantine.parquet")
    (problem,) = reconcile(version)
    assert problem.endswith(
        "quarantine.parquet rows per reason differ from dropped: malformed_json 0 (manifest 1), "
        "missing_text_field 0 (manifest 1), text_not_string 0 (manifest 1)"
    )
