"""The audit trail: tamper suite, trace round trip, trace document/file, streaming verify, diff, OpenLineage, Croissant.

One `corpus run` of the tiny corpus of test_pipeline (plus a few stdlib docstrings, so that every reader
kind reaches the training stream) builds the lake; tamper tests each work on a copy of it.
"""

import hashlib
import importlib
import itertools
import json
import os
import pydoc_data.topics
import random
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_pipeline import tiny_manifest
from test_signing import build_synthetic_lake

from corpus import audit
from corpus.audit import streaming_merkle_root, verify
from corpus.config import FilterConfig
from corpus.diff import diff_releases, resolve_release
from corpus.filters import QualityFilter
from corpus.lake import MANIFEST, Lake, Version, manifest_version, read_version
from corpus.layout import packed_shards
from corpus.lineage_export import croissant, emit_openlineage
from corpus.release import latest_release, lineage, merkle_root
from corpus.tokenizer import get_encoding
from orchestration import cli

EXTRA_BOOKS = ("argparse", "difflib", "heapq", "unittest")
EXTRA_WEB = ("csv", "subprocess", "sched")


def audit_manifest(root: Path) -> Path:
    """test_pipeline's tiny corpus, plus unique stdlib docstrings so books and web reach the stream."""
    manifest = tiny_manifest(root)
    for name in EXTRA_BOOKS:
        (root / "books" / f"extra_{name}.txt").write_text(importlib.import_module(name).__doc__)
    texts = pq.read_table(root / "web.parquet").column("text").to_pylist()
    texts += [importlib.import_module(name).__doc__ for name in EXTRA_WEB]
    pq.write_table(pa.table({"text": texts}), root / "web.parquet")
    manifest.write_text(manifest.read_text().replace("steps: 12,", "steps: 6, scan_samples: 8,"))
    return manifest


def run(manifest: Path, lake: Path) -> None:
    assert cli.main(["run", "--sources", str(manifest), "--lake", str(lake)]) == 0


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("audit")
    path = root / "lake"
    run(audit_manifest(root / "src"), path)
    return path


@pytest.fixture()
def copy(lake: Path, tmp_path: Path) -> Path:
    """A private copy of the lake to tamper with (the Dagster home is not needed to verify)."""
    target = tmp_path / "lake"
    shutil.copytree(lake, target, ignore=shutil.ignore_patterns("dagster_home"))
    return target


def version_of(lake: Path, asset: str, partition: str = "_all") -> Version:
    return next(v for v in lineage(Lake(lake), [latest_release(lake)]) if (v.asset, v.partition) == (asset, partition))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- verify


