"""The whole asset graph on a tiny real corpus, through `corpus run` (Dagster), twice, into two lakes."""

import json
import os
import pydoc_data.topics
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus.audit import verify
from corpus.lake import read_version
from corpus.loader import open_window_shards
from corpus.release import latest_release, lineage
from corpus.report import build_report, format_report, iter_decoded_stream
from corpus.stages.training import open_packed_split
from orchestration import cli
from orchestration.definitions import build_definitions

PROSE = (
    "The committee met on Tuesday to review the budget for the coming year. Members agreed that the "
    "library needs new shelves, and that the reading room should stay open later in the evening so that "
    "students who work during the day can use it. The treasurer noted that the costs of heating have "
    "risen, and asked that the members think about ways to save energy in the older part of the building."
)


def tiny_manifest(root: Path) -> Path:
    books = root / "books"
    books.mkdir(parents=True)
    topics = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    long_topics = [t for t in topics if len(t) > 3000][:6]
    for i, text in enumerate(long_topics):
        (books / f"book{i}.txt").write_text(text)
    (books / "copy.txt").write_text(long_topics[0])  # an exact duplicate, also of a `docs` document
    (books / "bad.txt").write_bytes(b"caf\xe9 latin-1 is not UTF-8")
    lines = [json.dumps({"text": f"Note {i}: " + PROSE}) for i in range(4)] + ['{"text": broken']
    (root / "chat.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(
        pa.table({"text": [f"Page {i}. " + PROSE[::-1] if i == 0 else f"Page {i}. " + PROSE for i in range(3)]}),
        root / "web.parquet",
    )
    manifest = root / "sources.yaml"
    manifest.write_text(
        """
pipeline:
  max_length: 32
  stride: 32
  validation_fraction: 0.05
  windows_per_shard: 256
  packed_rows_per_shard: 96
  training: {steps: 12, batch_size: 4, d_model: 32, n_layers: 1, n_heads: 2, learning_rate: 0.01, min_loss_drop: 0.02}
sources:
  - {name: docs, kind: pydoc_topics, profile: prose}
  - {name: books, kind: text_files, path: books, profile: prose}
  - {name: chat, kind: jsonl, path: chat.jsonl, profile: prose}
  - {name: web, kind: parquet, path: web.parquet, profile: prose}
"""
    )
    return manifest


@pytest.fixture(scope="module")
def lakes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("corpus")
    manifest = tiny_manifest(root)
    run_variables = ("DAGSTER_HOME", "CORPUS_SOURCES", "CORPUS_LAKE")
    before = {name: os.environ.get(name) for name in run_variables}
    for name in ("a", "b"):
        assert cli.main(["run", "--sources", str(manifest), "--lake", str(root / name)]) == 0
    assert {name: os.environ.get(name) for name in run_variables} == before  # the run put them back
    return manifest, root / "a", root / "b"


def test_definitions_load(lakes: tuple[Path, Path, Path]) -> None:
    manifest, lake, _ = lakes
    defs = build_definitions(manifest, lake)
    dg.Definitions.validate_loadable(defs)
    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys == {
        "raw_documents",
        "heuristic_documents",
        "reference_model",
        "filtered_documents",
        "minhash_signatures",
        "duplicate_clusters",
        "deduplicated_documents",
        "tokenized_documents",
        "repeated_spans",
        "mixture_plan",
        "mixed_tokens",
        "training_windows",
        "packed_sequences",
        "dataset_release",
        "smoke_training",
        "poisoning_scan",
    }


def test_same_inputs_give_byte_identical_versions(lakes: tuple[Path, Path, Path]) -> None:
    _, a, b = lakes
    release_a, release_b = latest_release(a), latest_release(b)
    assert release_a.version == release_b.version
    for va in lineage(__import__("corpus.lake").lake.Lake(a), [release_a]):
        vb = read_version(b / va.asset / va.partition / va.version / "manifest.json")
        assert va.manifest == vb.manifest
        for name in va.files:
            assert (va.path / name).read_bytes() == (vb.path / name).read_bytes()


