"""Readers: turn one source of the manifest into documents, or quarantine entries with a reason.

Each reader yields, in a deterministic order, `RawRecord`s (one document each) and `Quarantined`
entries for records that cannot be read: invalid UTF-8, a malformed JSON line, a missing or non-string
text field, NUL bytes, empty text. A bad record never stops the source; a source that yields no
document at all is an error (`SourceError`), caught before downstream work is wasted.

Positions: `position` is the record's index inside its file (0 for whole-file documents, the 1-based
line number for JSON Lines, the row index for Parquet, the topic's index for pydoc topics);
`byte_offset`/`byte_length` address the record's raw bytes where the file is byte-addressable, so an
auditor can re-read exactly what was ingested.
"""

from __future__ import annotations

import hashlib
import json
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pyarrow.parquet as pq

from corpus.config import SourceSpec

LICENSE_NAME = re.compile(r"^(licen[cs]e|copying|notice|copyright)([._-].*)?$", re.IGNORECASE)
PARQUET_BATCH_ROWS = 4096


class SourceError(ValueError):
    """A source cannot be read at all (missing file, wrong column, no documents)."""


@dataclass(frozen=True)
class RawRecord:
    uri: str
    position: int
    byte_offset: int | None
    byte_length: int | None
    raw_sha256: str
    text: str


@dataclass(frozen=True)
class Quarantined:
    uri: str
    position: int
    byte_offset: int | None
    raw_sha256: str
    reason: str
    detail: str


Item = RawRecord | Quarantined


def _check_text(text: str) -> tuple[str, str] | None:
    """A reason code and detail when a decoded text is unusable as a document."""
    if "\x00" in text:
        return "nul_bytes", f"NUL byte at character {text.index(chr(0))}"
    if not text.strip():
        return "empty_text", "no non-whitespace characters"
    return None


def _decode(data: bytes) -> tuple[str | None, str]:
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError as exc:
        return None, f"invalid UTF-8 at byte {exc.start}: {data[exc.start : exc.start + 8]!r}"


def _whole_file(path: Path, uri: str) -> Item:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return Quarantined(uri, 0, 0, "", "unreadable_file", f"{type(exc).__name__}: {exc.strerror or exc}")
    digest = hashlib.sha256(data).hexdigest()
    text, detail = _decode(data)
    if text is None:
        return Quarantined(uri, 0, 0, digest, "invalid_utf8", detail)
    bad = _check_text(text)
    if bad:
        return Quarantined(uri, 0, 0, digest, *bad)
    return RawRecord(uri, 0, 0, len(data), digest, text)


def _files_under(root: Path, pattern: str) -> Iterator[tuple[Path, str]]:
    for path in sorted(root.glob(pattern)):
        if path.is_file():
            yield path, path.relative_to(root).as_posix()


def read_text_files(spec: SourceSpec) -> Iterator[Item]:
    assert spec.path is not None, f"source {spec.name}: text_files needs a path"
    root = spec.path
    for path, uri in _files_under(root, spec.glob):
        if not path.resolve().is_relative_to(root.resolve()):
            yield Quarantined(uri, 0, None, "", "path_escapes_root", f"{path} resolves outside {root}")
            continue
        yield _whole_file(path, uri)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_files() -> list[tuple[Path, str]]:
    """(path, uri) of the standard library's .py files, sorted, without installed packages and caches."""
    root = stdlib_root()
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if not STDLIB_SKIP.intersection(rel.parts) and path.is_file():
            found.append((path, rel.as_posix()))
    return found


def read_python_stdlib(spec: SourceSpec) -> Iterator[Item]:
    for path, uri in stdlib_files():
        yield _whole_file(path, uri)


def read_pydoc_topics(spec: SourceSpec) -> Iterator[Item]:
    import pydoc_data.topics as topics_module

    source_file = Path(topics_module.__file__ or "")
    digest = hashlib.sha256(source_file.read_bytes()).hexdigest() if source_file.is_file() else ""
    for index, key in enumerate(sorted(topics_module.topics)):
        uri = f"pydoc_data/topics.py#{key}"
        text = topics_module.topics[key]
        bad = _check_text(text) if isinstance(text, str) else ("text_not_string", type(text).__name__)
        if bad:
            yield Quarantined(uri, index, None, digest, *bad)
        else:
            yield RawRecord(uri, index, None, None, digest, text)


