from pathlib import Path

import pytest

from corpus.config import ManifestError, PipelineConfig, load_manifest

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sources.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_default_manifest_loads() -> None:
    manifest = load_manifest(REPO / "data" / "sources.yaml")
    assert manifest.source_names == ["code", "docs", "licenses"]
    assert manifest.pipeline.max_length == 256 and manifest.pipeline.stride == 256
    assert manifest.pipeline.temperature == 0.7
    assert [s.priority for s in manifest.sources] == [0, 1, 2]


def test_issue_form_with_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "some" / "dir").mkdir(parents=True)
    (tmp_path / "some" / "file.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "some" / "file.parquet").write_bytes(b"PAR1")
    path = write(
        tmp_path,
        """
pipeline: {encoding: gpt2, max_length: 128, stride: 64, temperature: 0.5, validation_fraction: 0.02, seed: 7}
sources:
  - {name: code, kind: python_stdlib, profile: code}
  - {name: docs, kind: pydoc_topics, profile: prose}
  - {name: licenses, kind: installed_licenses, profile: legal}
  - {name: books, kind: text_files, path: some/dir, glob: "**/*.txt", profile: prose}
  - {name: chat, kind: jsonl, path: some/file.jsonl, text_field: text, profile: prose}
  - {name: web, kind: parquet, path: some/file.parquet, text_column: text, profile: prose}
""",
    )
    manifest = load_manifest(path)
    assert manifest.pipeline == PipelineConfig(
        max_length=128, stride=64, temperature=0.5, validation_fraction=0.02, seed=7
    )
    assert manifest.source("books").path == (tmp_path / "some" / "dir").resolve()
    assert manifest.source("chat").path == (tmp_path / "some" / "file.jsonl").resolve()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("sources:\n  - {name: a, kind: ftp}\n", "unknown kind 'ftp'"),
        ("sources:\n  - {name: a, kind: jsonl, path: missing.jsonl}\n", "does not exist"),
        ("sources:\n  - {name: a, kind: jsonl}\n", "needs a 'path'"),
        (
            "sources:\n  - {name: a, kind: pydoc_topics}\n  - {name: a, kind: python_stdlib}\n",
            "duplicate source name 'a'",
        ),
        ("sources:\n  - {name: a, kind: text_files, path: ../..}\n", "escapes the manifest's directory"),
        ("sources:\n  - {name: a, kind: text_files, path: d, glob: '../*.txt'}\n", "stays inside"),
        ("sources:\n  - {name: 'bad name', kind: pydoc_topics}\n", "must match"),
        ("sources:\n  - {name: a, kind: pydoc_topics, colour: red}\n", "unknown key(s) ['colour']"),
        ("sources: []\n", "non-empty list"),
        (
            "pipeline: {temperature: 0}\nsources:\n  - {name: a, kind: pydoc_topics}\n",
            "temperature must be in (0, 1], got 0",
        ),
        ("pipeline: {temperature: 1.5}\nsources:\n  - {name: a, kind: pydoc_topics}\n", "got 1.5"),
        ("pipeline: {max_length: 0}\nsources:\n  - {name: a, kind: pydoc_topics}\n", "max_length must be >= 1, got 0"),
        ("pipeline: {stride: -2}\nsources:\n  - {name: a, kind: pydoc_topics}\n", "stride must be >= 1, got -2"),
        ("pipeline: {encoding: cl100k}\nsources:\n  - {name: a, kind: pydoc_topics}\n", "only 'gpt2'"),
        (
            "pipeline: {packed_rows_per_shard: 0}\nsources:\n  - {name: a, kind: pydoc_topics}\n",
            "packed_rows_per_shard must be >= 1, got 0",
        ),
        (
            "pipeline: {packed_rows_per_shard: many}\nsources:\n  - {name: a, kind: pydoc_topics}\n",
            "pipeline.packed_rows_per_shard must be an integer, got 'many'",
        ),
        (
            "pipeline: {windows_per_shard: true}\nsources:\n  - {name: a, kind: pydoc_topics}\n",
            "pipeline.windows_per_shard must be an integer, got True",
        ),
        (
            "pipeline: {max_length: 2.5}\nsources:\n  - {name: a, kind: pydoc_topics}\n",
            "pipeline.max_length must be an integer, got 2.5",
        ),
        (
            "pipeline: {token_budget: lots}\nsources:\n  - {name: a, kind: pydoc_topics}\n",
            "pipeline.token_budget must be an integer or null, got 'lots'",
        ),
        (
            "pipeline: {dedup: {threshold: high}}\nsources:\n  - {name: a, kind: pydoc_topics}\n",
            "pipeline.dedup.threshold must be a number, got 'high'",
        ),
        (
            "pipeline: {training: {require_gpu: 1}}\nsources:\n  - {name: a, kind: pydoc_topics}\n",
            "pipeline.training.require_gpu must be true or false, got 1",
        ),
        ("pipeline: {typo: 1}\nsources:\n  - {name: a, kind: pydoc_topics}\n", "unknown pipeline key(s) ['typo']"),
        ("pipeline: {dedup: {bands: 20, rows: 8}}\nsources:\n  - {name: a, kind: pydoc_topics}\n", "exceeds"),
        ("sources:\n  - {name: a, kind: pydoc_topics, max_share: 2}\n", "max_share must be in [0, 1]"),
        ("[1, 2]\n", "expected a mapping"),
        ("sources: [\n", "not valid UTF-8 YAML"),
    ],
)
def test_bad_manifest_is_a_clear_error(tmp_path: Path, body: str, message: str) -> None:
    (tmp_path / "d").mkdir()
    path = write(tmp_path, body)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope.yaml")