def test_verify_passes_and_recomputes_the_merkle_root(lake: Path, capsys: pytest.CaptureFixture[str]) -> None:
    release = latest_release(lake)
    versions = lineage(Lake(lake), [release])
    result = verify(lake)
    assert result.ok, result.problems
    assert result.versions == len(versions)
    assert result.files == sum(len(v.manifest["files"]) for v in versions)
    assert result.merkle_root == release.extra["merkle_root"]
    assert result.release == release.version
    assert cli.main(["verify", "--lake", str(lake), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["problems"] == [] and out["merkle_root"] == release.extra["merkle_root"]


def test_verify_in_tiny_chunks_gives_the_same_answer(lake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk boundaries (file reads, packed rows, piece table) fall everywhere: nothing changes."""
    monkeypatch.setattr(audit, "SCAN_CHUNK", 4097)  # odd: token pairs straddle reads
    monkeypatch.setattr(audit, "PACKED_CHUNK_TOKENS", 64)
    monkeypatch.setattr(audit, "PACKED_CHUNK_PIECES", 5)
    result = verify(lake)
    assert result.ok, result.problems
    assert result.merkle_root == latest_release(lake).extra["merkle_root"]


@pytest.mark.parametrize("n", [*range(0, 18), 31, 32, 33, 64, 100])
def test_streaming_merkle_root_equals_the_release_tree(n: int) -> None:
    rng = random.Random(n)
    leaves = sorted(
        {(f"a{rng.randrange(10)}/p/{rng.randbytes(4).hex()}/f{i}", rng.randbytes(32).hex(), i) for i in range(n)}
    )
    assert streaming_merkle_root(iter(leaves)) == merkle_root(leaves)


def test_tamper_flip_one_byte_in_a_shard(copy: Path) -> None:
    windows = version_of(copy, "training_windows")
    shard = windows.path / "train-00003.bin"
    expected = windows.files["train-00003.bin"]["sha256"]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    result = verify(copy)
    assert not result.ok
    hashes = [i for i in result.issues if i.kind == "sha256"]
    assert [(i.path, i.expected, i.actual) for i in hashes] == [(str(shard), expected, sha256(shard))]
    assert hashes[0].message == (
        f"sha256 mismatch: expected sha256 {expected} ({len(data)} bytes), actual sha256 {sha256(shard)} "
        f"({len(data)} bytes)"
    )
    # The index/data check sees it too: token 50 of the shard no longer matches the mixed stream.
    assert [i.message.split(" differs")[0] for i in result.issues if i.kind == "structure"] == ["token 50"]


def test_tamper_truncate_a_file(copy: Path) -> None:
    windows = version_of(copy, "training_windows")
    shard = windows.path / "train-00001.bin"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:-7])
    result = verify(copy)
    first = result.issues[0]
    assert (first.path, first.kind) == (str(shard), "sha256")
    assert first.message.startswith(
        f"size and sha256 mismatch: expected sha256 {windows.files['train-00001.bin']['sha256']}"
    )
    assert first.message.endswith(f"actual sha256 {sha256(shard)} ({size - 7} bytes); 7 bytes short (truncated)")
    assert f"{size - 7} bytes are not a whole number of uint16 tokens" in result.problems[1]
    assert f"{(size - 7) // 2} tokens, manifest says {size // 2}" in result.problems[2]


def test_tamper_delete_a_file(copy: Path) -> None:
    packed = version_of(copy, "packed_sequences")
    victim = packed.path / "train" / "00001" / "piece_doc.npy"
    expected = packed.files["train/00001/piece_doc.npy"]
    victim.unlink()
    result = verify(copy)
    assert result.problems == [
        f"{victim}: missing: expected sha256 {expected['sha256']} ({expected['bytes']} bytes), actual: no such file"
    ]


def test_tamper_edit_a_count_in_a_manifest(copy: Path) -> None:
    version = version_of(copy, "deduplicated_documents", "docs")
    manifest = json.loads(version.manifest_path.read_text())
    manifest["counts"]["out"] += 1
    version.manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    result = verify(copy)
    actual = manifest_version(manifest)
    where = f"deduplicated_documents[docs] {version.version[:12]}"
    lines = [p for p in result.problems if str(version.manifest_path) in p]
    assert lines[0] == (
        f"{version.manifest_path}: manifest content hashes to {actual}, but claims version {version.version}: "
        "edited after it was written"
    )
    assert f"{version.manifest_path}: {where}: in {manifest['counts']['in']} != out {manifest['counts']['out']}" in (
        " ".join(lines)
    )
    assert any("documents.parquet has" in line and "manifest says out" in line for line in lines)
    assert any(
        "tokenized_documents[docs]" in p and "!= out of upstream deduplicated_documents[docs]" in p
        for p in result.problems
    )


def test_tamper_swap_two_shards(copy: Path) -> None:
    windows = version_of(copy, "training_windows")
    a, b = windows.path / "train-00001.bin", windows.path / "train-00002.bin"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    result = verify(copy)
    hashes = [i for i in result.issues if i.kind == "sha256"]
    assert [i.path for i in hashes] == [str(a), str(b)]
    assert hashes[0].message.endswith("its bytes are those of train-00002.bin (files swapped or copied)")
    assert hashes[1].message.endswith("its bytes are those of train-00001.bin (files swapped or copied)")
    assert (hashes[0].expected, hashes[0].actual) == (sha256(b), sha256(a))


def test_tamper_replace_a_manifest_with_one_from_another_run(copy: Path) -> None:
    version = version_of(copy, "filtered_documents", "web")
    # Another run with another config writes a self-consistent manifest of another version of the asset.
    other = {k: v for k, v in version.manifest.items() if k != "version"}
    other["config"] = {**other["config"], "note": "another run"}
    other["version"] = manifest_version(other)
    version.manifest_path.write_text(json.dumps(other, indent=1, sort_keys=True))
    result = verify(copy)
    replaced = [i for i in result.issues if i.path == str(version.manifest_path)]
    assert [(i.kind, i.expected, i.actual) for i in replaced] == [("manifest", version.version, other["version"])]
    assert replaced[0].message.startswith(
        f"holds the manifest of filtered_documents[web] version {other['version']}, expected version "
        f"{version.version}: replaced by a manifest from another version or run (cited by "
    )


def test_tamper_unlisted_file_missing_version_and_broken_pointer(copy: Path) -> None:
    windows = version_of(copy, "training_windows")
    (windows.path / "extra.bin").write_bytes(b"\0\0")
    tokenized = version_of(copy, "tokenized_documents", "chat")
    shutil.rmtree(tokenized.path)
    result = verify(copy)
    assert f"{windows.path / 'extra.bin'}: file not listed in the manifest" in result.problems
    missing = [i for i in result.issues if i.kind == "missing" and i.path == str(tokenized.manifest_path)]
    assert len(missing) == 1
    assert missing[0].message.startswith(f"missing: tokenized_documents[chat] version {tokenized.version} not found")
    (copy / "releases" / "LATEST").unlink()
    result = verify(copy)
    assert not result.ok and len(result.problems) == 1 and "no release in" in result.problems[0]


def test_latest_moved_back_behind_the_history_is_reported(copy: Path) -> None:
    release = latest_release(copy)
    history = copy / "releases" / "history.jsonl"
    newer = {"version": "f" * 64, "manifest": "dataset_release/_all/" + "f" * 64 + "/manifest.json"}
    history.write_text(history.read_text() + json.dumps(newer) + "\n")  # as if LATEST was set back after it
    result = verify(copy)
    (issue,) = result.issues
    assert issue.path == str(copy / "releases" / "LATEST") and (issue.expected, issue.actual) == (
        "f" * 64,
        release.version,
    )
    assert f"names release {release.version[:12]}, but the newest in history.jsonl is ffffffffffff" in issue.message


def test_tamper_release_document_and_manifest(copy: Path) -> None:
    release = latest_release(copy)
    document = json.loads(release.file("release.json").read_text())
    claimed = document["merkle_root"]
    document["merkle_root"] = "0" * 64
    release.file("release.json").write_text(json.dumps(document, indent=1, sort_keys=True))
    manifest = json.loads(release.manifest_path.read_text())
    manifest["counts"]["files"] += 1
    release.manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    result = verify(copy)  # walks from the pointer although the release manifest fails its own hash
    paths_kinds = [(i.path, i.kind) for i in result.issues]
    assert (str(release.manifest_path), "manifest") in paths_kinds
    assert (str(release.path / "release.json"), "sha256") in paths_kinds
    merkle = [i for i in result.issues if i.kind == "merkle"]
    assert [(i.expected, i.actual) for i in merkle] == [(claimed, "0" * 64)]
    assert result.versions == len(lineage(Lake(copy), [release.upstream[0], release.upstream[1]])) + 1


def test_tamper_packed_piece_table_is_caught_by_the_index_check(copy: Path) -> None:
    packed = version_of(copy, "packed_sequences")
    path = packed.path / "train" / "00001" / "piece_doc_offset.npy"
    array = np.load(path)
    array[5] += 1  # a piece now claims to start one token later in its document
    np.save(path, array)
    result = verify(copy)
    kinds = {(i.path, i.kind) for i in result.issues}
    assert (str(path), "sha256") in kinds
    assert any(
        i.path == str(packed.path / "train" / "00001" / "tokens.npy") and i.kind == "structure" for i in result.issues
    ) or any(i.path == str(path) and i.kind == "structure" for i in result.issues)


@pytest.mark.parametrize("edit", ["no shards", "duplicate", "dropped", "no dir"])
def test_tamper_packed_shard_table_in_the_manifest(copy: Path, edit: str) -> None:
    """A manifest edited to hide, repeat or drop packed shards is caught beside the manifest hash, never a crash."""
    packed = version_of(copy, "packed_sequences")
    manifest = json.loads(packed.manifest_path.read_text())
    train = manifest["extra"]["splits"]["train"]
    shards = train["shards"]
    if edit == "no shards":
        train["shards"] = []
        expected = f"train has {train['rows']} rows but lists no shards"
    elif edit == "duplicate":
        shards[1]["dir"] = shards[0]["dir"]
        expected = "train lists shard train/00000 more than once"
    elif edit == "dropped":
        last = shards.pop()
        for key in ("rows", "pieces", "real_tokens"):
            train[key] -= last[key]
        expected = "in the manifest's files but in no train shard (10 such files)"
    else:
        del shards[0]["dir"]
        expected = "train shard 0 has no dir"
    packed.manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    result = verify(copy)
    assert any("edited after it was written" in p for p in result.problems)
    assert any(expected in p for p in result.problems), result.problems
    if edit == "dropped":  # the documents whose pieces were in the dropped shard are no longer covered
        assert any("the packed pieces hold" in p for p in result.problems), result.problems


def test_cli_verify_exit_status_and_lines(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    windows = version_of(copy, "training_windows")
    (windows.path / "train-00000.bin").write_bytes(b"")
    assert cli.main(["verify", "--lake", str(copy)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{windows.path / 'train-00000.bin'}: size and sha256 mismatch")
    assert any(line.startswith("FAILED (") for line in out)


# ---------------------------------------------------------------- trace round trip


def _sample_tokens(traced: dict) -> list[int]:
    path = Path(traced["file"])
    if traced["kind"] == "window":
        lo, hi = traced["file_tokens"]
        return np.fromfile(path, dtype="<u2")[lo:hi].astype(int).tolist()
    row = np.load(path)[traced["file_row"]]
    real = traced["real_tokens"]
    assert (row[real:] == 50256).all()  # padding after the pieces
    return row[:real].astype(int).tolist()


def _reconstruct(traced: dict) -> list[int]:
    """Raw file bytes at the traced position -> recorded filter -> GPT-2 + EOT -> traced token offsets."""
    enc = get_encoding("gpt2")
    quality = QualityFilter("prose", FilterConfig(), languages=("en",))  # what the tiny manifest records
    out: list[int] = []
    for doc in traced["documents"]:
        raw = doc["raw"]
        path = Path(raw["path"])
        assert sha256(path) == raw["sha256"], f"raw file {path} changed"
        if raw["key"] is not None:
            text = pydoc_data.topics.topics[raw["key"]]
        elif path.suffix == ".jsonl":
            line = path.read_bytes()[raw["byte_offset"] : raw["byte_offset"] + raw["byte_length"]]
            text = json.loads(line)["text"]
        elif path.suffix == ".parquet":
            text = pq.read_table(path).column("text")[raw["position"]].as_py()
        else:
            assert (raw["byte_offset"], raw["byte_length"]) == (0, path.stat().st_size)
            text = path.read_bytes().decode("utf-8")
        decision = quality.apply(text)
        assert decision.kept and doc["filter"]["kept"] is True
        ids = [*enc.encode_ordinary(decision.text), enc.eot_token]
        lo, hi = doc["token_offsets"]
        out += ids[lo:hi]
    return out


def _samples(lake: Path) -> list[tuple[str, int]]:
    """Random windows and packed rows, plus for each source a window and a packed row holding its first document."""
    rng = random.Random(7)
    windows = version_of(lake, "training_windows")
    packed = version_of(lake, "packed_sequences")
    shards = windows.extra["shards"]
    samples = []
    for _ in range(12):
        shard = rng.choice(shards)
        samples.append((shard["path"], rng.randrange(shard["windows"])))
    for split in ("train", "validation"):
        rows = packed.extra["splits"][split]["rows"]
        samples += [(f"packed:{split}", rng.randrange(rows)) for _ in range(4)]
    index = pq.read_table(version_of(lake, "mixed_tokens").path / "stream_index.parquet").to_pylist()
    parts = packed_shards(packed, "train")
    assert len(parts) >= 3  # the tiny corpus spans several packed shards
    piece_doc = np.concatenate([np.load(packed.path / s["dir"] / "piece_doc.npy") for s in parts])
    piece_row = np.concatenate([np.load(packed.path / s["dir"] / "piece_row.npy") + s["first_row"] for s in parts])
    stride = windows.extra["stride"]
    train = [r for r in index if r["split"] == "train"]
    firsts = [
        next((k, r) for k, r in enumerate(train) if r["source"] == source)
        for source in ("docs", "books", "chat", "web")
    ]
    repeated = next((k, r) for k, r in enumerate(train) if r["epoch"] > 0)  # a document in its second epoch or later
    for k, first in [*firsts, repeated]:
        w = (first["stream_start"] + 3) // stride  # a window 3 tokens into the document: it spans two documents
        shard = next(
            s for s in shards if s["split"] == "train" and s["first_window"] <= w < s["first_window"] + s["windows"]
        )
        samples.append((shard["path"], w - shard["first_window"]))
        samples.append(("packed:train", int(piece_row[np.nonzero(piece_doc == k)[0][0]])))
    return samples


def test_trace_round_trip_from_raw_files(lake: Path) -> None:
    sources: set[str] = set()
    multi = epochs = 0
    for shard, index in _samples(lake):
        traced = audit.trace_sample(lake, shard, index)
        docs = traced["documents"]
        expected = _sample_tokens(traced)
        assert _reconstruct(traced) == expected, f"{shard} {index}"
        # The sample offsets tile the sample exactly.
        spans = [d["sample_offsets"] for d in docs]
        assert spans[0][0] == 0 and spans[-1][1] == len(expected)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        for d in docs:
            assert d["dedup"]["kept"] is True and d["raw"]["uri"] == d["uri"]
            assert {s["stage"] for s in d["stages"]} >= {"raw_documents", "filtered_documents", "tokenized_documents"}
        sources |= {d["source"] for d in docs}
        multi += len(docs) > 1
        epochs += any(d["epoch"] > 0 for d in docs)
    assert sources == {"docs", "books", "chat", "web"}
    assert multi >= 3 and epochs >= 1


def test_replay_sample_and_cli(lake: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for shard, index in (("train-00000.bin", 0), ("packed:validation", 0), ("validation-00000.bin", 1)):
        replay = audit.replay_sample(lake, shard, index)
        assert replay["equal"] and replay["replayed"] == replay["tokens"] and len(replay["tokens"]) > 0
    assert cli.main(["trace", "sample", "train-00000.bin", "2", "--lake", str(lake), "--replay"]) == 0
    assert json.loads(capsys.readouterr().out)["equal"] is True
    packed = version_of(lake, "packed_sequences")
    second = packed_shards(packed, "train")[1]
    assert cli.main(["trace", "sample", "train/00001/tokens.npy", "1", "--lake", str(lake)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "packed" and out["file"] == str(packed.path / "train" / "00001" / "tokens.npy")
    # Row 1 of the second shard file is row first_row + 1 of the split, traced the same either way.
    assert (out["index"], out["file_row"]) == (second["first_row"] + 1, 1)
    assert out == audit.trace_sample(lake, "packed:train", second["first_row"] + 1)
    assert (
        audit.sample_tokens(lake, out)
        == np.load(packed.path / "train" / "00001" / "tokens.npy")[1][: out["real_tokens"]].tolist()
    )
    assert cli.main(["trace", "sample", "train-00000.bin", "999999", "--lake", str(lake)]) == 1
    assert "out of range" in capsys.readouterr().err


def test_replay_names_a_raw_file_changed_since_ingestion(lake: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Appending to a JSONL source leaves the record's bytes, so its tokens replay equal, but the file is no
    longer the one the release ingested: replay says so and fails."""
    chat = version_of(lake, "raw_documents", "chat")
    doc_ids = pq.read_table(chat.path / "documents.parquet", columns=["doc_id"]).column(0).to_pylist()
    placed = next(p for d in doc_ids for p in audit.trace_document(lake, d)["placements"] if p["shards"])
    shard, index = placed["shards"][0]["shard"], placed["shards"][0]["windows"][0]
    docs = audit.trace_sample(lake, shard, index)["documents"]
    raw = Path(next(d for d in docs if d["source"] == "chat")["raw"]["path"])
    original = raw.read_bytes()
    try:
        raw.write_bytes(original + b'{"text": "appended later"}\n')
        replay = audit.replay_sample(lake, shard, index)
        assert replay["equal"] and not replay["ok"]
        assert [(c["source"], c["path"]) for c in replay["raw_changed"]] == [("chat", str(raw))]
        assert cli.main(["trace", "sample", shard, str(index), "--lake", str(lake), "--replay"]) == 1
        assert f"raw file {raw} changed since it was ingested" in capsys.readouterr().err
    finally:
        raw.write_bytes(original)
    assert audit.replay_sample(lake, shard, index)["ok"]


def test_trace_document_kept_and_dropped(lake: Path) -> None:
    traced = audit.trace_sample(lake, "train-00000.bin", 0)
    doc_id = traced["documents"][0]["doc_id"]
    fate = audit.trace_document(lake, doc_id)
    assert fate["fate"].startswith("trained on: ")
    assert all(s["kept"] for s in fate["stages"])
    # Every window and packed row it lists holds the document, and the window it came from is among them.
    hits = [
        (h["shard"], i)
        for p in fate["placements"]
        for h in p["shards"]
        for i in range(h["windows"][0], h["windows"][1] + 1)
    ]
    assert ("train-00000.bin", 0) in hits
    for shard, index in hits[:: max(1, len(hits) // 5)]:
        assert doc_id in {d["doc_id"] for d in audit.trace_sample(lake, shard, index)["documents"]}
    rows = [(r["shard"], r["row"]) for p in fate["placements"] for r in p["packed_rows"]]
    assert rows
    for shard, row in rows[:5]:
        assert doc_id in {d["doc_id"] for d in audit.trace_sample(lake, shard, row)["documents"]}
    # books/copy.txt is an exact duplicate (of book0.txt and of a docs topic): dropped by dedup, with its cluster.
    copy_id = audit.trace_file(lake, "copy.txt")["records"][0]["doc_id"]
    same_text = audit.trace_document(lake, copy_id)
    records = {(r["source"], r["uri"]): r for r in same_text["records"]}
    assert records[("books", "copy.txt")]["fate"] == "dropped by duplicate_clusters: exact_duplicate"
    assert records[("books", "copy.txt")]["dedup"]["cluster_id"] >= 0
    assert records[("books", "copy.txt")]["path"].endswith("/books/copy.txt")
    kept = [r for r in same_text["records"] if r["fate"] == "kept"]
    assert len(kept) == 1 and same_text["fate"].startswith("trained on")
    assert (same_text["raw"]["source"], same_text["raw"]["uri"]) == (kept[0]["source"], kept[0]["uri"])
    # trace file: the dropped copy was not trained on; the same text was, from the copy dedup kept.
    (copy,) = audit.trace_file(lake, "copy.txt")["records"]
    assert copy["fate"] == "dropped by duplicate_clusters: exact_duplicate" and copy["placements"] == []
    via = copy["trained_via"]
    assert (via["source"], via["uri"]) == (kept[0]["source"], kept[0]["uri"]) and via["placements"]
    assert copy["dedup"]["kept_source"] == kept[0]["source"]
    # A document the quality rules dropped: its reason, and no placement.
    con = duckdb.connect()
    path = version_of(lake, "filtered_documents", "web").path / "decisions.parquet"
    drop_id, reason = con.execute(f"SELECT doc_id, reason FROM '{path}' WHERE NOT kept LIMIT 1").fetchone()
    con.close()
    dropped = audit.trace_document(lake, drop_id)
    assert dropped["placements"] == [] and dropped["fate"].endswith(f": {reason}")
    assert dropped["fate"].startswith("dropped by ")


def test_trace_file_accounts_for_every_record(lake: Path) -> None:
    chat = audit.trace_file(lake, "chat.jsonl")
    assert [r["position"] for r in chat["records"]] == [1, 2, 3, 4]
    assert [(q["position"], q["reason"]) for q in chat["quarantined"]] == [(5, "malformed_json")]
    assert sum(chat["summary"].values()) == 5
    assert chat["summary"]["quarantined: malformed_json"] == 1
    trained = [r for r in chat["records"] if r["fate"] == "trained on"]
    deduped = [r for r in chat["records"] if r["fate"].startswith("dropped by duplicate_clusters")]
    assert len(trained) + len(deduped) == 4 and len(trained) >= 1
    bad = audit.trace_file(lake, "bad.txt")
    assert bad["records"] == [] and [q["reason"] for q in bad["quarantined"]] == ["invalid_utf8"]
    with pytest.raises(Exception, match="no record of release"):
        audit.trace_file(lake, "nowhere.txt")


def test_auditor_sql_examples_run(lake: Path) -> None:
    """The README's SQL for auditors runs as written against the lake and metrics.duckdb."""
    con = duckdb.connect(str(lake / "metrics.duckdb"), read_only=True)
    try:
        drops = con.execute(
            "SELECT asset, partition, reason, sum(documents) AS documents FROM drops GROUP BY ALL ORDER BY ALL"
        ).fetchall()
        assert ("raw_documents", "chat", "malformed_json", 1) in [tuple(r) for r in drops]
        latest = con.execute(
            "SELECT asset, partition, version FROM materializations QUALIFY row_number() OVER "
            "(PARTITION BY asset, partition ORDER BY materialized_at DESC) = 1 ORDER BY ALL"
        ).fetchall()
        assert ("dataset_release", "_all", latest_release(lake).version) in [tuple(r) for r in latest]
    finally:
        con.close()
    mixed = version_of(lake, "mixed_tokens")
    rows = duckdb.sql(
        f"SELECT source, count(*) AS placements, sum(length) AS tokens FROM '{mixed.path}/stream_index.parquet' "
        "WHERE split = 'train' GROUP BY source ORDER BY source"
    ).fetchall()
    assert sum(r[2] for r in rows) == mixed.counts["train_tokens"]


# ---------------------------------------------------------------- memory


def test_verify_of_10000_files_stays_under_200_mb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # building the lake, not verifying it, is what fsync slows
    lake = build_synthetic_lake(tmp_path / "lake", partitions=100, files=100, size=256, big_bytes=32 << 20)
    monkeypatch.undo()
    # The peak resident set of the child's own address space (VmHWM): ru_maxrss would carry over the peak of
    # this pytest process across fork + exec.
    code = (
        "import json, sys; from pathlib import Path; from corpus.audit import verify; "
        "r = verify(Path(sys.argv[1])); "
        "hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')); "
        "print(json.dumps({'ok': r.ok, 'files': r.files, 'versions': r.versions, 'maxrss_kb': hwm}))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(lake.root)], capture_output=True, text=True, check=True)
    out = json.loads(done.stdout)
    assert out["ok"] and out["versions"] == 102
    assert out["files"] == 100 * 100 + 2 + 1  # blobs, the bundle's two files, release.json
    assert out["maxrss_kb"] < 200 * 1024, out


# ---------------------------------------------------------------- diff, OpenLineage, Croissant


def test_diff_between_two_releases(lake: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    second = tmp_path / "lake"
    shutil.copytree(lake, second)
    src = tmp_path / "src"
    manifest = audit_manifest(src)
    (src / "books" / "extra_difflib.txt").unlink()
    with open(src / "chat.jsonl", "a") as handle:
        handle.write(json.dumps({"text": importlib.import_module("smtplib").__doc__}) + "\n")
    run(manifest, second)
    old, new = resolve_release("latest~1", second), resolve_release("latest", second)
    assert old.version == latest_release(lake).version and new.version != old.version
    out = diff_releases(old, new)
    books, chat = out["sources"]["books"], out["sources"]["chat"]
    assert (books["raw_documents"]["added"], books["raw_documents"]["removed"]) == (0, 1)
    assert (books["documents"]["added"], books["documents"]["removed"]) == (0, 1)
    assert (chat["raw_documents"]["added"], chat["raw_documents"]["removed"]) == (1, 0)
    assert (chat["documents"]["added"], chat["documents"]["removed"]) == (1, 0)
    for source in ("docs", "web"):
        assert out["sources"][source]["documents"]["added"] == out["sources"][source]["documents"]["removed"] == 0
    removed = books["documents"]["examples"]["removed"][0]
    assert removed["uri"] == "extra_difflib.txt"
    assert removed["doc_id"] == hashlib.sha256(importlib.import_module("difflib").__doc__.encode()).hexdigest()
    assert books["tokens"]["delta"] < 0 and chat["tokens"]["delta"] > 0
    assert abs(sum(s["share"]["delta"] for s in out["sources"].values())) < 1e-9
    changed = {(v["asset"], v["partition"]) for v in out["versions"] if v["status"] == "changed"}
    assert ("raw_documents", "books") in changed and ("raw_documents", "docs") not in changed
    assert cli.main(["diff", "latest~1", "latest", "--lake", str(second)]) == 0
    text = capsys.readouterr().out
    assert f"old release {old.version}" in text and "books" in text
    same = diff_releases(old, old)
    assert same["identical"] and all(v["status"] == "unchanged" for v in same["versions"])
    # The second run read its sources from another directory; no other setting changed.
    assert {c["setting"].rsplit(".", 1)[-1] for c in out["settings"]} == {"path"} and same["settings"] == []
    assert "settings changed:\n  config.source.path: " in text


def test_diff_names_the_settings_that_changed(tmp_path: Path) -> None:
    from corpus.diff import _setting_changes

    def version(temperature: float, code: str) -> Version:
        with Lake(tmp_path).writer("mixture_plan") as writer:
            writer.path("plan.json").write_text(str(temperature))
            return writer.commit(code_version=code, config={"pipeline": {"temperature": temperature, "seed": 1}})

    old, new = version(0.7, "mixture_plan/2"), version(0.5, "mixture_plan/3")
    changes = _setting_changes({("mixture_plan", "_all"): old}, {("mixture_plan", "_all"): new})
    assert changes == [
        {"setting": "code_version", "old": "mixture_plan/2", "new": "mixture_plan/3", "assets": ["mixture_plan[_all]"]},
        {"setting": "config.pipeline.temperature", "old": 0.7, "new": 0.5, "assets": ["mixture_plan[_all]"]},
    ]


def test_openlineage_events_for_every_materialization(lake: Path, tmp_path: Path) -> None:
    events = [json.loads(line) for line in (lake / "lineage" / "openlineage.jsonl").read_text().splitlines()]
    con = duckdb.connect(str(lake / "metrics.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT DISTINCT run_id, asset, partition, version FROM materializations").fetchall()
    finally:
        con.close()
    assert len(events) == len(rows)  # one `corpus run` into a fresh lake: every materialization, once
    by_output = {(e["outputs"][0]["name"], e["outputs"][0]["facets"]["version"]["datasetVersion"]): e for e in events}
    store = Lake(lake)
    for run_id, asset, partition, version_id in rows:
        event = by_output[(str(store.partition_dir(asset, partition)), version_id)]
        version = store.open(asset, partition, version_id)
        assert event["eventType"] == "COMPLETE"
        assert event["job"]["namespace"] == "corpus"
        assert event["run"]["facets"]["parent"]["run"]["runId"] == run_id
        inputs = {(i["name"], i["facets"]["version"]["datasetVersion"]) for i in event["inputs"]}
        assert inputs == {(str(store.partition_dir(r.asset, r.partition)), r.version) for r in version.upstream}
        stats = event["outputs"][0]["outputFacets"]["outputStatistics"]
        assert stats["fileCount"] == len(version.manifest["files"])
    # The export of the release lineage writes one event per version, with the same run ids as the run's.
    out, count = emit_openlineage(lake, out=tmp_path / "ol.jsonl")
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert count == len(exported) == len(lineage(store, [latest_release(lake)]))
    run_ids = {e["run"]["runId"] for e in events}
    assert {e["run"]["runId"] for e in exported} <= run_ids
    # Exporting again, or into the file the run appended to, repeats no event.
    assert emit_openlineage(lake, out=out) == (out, 0) and len(out.read_text().splitlines()) == count
    default = lake / "lineage" / "openlineage.jsonl"
    before = default.read_text().splitlines()
    assert emit_openlineage(lake)[1] == 0 and default.read_text().splitlines() == before
    # Lines that are no run event, or one cut short by a killed writer, are passed over, not fatal.
    foreign = json.dumps({"eventType": None, "dataset": {"namespace": "x", "name": "y"}})
    out.write_text(out.read_text() + foreign + "\n" + exported_line_cut(out))
    assert emit_openlineage(lake, out=out) == (out, 0)
    assert out.read_text().endswith("\n")
    out.write_text(foreign + "\n")
    assert emit_openlineage(lake, out=out) == (out, count)  # only the foreign line: every event again


def exported_line_cut(path: Path) -> str:
    return path.read_text().splitlines()[0][:40]  # no newline: a write interrupted


def test_croissant_lists_every_final_file_with_its_sha256(lake: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = croissant(lake)
    assert doc["conformsTo"] == "http://mlcommons.org/croissant/1.1"
    assert doc["identifier"] == latest_release(lake).version
    windows, packed = version_of(lake, "training_windows"), version_of(lake, "packed_sequences")
    files = {f["contentUrl"]: f for f in doc["distribution"] if f["@type"] == "cr:FileObject"}
    sets = {f["@id"]: f for f in doc["distribution"] if f["@type"] == "cr:FileSet"}
    # The record sets read FileSets whose globs match every shard's file of that array, in shard order.
    packed_root = packed.path.relative_to(lake).as_posix()
    for array in ("tokens", "segment_ids", "position_ids"):
        glob = f"{packed_root}/train/*/{array}.npy"
        assert sets[glob]["includes"] == glob
        matched = sorted(p.relative_to(lake).as_posix() for p in lake.glob(glob))
        assert matched == [f"{packed_root}/{s['dir']}/{array}.npy" for s in packed_shards(packed, "train")]
        assert len(matched) >= 3
    windows_glob = f"{windows.path.relative_to(lake).as_posix()}/train-*.bin"
    assert sets[windows_glob]["includes"] == windows_glob
    for version in (windows, packed):
        for name, entry in version.files.items():
            rel = (version.path / name).relative_to(lake).as_posix()
            assert files[rel]["sha256"] == entry["sha256"] == sha256(lake / rel)
            assert files[rel]["contentSize"] == f"{entry['bytes']} B"
    assert [r["@id"] for r in doc["recordSet"]] == [
        "documents",
        "windows",
        "packed_rows",
        "packed_segment_ids",
        "packed_position_ids",
    ]
    fields = {f["name"]: f for f in doc["recordSet"][1]["field"]}
    assert fields["input_ids"]["isArray"] is True and fields["input_ids"]["arrayShape"] == "32"
    columns = [f["source"]["extract"]["column"] for f in doc["recordSet"][0]["field"]]
    assert columns == pq.read_schema(version_of(lake, "mixed_tokens").path / "stream_index.parquet").names
    assert cli.main(["export", "croissant", "--lake", str(lake), "--out", str(lake.parent / "c.json")]) == 0
    assert json.loads((lake.parent / "c.json").read_text()) == doc
    capsys.readouterr()


def test_verify_a_single_manifest_and_a_manifest_outside_a_release(lake: Path) -> None:
    tokenized = version_of(lake, "tokenized_documents", "web")
    result = verify(lake, tokenized.manifest_path)
    assert result.ok and result.release is None and result.merkle_root is None
    assert result.versions == len(lineage(Lake(lake), [tokenized]))
    assert read_version(tokenized.path / MANIFEST).version == tokenized.version


def test_links_and_stray_directories_in_a_version_are_reported(copy: Path) -> None:
    windows = version_of(copy, "training_windows")
    (windows.path / "outside").symlink_to("/tmp")
    (windows.path / "empty").mkdir()
    shard = next(iter(windows.files))
    target = copy / "elsewhere.bin"
    (windows.path / shard).rename(target)
    (windows.path / shard).symlink_to(target)  # same bytes, through a link
    issues = {(i.path, i.message) for i in verify(copy).issues}
    assert (str(windows.path / "outside"), "a symbolic link to /tmp that no file of the manifest is in") in issues
    assert (str(windows.path / "empty"), "a directory that no file of the manifest is in") in issues
    assert (
        str(windows.path / shard),
        f"a symbolic link to {target}: a version holds its files, not links to them",
    ) in issues


def test_metrics_rows_that_disagree_with_the_lake_are_reported(copy: Path) -> None:
    """The figures `corpus report` and the README's SQL read are checked against the files they describe."""
    assert verify(copy).ok
    db = copy / "metrics.duckdb"
    with duckdb.connect(str(db)) as con:
        con.execute("UPDATE smoke_training SET last_loss = 1.0, device_name = 'NVIDIA H100'")
        con.execute("DELETE FROM quarantine WHERE source = 'chat'")
        con.execute("UPDATE duplicate_decisions SET kept = NOT kept WHERE row = 0")
        con.execute("UPDATE materializations SET code_version = 'x/9' WHERE asset = 'tokenized_documents'")
        con.execute("UPDATE drops SET documents = documents + 1 WHERE asset = 'raw_documents'")
    messages = [i.message for i in verify(copy).issues if i.path == str(db)]
    assert any(
        m.startswith("quarantine rows of raw_documents[chat] ")
        and m.endswith(
            "0 not in "
            + str(version_of(copy, "raw_documents", "chat").path / "quarantine.parquet")
            + ", 1 of its rows missing"
        )
        for m in messages
    ), messages
    assert any(m.startswith("duplicate_decisions rows of duplicate_clusters[_all] ") for m in messages)
    assert any("materializations of tokenized_documents[" in m and "code_version x/9" in m for m in messages)
    assert any(m.startswith("drops of raw_documents[") for m in messages)
    assert sum("differs from its result.json in device_name, last_loss" in m for m in messages) == 2
    with duckdb.connect(str(db)) as con:  # a NULL where counts belong is a finding, not a crash
        con.execute("UPDATE materializations SET counts = NULL WHERE asset = 'mixed_tokens'")
    messages = [i.message for i in verify(copy).issues if i.path == str(db)]
    assert any(
        m.startswith("materializations or drops of mixed_tokens[_all] ") and "unreadable row" in m for m in messages
    )


def test_metrics_locked_by_a_writer_are_left_unchecked_not_failed(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `corpus run` (or a duckdb shell) writing metrics.duckdb must not make verify fail; it says what it skipped."""
    import corpus.metrics

    db = copy / "metrics.duckdb"
    code = f"import duckdb, time; c = duckdb.connect({str(db)!r}); print('ready', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        monkeypatch.setattr(corpus.metrics, "LOCK_TIMEOUT_S", 0.5)
        result = verify(copy)
        assert result.ok and len(result.not_checked) == 1 and result.not_checked[0].startswith(f"{db}: cannot open")
    finally:
        holder.kill()
        holder.wait()
    assert verify(copy).not_checked == []