def license_files() -> list[tuple[str, Path]]:
    """(uri, path) of the license files of every installed distribution, sorted, without repeats."""
    found: dict[str, Path] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or "unknown"
        version = dist.version or "0"
        for file in dist.files or []:
            parts = Path(str(file)).parts
            in_license_dir = any(p.lower() in ("licenses", "licences", "license_files") for p in parts[:-1])
            if not (LICENSE_NAME.match(parts[-1]) or in_license_dir):
                continue
            path = Path(str(dist.locate_file(file)))
            if path.suffix in (".py", ".pyc", ".so") or not path.is_file():
                continue
            uri = f"{name}=={version}/{Path(*parts).as_posix()}"
            found.setdefault(uri, path)
    return sorted(found.items())


def read_installed_licenses(spec: SourceSpec) -> Iterator[Item]:
    for uri, path in license_files():
        yield _whole_file(path, uri)


def read_jsonl(spec: SourceSpec) -> Iterator[Item]:
    assert spec.path is not None, f"source {spec.name}: jsonl needs a path"
    path, field = spec.path, spec.text_field
    uri = path.name
    file_digest = _file_sha256(path)
    offset = 0
    with open(path, "rb") as handle:
        for line_no, line in enumerate(handle, start=1):
            start, offset = offset, offset + len(line)
            body = line.rstrip(b"\r\n")
            if not body.strip():
                continue  # blank lines separate nothing and carry no record
            text, detail = _decode(body)
            if text is None:
                yield Quarantined(uri, line_no, start, file_digest, "invalid_utf8", detail)
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield Quarantined(uri, line_no, start, file_digest, "malformed_json", f"{exc.msg}: column {exc.colno}")
                continue
            if not isinstance(obj, dict):
                yield Quarantined(uri, line_no, start, file_digest, "not_an_object", f"JSON {type(obj).__name__}")
                continue
            if field not in obj:
                yield Quarantined(uri, line_no, start, file_digest, "missing_text_field", f"no field {field!r}")
                continue
            value = obj[field]
            if not isinstance(value, str):
                yield Quarantined(
                    uri, line_no, start, file_digest, "text_not_string", f"{field!r} is {type(value).__name__}"
                )
                continue
            bad = _check_text(value)
            if bad:
                yield Quarantined(uri, line_no, start, file_digest, *bad)
                continue
            yield RawRecord(uri, line_no, start, len(line), file_digest, value)


def read_parquet(spec: SourceSpec) -> Iterator[Item]:
    assert spec.path is not None, f"source {spec.name}: parquet needs a path"
    path, column = spec.path, spec.text_column
    uri = path.name
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several error types for a non-Parquet file
        raise SourceError(f"source {spec.name!r}: {path} is not a readable Parquet file: {exc}") from exc
    names = parquet.schema_arrow.names
    if column not in names:
        raise SourceError(f"source {spec.name!r}: {path} has no column {column!r} (columns: {names})")
    file_digest = _file_sha256(path)
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[column]):
        for value in batch.column(0).to_pylist():
            if isinstance(value, bytes):
                value, detail = _decode(value)
                if value is None:
                    yield Quarantined(uri, row, None, file_digest, "invalid_utf8", detail)
                    row += 1
                    continue
            if value is None:
                yield Quarantined(uri, row, None, file_digest, "null_text", f"{column!r} is null")
            elif not isinstance(value, str):
                yield Quarantined(
                    uri, row, None, file_digest, "text_not_string", f"{column!r} is {type(value).__name__}"
                )
            elif bad := _check_text(value):
                yield Quarantined(uri, row, None, file_digest, *bad)
            else:
                yield RawRecord(uri, row, None, None, file_digest, value)
            row += 1


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


READERS = {
    "python_stdlib": read_python_stdlib,
    "pydoc_topics": read_pydoc_topics,
    "installed_licenses": read_installed_licenses,
    "text_files": read_text_files,
    "jsonl": read_jsonl,
    "parquet": read_parquet,
}


def source_files(spec: SourceSpec) -> list[Path]:
    """The files the source's reader reads, sorted: what input fingerprints and the refresh sensor watch."""
    if spec.kind in ("jsonl", "parquet"):
        assert spec.path is not None, f"source {spec.name}: {spec.kind} needs a path"
        return [spec.path]
    if spec.kind == "text_files":
        assert spec.path is not None, f"source {spec.name}: text_files needs a path"
        return [path for path, _ in _files_under(spec.path, spec.glob)]
    if spec.kind == "python_stdlib":
        return [path for path, _ in stdlib_files()]
    if spec.kind == "pydoc_topics":
        import pydoc_data.topics

        return [Path(pydoc_data.topics.__file__ or "")]
    if spec.kind == "installed_licenses":
        return [path for _, path in license_files()]
    raise AssertionError(f"source {spec.name}: no file listing for kind {spec.kind!r}")


def read_source(spec: SourceSpec) -> Iterator[Item]:
    """Every record of a source, in a deterministic order."""
    return READERS[spec.kind](spec)