def test_report_counts_reconcile(lakes: tuple[Path, Path, Path]) -> None:
    _, lake, _ = lakes
    report = build_report(lake)
    stages = report["stages"]
    raw = stages["raw_documents"]
    assert raw["dropped"] == {"invalid_utf8": 1, "malformed_json": 1}
    for name in (
        "raw_documents",
        "heuristic_documents",
        "filtered_documents",
        "duplicate_clusters",
        "deduplicated_documents",
    ):
        assert stages[name]["in"] == stages[name]["out"] + sum(stages[name].get("dropped", {}).values())
    assert stages["heuristic_documents"]["in"] == raw["out"]
    assert stages["filtered_documents"]["in"] == stages["heuristic_documents"]["out"]
    assert stages["deduplicated_documents"]["in"] == stages["filtered_documents"]["out"]
    assert stages["deduplicated_documents"]["out"] == stages["duplicate_clusters"]["out"]
    assert report["duplicates"]["removed"].get("exact_duplicate", 0) >= 1
    shares = [m["realized_share"] for m in report["mixture"]]
    assert abs(sum(shares) - 1.0) < 1e-9
    assert {m["source"] for m in report["mixture"]} == {"docs", "books", "chat", "web"}
    assert report["shards"] and all(len(s["sha256"]) == 64 for s in report["shards"])
    training = report["training"]
    assert training is not None and training["device_type"] in ("cpu", "cuda")
    assert training["last_loss"] < training["first_loss"]


def test_cli_report_json_and_cat(lakes: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, lake, _ = lakes
    assert cli.main(["report", "--lake", str(lake), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("stages", "mixture", "duplicates", "shards", "version"):
        assert key in report
    for row in report["mixture"]:
        assert set(row) >= {"source", "tokens", "natural_share", "target_share", "realized_share", "epochs"}
    text = "".join(iter_decoded_stream(lake, "train"))
    assert "committee met on" in text and "<|endoftext|>" in text


def test_windows_union_equals_stream_windows(lakes: tuple[Path, Path, Path]) -> None:
    _, lake, _ = lakes
    report = build_report(lake)
    windows_manifest = Path(report["windows"]["manifest"])
    dataset = open_window_shards(windows_manifest, "train")
    mixed = next(
        v
        for v in lineage(__import__("corpus.lake").lake.Lake(lake), [latest_release(lake)])
        if v.asset == "mixed_tokens"
    )
    stream = np.fromfile(mixed.file("train.bin"), dtype="<u2").astype(np.int64)
    starts = range(0, len(stream) - 32, 32)
    assert len(dataset) == len(starts)
    for i in (0, 1, len(starts) // 2, len(starts) - 1):
        x, y = dataset[i]
        assert x.tolist() == stream[starts[i] : starts[i] + 32].tolist()
        assert y.tolist() == stream[starts[i] + 1 : starts[i] + 33].tolist()


def test_packed_shards_record_efficiency_and_load_as_one_split(lakes: tuple[Path, Path, Path]) -> None:
    """Shards of packed_rows_per_shard rows: each states its efficiency, together they are the split's rows."""
    _, lake, _ = lakes
    report = build_report(lake)
    packed = read_version(report["packing"]["manifest"])
    length = packed.extra["max_length"]
    train = report["packing"]["splits"]["train"]
    shards = train["shards"]
    assert len(shards) >= 3 and all(s["rows"] <= 96 for s in shards) and shards[-1]["rows"] <= 96
    assert [s["first_row"] for s in shards] == list(np.cumsum([0] + [s["rows"] for s in shards[:-1]]))
    assert (
        sum(s["rows"] for s in shards) == train["rows"]
        and sum(s["real_tokens"] for s in shards) == train["real_tokens"]
    )
    for s in shards:
        assert s["efficiency"] == s["real_tokens"] / (s["rows"] * length)
    assert train["efficiency"] == train["real_tokens"] / (train["rows"] * length)
    dataset = open_packed_split(packed, "train")
    assert len(dataset) == train["rows"] and len(dataset.shards) == len(shards)
    batch = dataset.__getitems__([0, train["rows"] - 1])
    assert int((batch["segment_ids"] >= 0).sum()) <= 2 * length
    text = format_report(report)
    assert f"train/{len(shards) - 1:05d}  rows {shards[-1]['first_row']:,}.." in text


def test_verify_passes_then_catches_tampering(lakes: tuple[Path, Path, Path]) -> None:
    _, _, lake = lakes
    assert verify(lake).ok
    report = build_report(lake)
    shard = Path(report["windows"]["manifest"]).parent / report["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = verify(lake)
    assert not result.ok
    assert any(str(shard) in p and report["shards"][0]["sha256"] in p for p in result.problems)
    with pytest.raises(Exception, match=str(shard.name)):
        open_window_shards(Path(report["windows"]["manifest"]), "train")
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert verify(lake).ok


def test_second_run_on_same_lake_fails_clearly_while_locked(lakes: tuple[Path, Path, Path]) -> None:
    _, lake, _ = lakes
    with (
        cli.run_lock(lake, wait=False),
        pytest.raises(cli.CliError, match="another `corpus run`"),
        cli.run_lock(lake, wait=False),
    ):
        pass
