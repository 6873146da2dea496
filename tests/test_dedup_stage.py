"""corpus.stages.dedup: exact confirmation, incremental runs through the stored index, ratios, span pass."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_dedup import license_texts, shakespeare_words

from corpus import dedup as dd
from corpus import minhash as mh
from corpus.config import DedupConfig, SourcesManifest, load_manifest
from corpus.lake import Lake, Version
from corpus.stages import dedup as st
from corpus.stages import spans as sp
from corpus.stages.io import DOCUMENT_SCHEMA, write_rows
from corpus.stages.tokenized import INDEX_SCHEMA

CFG = DedupConfig()
QUALITY_SCHEMA = DOCUMENT_SCHEMA.append(pa.field("quality", pa.float64()))


def _jaccard_sets(texts: list[str]) -> list[set[bytes]]:
    return [set(mh.shingles(t)) for t in texts]


def _true_pairs(sets: list[set[bytes]], threshold: float) -> set[tuple[int, int]]:
    truth = set()
    for i, j in itertools.combinations(range(len(sets)), 2):
        a, b = sets[i], sets[j]
        if not a or not b or min(len(a), len(b)) < threshold * max(len(a), len(b)):
            continue  # J <= |smaller| / |larger| < threshold
        inter = len(a & b)
        if inter / (len(a) + len(b) - inter) >= threshold:
            truth.add((i, j))
    return truth


def _exact(texts: list[str], cfg: DedupConfig = CFG, max_pairs: int | None = None) -> dd.ExactJaccard:
    sets = mh.MinHasher(cfg).shingle_sets(texts)
    return dd.ExactJaccard(lambda idx: [sets[i] for i in idx.tolist()], max_pairs)


# ---------------------------------------------------------------------------------------------------
# Exact confirmation


def test_exact_jaccard_equals_python_sets_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    words = shakespeare_words()
    rng = random.Random(3)
    texts = [" ".join(words[i : i + rng.randint(1, 600)]) for i in range(0, 30_000, 300)]  # neighbours overlap
    texts += [" ".join(words[i + 7 : i + 300]) for i in range(0, 30_000, 3000)]
    texts += ["", "one", "One!", "a b c d e", "a b c d e f"]
    sets = _jaccard_sets(texts)
    pairs = np.array(list(itertools.combinations(range(len(texts)), 2)), dtype=np.int64)
    expected = np.array(
        [len(sets[i] & sets[j]) / len(sets[i] | sets[j]) if sets[i] | sets[j] else 0.0 for i, j in pairs.tolist()]
    )
    monkeypatch.setattr(dd, "_EXACT_CHUNK", 1000)  # many chunks, some pairs bigger than a chunk
    monkeypatch.setattr(dd, "_EXACT_BLOCK", 700)  # many blocks, each loading its own documents' sets
    checker = _exact(texts)
    got = checker.jaccard(pairs)
    assert got.tolist() == expected.tolist()  # the same integers divided: bit-equal
    assert checker.pairs == len(pairs) and checker.loads >= len(texts)
    assert np.count_nonzero((expected > 0) & (expected < 1)) > 50
    assert got[pairs.tolist().index([len(texts) - 4, len(texts) - 3])] == 1.0  # "one" and "One!" normalize alike


def test_exact_jaccard_values_sharing_their_top_bits() -> None:
    """Values equal in their top 32 bits share a search key: all 64 bits decide, runs of any length."""
    rng = np.random.default_rng(5)
    high = rng.integers(0, 1 << 32, 40, dtype=np.uint64) << np.uint64(32)
    pool = np.unique(np.concatenate([h + rng.integers(0, 1 << 32, 6, dtype=np.uint64) for h in high]))
    sets = [np.unique(rng.choice(pool, size=int(rng.integers(0, 150)), replace=False)) for _ in range(30)]
    pairs = np.array(list(itertools.combinations(range(len(sets)), 2)), dtype=np.int64)
    checker = dd.ExactJaccard(lambda idx: [sets[i] for i in idx.tolist()])
    expected = []
    for i, j in pairs.tolist():
        a, b = set(sets[i].tolist()), set(sets[j].tolist())
        expected.append(len(a & b) / len(a | b) if a | b else 0.0)
    assert checker.jaccard(pairs).tolist() == expected
    assert len({v >> 32 for v in pool.tolist()}) == 40  # ~6 values per top-32-bit key


def test_exact_jaccard_budget_and_loader_errors() -> None:
    texts = [" ".join(shakespeare_words()[i : i + 50]) for i in range(0, 500, 25)]
    checker = _exact(texts, max_pairs=5)
    checker.jaccard(np.array([[0, 1], [1, 2], [2, 3]]))
    with pytest.raises(dd.ExactBudgetExceeded, match="6 pairs, over the limit of 5"):
        checker.jaccard(np.array([[0, 2], [1, 3], [3, 4]]))
    checker.jaccard(np.array([[0, 9]]), budgeted=False)  # similarity reporting is not budgeted
    bad = dd.ExactJaccard(lambda idx: [np.array([3, 2], dtype=np.uint64) for _ in idx])
    with pytest.raises(ValueError, match="shingle set of document 0 must be sorted unique uint64"):
        bad.jaccard(np.array([[0, 1]]))
    short = dd.ExactJaccard(lambda idx: [])
    with pytest.raises(ValueError, match="returned 0 sets for 2 documents"):
        short.jaccard(np.array([[4, 5]]))
    announced: list[list[int]] = []
    hinted = dd.ExactJaccard(lambda idx: [], prefetch=lambda idx: announced.append(idx.tolist()))
    hinted.prefetch(np.array([7, 3, 7]))
    assert announced == [[3, 7]]


def test_planted_pairs_exact_confirmation_is_the_threshold_on_candidates() -> None:
    """Planted pairs across the S-curve: detected exactly when an LSH candidate with J >= 0.8.

    tests/test_dedup.py checks the candidate rate against P(J); with the estimate, pairs slightly above
    0.8 were detected 30-90% of the time. Here detection is the threshold itself, pair by pair.
    """
    words = shakespeare_words()
    rng = random.Random(99)
    texts: list[str] = []
    for k in range(240):
        base = words[300 * k : 300 * k + 300]
        edited = list(base)
        for slot in rng.sample(range(48), [2, 4, 5, 6, 8, 10][k % 6]):
            edited[4 + 6 * slot] = f"zq{k}x{slot}"  # each edit replaces 5 distinct shingles
        texts += [" ".join(base), " ".join(edited)]
    n = len(texts)
    keys, sig = mh.MinHasher(CFG).keys_and_signatures(texts)
    sets = _jaccard_sets(texts)
    pairs = np.arange(n).reshape(-1, 2)
    jac = np.array([len(sets[i] & sets[j]) / len(sets[i] | sets[j]) for i, j in pairs.tolist()])
    eq = sig[pairs[:, 0]] == sig[pairs[:, 1]]
    candidate = eq.reshape(len(pairs), CFG.bands, CFG.rows).all(axis=2).any(axis=1)
    result = dd.find_duplicates(
        ["s"] * n, [f"{i:04d}" for i in range(n)], keys, sig, np.zeros(n), np.zeros(n, int), CFG, _exact(texts)
    )
    detected = (result.cluster_id[pairs[:, 0]] >= 0) & (
        result.cluster_id[pairs[:, 0]] == result.cluster_id[pairs[:, 1]]
    )
    assert detected.tolist() == (candidate & (jac >= CFG.threshold)).tolist()
    assert result.confirm == "exact"
    # Dropped members report their exact Jaccard to the kept one.
    dropped = np.flatnonzero(~result.kept)
    assert result.similarity[dropped].tolist() == jac[dropped // 2].tolist()
    above = jac >= CFG.threshold
    assert 60 < above.sum() < 200 and 0 < (candidate & ~above).sum()  # both sides of the threshold were offered
    # Candidate rate per J level still follows the S-curve (mean P(J) within 4 binomial sd).
    prob = mh.lsh_probability(jac[above], CFG.bands, CFG.rows)
    assert abs(detected[above].mean() - prob.mean()) <= 4 * np.sqrt(np.sum(prob * (1 - prob))) / above.sum() + 0.01


def test_license_accuracy_star_and_transitive_exact_and_estimate() -> None:
    """Installed license texts, ground truth = exact Jaccard >= 0.8 of the shingle sets.

    Measured on this venv (309 files, 7,068 true pairs in 19 true groups of >= 2), seed 1:
      cluster     confirm   pair precision  pair recall  group precision  group recall  dropped->kept >= 0.8
      star        exact     0.966           0.957        1.000            0.861         1.000 (245 of 245)
      star        estimate  0.887           0.956        0.978            0.916         0.843 (209 of 248)
      transitive  exact     0.869           1.000        1.000            1.000         0.828 (207 of 250)
      transitive  estimate  0.838           1.000        0.964            1.000         0.807 (205 of 254)
    "group" compares with the components of the true pairs. Transitive clusters chain license variants
    (A~B, B~C, A!~C), which caps their pair precision; star clusters hold only documents within 0.8 of
    their kept centre, so with exact confirmation every removal is a true near duplicate, and the cost is
    recall: a true pair split between two centres. Seeds 2-3 and affine32 gave star + exact precision
    0.966-0.975, recall 0.947-0.968.
    """
    texts = license_texts()
    if len(texts) < 50:
        pytest.skip(f"only {len(texts)} license files installed")
    sets = _jaccard_sets(texts)
    truth = _true_pairs(sets, CFG.threshold)
    n = len(texts)
    label = dd._components(n, np.array(sorted(truth)))
    closure = {(i, j) for i, j in itertools.combinations(range(n), 2) if label[i] == label[j]}
    keys, sig = mh.MinHasher(CFG).keys_and_signatures(texts)
    figures = {}
    for cluster, confirm in itertools.product(("star", "transitive"), ("exact", "estimate")):
        cfg = dataclasses.replace(CFG, cluster=cluster)
        checker = _exact(texts) if confirm == "exact" else None
        r = dd.find_duplicates(
            ["s"] * n, [f"d{i:04d}" for i in range(n)], keys, sig, np.zeros(n), np.zeros(n, int), cfg, checker
        )
        predicted = set()
        for members in r.clusters.column("members").to_pylist():
            predicted |= set(itertools.combinations(members, 2))
        removals = [(min(i, int(k)), max(i, int(k))) for i, k in enumerate(r.kept_index) if not r.kept[i]]
        good = sum(p in truth or keys[p[0]] == keys[p[1]] for p in removals)
        figures[cluster, confirm] = {
            "precision": len(predicted & truth) / len(predicted),
            "recall": len(predicted & truth) / len(truth),
            "group_precision": len(predicted & closure) / len(predicted),
            "group_recall": len(predicted & closure) / len(closure),
            "removal_precision": good / len(removals),
        }
        if checker is not None:
            # Exact similarity to the kept member, checked against the Python sets.
            for i in np.flatnonzero(np.array(r.reason) == dd.NEAR)[:50].tolist():
                a, b = sets[i], sets[int(r.kept_index[i])]
                assert r.similarity[i] == len(a & b) / len(a | b)
    assert len(truth) > 100
    star, transitive = figures["star", "exact"], figures["transitive", "exact"]
    # The target, at the default settings (star clusters, exact confirmation).
    assert star["precision"] >= 0.95 and star["recall"] >= 0.95
    assert star["group_precision"] == 1.0 and star["removal_precision"] == 1.0  # every link is a true pair
    assert transitive["group_precision"] == 1.0
    assert transitive["recall"] >= 0.95 and transitive["group_recall"] >= 0.95
    assert transitive["precision"] >= figures["transitive", "estimate"]["precision"] - 1e-9
    assert transitive["precision"] >= 0.8  # transitivity, not the confirmation, limits it (docstring)
    assert star["precision"] > transitive["precision"] + 0.05


# ---------------------------------------------------------------------------------------------------
# The stage on a lake


def manifest_for(root: Path, **dedup: object) -> SourcesManifest:
    for name in ("a", "b"):
        (root / f"{name}.jsonl").write_text("")
    (root / "sources.yaml").write_text(
        "sources:\n  - {name: a, kind: jsonl, path: a.jsonl}\n  - {name: b, kind: jsonl, path: b.jsonl}\n"
    )
    manifest = load_manifest(root / "sources.yaml")
    cfg = dataclasses.replace(manifest.pipeline.dedup, **dedup)  # type: ignore[arg-type]
    return dataclasses.replace(manifest, pipeline=dataclasses.replace(manifest.pipeline, dedup=cfg))


def documents(lake: Lake, source: str, texts: list[str], quality: list[float] | None = None) -> Version:
    rows = [
        {
            "doc_id": hashlib.sha256(t.encode()).hexdigest(),
            "source": source,
            "uri": f"{source}.jsonl",
            "position": i,
            "byte_offset": 0,
            "byte_length": len(t.encode()),
            "raw_sha256": "0" * 64,
            "text": t,
            "quality": 0.5 if quality is None else quality[i],
        }
        for i, t in enumerate(texts)
    ]
    with lake.writer("filtered_documents", source) as writer:
        write_rows(writer.path("documents.parquet"), rows, QUALITY_SCHEMA)
        counts = {"in": len(rows), "out": len(rows), "dropped": {}}
        return writer.commit(code_version="test", config={}, counts=counts, extra={"out_file": "documents.parquet"})


def signatures(lake: Lake, docs: list[Version], cfg: DedupConfig) -> list[Version]:
    out = []
    for version in docs:
        with lake.writer("minhash_signatures", version.partition) as writer:
            out.append(st.build_minhash_signatures(version, writer, cfg).version)
    return out


def clusters(lake: Lake, sigs: list[Version], manifest: SourcesManifest, previous: Version | None = None):
    with lake.writer("duplicate_clusters") as writer:
        return st.build_duplicate_clusters(sigs, manifest, writer, previous)


def corpus_texts() -> tuple[list[str], list[str]]:
    words = shakespeare_words()
    block = [" ".join(words[i : i + 200]) for i in range(0, 200 * 40, 200)]

    def edit(text: str, k: int) -> str:
        w = text.split()
        for j in range(k):
            w[10 + 37 * j] = f"edited{j}"
        return " ".join(w)

    a = [block[0], block[1], edit(block[0], 2), block[1].upper(), block[2], block[3], block[4]]
    b = [block[2], edit(block[3], 3), block[5], block[6], edit(block[5], 1)]
    return a, b


def test_clusters_decisions_ratios_and_index(tmp_path: Path) -> None:
    manifest = manifest_for(tmp_path)
    lake = Lake(tmp_path / "lake")
    a, b = corpus_texts()
    # Quality decides every keep that priority does not (doc_id, a sha256, would decide otherwise).
    docs = [documents(lake, "a", a, [0.6, 0.6] + [0.5] * 5), documents(lake, "b", b, [0.5, 0.5, 0.4, 0.5, 0.9])]
    sigs = signatures(lake, docs, manifest.pipeline.dedup)
    out = clusters(lake, sigs, manifest)
    decisions = pq.read_table(out.version.file("decisions.parquet")).to_pylist()
    got = [(d["source"], d["row"], d["cluster_id"], d["kept"], d["reason"]) for d in decisions]
    assert got == [
        ("a", 0, 0, True, None),
        ("a", 1, 1, True, None),
        ("a", 2, 0, False, "near_duplicate"),
        ("a", 3, 1, False, "exact_duplicate"),  # upper-cased: the same normalized text
        ("a", 4, 2, True, None),
        ("a", 5, 3, True, None),
        ("a", 6, -1, True, None),
        ("b", 0, 2, False, "exact_duplicate"),  # a copy of a[4]: source a has priority
        ("b", 1, 3, False, "near_duplicate"),
        ("b", 2, 4, False, "near_duplicate"),  # b[4] has the higher quality
        ("b", 3, -1, True, None),
        ("b", 4, 4, True, None),
    ]
    sets = _jaccard_sets(a + b)
    near = {(d["source"], d["row"]): d["similarity"] for d in decisions if d["reason"] == "near_duplicate"}
    assert near[("a", 2)] == len(sets[2] & sets[0]) / len(sets[2] | sets[0])  # exact, not estimated
    assert out.version.extra["confirm"] == "exact"
    ratios = {r["scope"]: r for r in out.tables["duplicate_ratio"]}
    assert [(s, r["documents"], r["kept"], r["exact_duplicates"], r["near_duplicates"]) for s, r in ratios.items()] == [
        ("a", 7, 5, 1, 1),
        ("b", 5, 2, 1, 2),
        ("all", 12, 7, 2, 3),
    ]
    assert ratios["all"]["ratio"] == 5 / 12 and ratios["b"]["ratio"] == 3 / 5
    assert ratios["all"]["residual_ratio"] == 0.0 and out.summary["duplicate_ratio"] == 0.0
    assert [
        (c["cluster_id"], c["size"], c["n_exact"], c["n_near"], c["sources"]) for c in out.tables["duplicate_clusters"]
    ] == [
        (0, 2, 0, 1, "a"),
        (1, 2, 1, 0, "a"),
        (2, 2, 1, 0, "a,b"),
        (3, 2, 0, 1, "a,b"),
        (4, 2, 0, 1, "b"),
    ]
    assert out.summary["cluster_size_histogram"] == {"2": 5}
    png = out.version.file("cluster_sizes.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png == st.cluster_size_png(Counter({2: 5}))
    index = dd.load_index(out.version.path / st.INDEX_DIR)
    assert index.confirm == "exact" and index.source == ["a"] * 7 + ["b"] * 5
    assert index.cluster_id.tolist() == [d["cluster_id"] for d in decisions]
    run = out.tables["duplicate_index"][0]
    assert (run["mode"], run["previous_version"], run["new_documents"]) == ("full", None, 12)
    assert run["reason"] == "full: no previous duplicate_clusters materialization"
    # Span settings are not the clusters' config; the signatures' config holds only what they depend on.
    assert "span_policy" not in out.version.manifest["config"]["dedup"]
    assert sorted(sigs[0].manifest["config"]["dedup"]) == ["num_perm", "scheme", "seed", "shingle_size"]


@pytest.mark.parametrize("cluster", ["star", "transitive"])
def test_incremental_run_equals_full_recomputation(tmp_path: Path, cluster: str) -> None:
    manifest = manifest_for(tmp_path, cluster=cluster)
    lake = Lake(tmp_path / "lake")
    a, b = corpus_texts()
    first = clusters(
        lake, signatures(lake, [documents(lake, "a", a), documents(lake, "b", b)], manifest.pipeline.dedup), manifest
    )
    words = shakespeare_words()
    extra = [" ".join(words[9000:9200]), " ".join(words[9000:9199]) + " changed"]
    # New documents in both sources, one inserted before stored rows (stored rows move), near and exact
    # duplicates of stored documents among them.
    a2 = [a[0], extra[0], *a[1:], b[1]]
    b2 = [*b, extra[1], a[5].lower(), b[2] + " and one more"]
    # a[5] (row 6 now) and b[4] win their clusters on quality, so kept members and reasons are fixed.
    docs2 = [
        documents(lake, "a", a2, [0.5] * 6 + [0.8, 0.5, 0.5]),
        documents(lake, "b", b2, [0.5] * 4 + [0.9, 0.5, 0.5, 0.5]),
    ]
    sigs2 = signatures(lake, docs2, manifest.pipeline.dedup)
    full = clusters(lake, sigs2, manifest)
    inc = clusters(lake, sigs2, manifest, previous=first.version)
    run = inc.tables["duplicate_index"][0]
    assert (run["mode"], run["previous_version"], run["reused_documents"], run["new_documents"]) == (
        "incremental",
        first.version.version,
        12,
        5,
    )
    assert run["exact_pairs"] < full.tables["duplicate_index"][0]["exact_pairs"]
    # Same files, hence the same version id: whether it was incremental is not in the manifest.
    assert inc.version.version == full.version.version
    assert inc.tables["duplicate_decisions"] == full.tables["duplicate_decisions"]
    assert inc.tables["duplicate_ratio"] == full.tables["duplicate_ratio"]
    kept = {(d["source"], d["row"]): (d["kept"], d["reason"]) for d in full.tables["duplicate_decisions"]}
    assert kept[("a", 1)] == (True, None) and kept[("b", 5)] == (False, "near_duplicate")
    assert kept[("a", 6)] == (True, None) and kept[("a", 8)] == (False, "near_duplicate")  # b[1], copied into a
    assert kept[("b", 6)] == (False, "exact_duplicate") and kept[("b", 7)] == (False, "near_duplicate")
    # A further run with nothing new reuses everything and still equals the full result.
    again = clusters(lake, sigs2, manifest, previous=inc.version)
    assert again.tables["duplicate_index"][0]["new_documents"] == 0
    assert again.version.version == full.version.version


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("threshold", "full: dedup config changed in ['threshold'] since "),
        ("confirm", "full: {v} was confirmed by exact, this run by estimate"),
        ("removed", "full: 1 of 12 documents of {v} are gone"),
        ("no_index", "full: previous version {v} holds no LSH index"),
    ],
)
def test_incremental_falls_back_to_full(tmp_path: Path, change: str, reason: str) -> None:
    manifest = manifest_for(tmp_path)
    lake = Lake(tmp_path / "lake")
    a, b = corpus_texts()
    first = clusters(
        lake, signatures(lake, [documents(lake, "a", a), documents(lake, "b", b)], manifest.pipeline.dedup), manifest
    )
    previous = first.version
    if change in ("threshold", "confirm"):
        manifest = manifest_for(tmp_path, **({"threshold": 0.7} if change == "threshold" else {"confirm": "estimate"}))
    if change == "removed":
        a = a[:-1]
    if change == "no_index":
        previous = signatures(lake, [documents(lake, "a", a)], manifest.pipeline.dedup)[0]  # any version without one
    sigs = signatures(lake, [documents(lake, "a", a), documents(lake, "b", b)], manifest.pipeline.dedup)
    out = clusters(lake, sigs, manifest, previous=previous)
    run = out.tables["duplicate_index"][0]
    assert run["mode"] == "full"
    assert run["reason"].startswith(reason.format(v=previous.version[:12]))
    assert out.version.version == clusters(lake, sigs, manifest).version.version


def test_new_better_document_reshapes_stored_star_clusters(tmp_path: Path) -> None:
    """A new document better than a stored centre takes its place: the incremental run still equals a full one.

    A, B = A with 4 words edited (J 0.87), C = B with 4 more (J(B, C) 0.87, J(A, C) 0.76), D = B with one
    more edit (J(D, B) 0.97, J(D, A) and J(D, C) ~0.85). First run: A (best quality) claims B; C, below 0.8 to A,
    stays kept. Then D arrives with the best quality and claims A, B and C.
    """
    words = shakespeare_words()[2000:2300]

    def edit(w: list[str], slots: range) -> list[str]:
        out = list(w)
        for k in slots:
            out[4 + 6 * k] = f"zq{k}"  # 6 apart: each edit replaces 5 distinct shingles
        return out

    a = words
    b = edit(a, range(0, 4))
    c = edit(b, range(4, 8))
    d = edit(b, range(40, 41))
    texts = [" ".join(t) for t in (a, b, c, d)]
    manifest = manifest_for(tmp_path)
    lake = Lake(tmp_path / "lake")
    first = clusters(
        lake, signatures(lake, [documents(lake, "a", texts[:3], [0.6, 0.5, 0.5])], manifest.pipeline.dedup), manifest
    )
    assert [(r["row"], r["kept"], r["reason"]) for r in first.tables["duplicate_decisions"]] == [
        (0, True, None),
        (1, False, "near_duplicate"),
        (2, True, None),
    ]
    docs = [documents(lake, "a", texts[:3], [0.6, 0.5, 0.5]), documents(lake, "b", texts[3:], [0.9])]
    sigs = signatures(lake, docs, manifest.pipeline.dedup)
    full = clusters(lake, sigs, manifest)
    inc = clusters(lake, sigs, manifest, previous=first.version)
    assert inc.tables["duplicate_index"][0]["mode"] == "incremental"
    assert inc.version.version == full.version.version
    got = [(r["source"], r["row"], r["kept"], r["kept_source"]) for r in inc.tables["duplicate_decisions"]]
    assert got == [("a", 0, False, "b"), ("a", 1, False, "b"), ("a", 2, False, "b"), ("b", 0, True, "b")]
    sets = _jaccard_sets(texts)
    jac = [len(sets[i] & sets[3]) / len(sets[i] | sets[3]) for i in range(3)]
    assert [r["similarity"] for r in inc.tables["duplicate_decisions"][:3]] == jac and min(jac) >= 0.8
    # Only the pairs with the new document were computed; the spill held only their documents' sets.
    run = inc.tables["duplicate_index"][0]
    assert run["exact_pairs"] == 3 and run["exact_documents"] == 4
    assert sorted(full.version.files) == sorted(first.version.files)  # no spill file in the version


def test_empty_source_and_exact_texts_by_source(tmp_path: Path) -> None:
    manifest = manifest_for(tmp_path)
    lake = Lake(tmp_path / "lake")
    b = corpus_texts()[1]
    sigs = signatures(
        lake, [documents(lake, "a", []), documents(lake, "b", b, [0.5, 0.5, 0.4, 0.5, 0.9])], manifest.pipeline.dedup
    )
    out = clusters(lake, sigs, manifest)
    assert [(d["source"], d["row"], d["kept"]) for d in out.tables["duplicate_decisions"]] == [
        ("b", 0, True),
        ("b", 1, True),
        ("b", 2, False),
        ("b", 3, True),
        ("b", 4, True),
    ]
    assert [(r["scope"], r["documents"]) for r in out.tables["duplicate_ratio"]] == [("a", 0), ("b", 5), ("all", 5)]
    assert out.tables["duplicate_clusters"][0]["preview"] == " ".join(b[4].split())[:80]


def test_exact_budget_falls_back_to_the_estimate(tmp_path: Path) -> None:
    manifest = manifest_for(tmp_path, max_exact_pairs=1)
    lake = Lake(tmp_path / "lake")
    a, b = corpus_texts()
    sigs = signatures(lake, [documents(lake, "a", a), documents(lake, "b", b)], manifest.pipeline.dedup)
    with pytest.warns(UserWarning, match="over the limit of 1 .*signature estimate"):
        out = clusters(lake, sigs, manifest)
    assert out.version.extra["confirm"] == "estimate" and out.tables["duplicate_index"][0]["confirm"] == "estimate"
    assert dd.load_index(out.version.path / st.INDEX_DIR).confirm == "estimate"
    assert [d["kept"] for d in out.tables["duplicate_decisions"]].count(False) == 5  # the same decisions here


# ---------------------------------------------------------------------------------------------------
# Span pass


def tokenized(lake: Lake, source: str, docs: list[np.ndarray], eot: int = 50256) -> Version:
    with lake.writer("tokenized_documents", source) as writer:
        flat = np.concatenate([np.append(d, eot) for d in docs]).astype("<u2")
        flat.tofile(writer.path("tokens.bin"))
        lengths = [len(d) + 1 for d in docs]
        starts = np.cumsum([0, *lengths[:-1]]).tolist()
        rows = [
            {"doc_id": f"{source}{i}", "source": source, "uri": "u", "position": i, "start": s, "length": n}
            for i, (s, n) in enumerate(zip(starts, lengths, strict=True))
        ]
        write_rows(writer.path("index.parquet"), rows, INDEX_SCHEMA)
        counts = {"in": len(docs), "out": len(docs), "dropped": {}, "tokens": int(sum(lengths))}
        return writer.commit(code_version="test", config={}, counts=counts)


def span_corpus(lake: Lake) -> list[Version]:
    rng = np.random.default_rng(11)
    a0 = rng.integers(0, 50000, 400)
    a1 = rng.integers(0, 50000, 100)
    b0 = np.concatenate((rng.integers(0, 50000, 30), a0[50:250], rng.integers(0, 50000, 30)))  # 200 of a0
    b1 = np.concatenate((a1[:40], rng.integers(0, 50000, 60)))  # 40 shared: below span_length 64
    b2 = np.concatenate((a0[300:380], b0[:30], a0[300:380]))  # a0's 80 twice: one hit per copy
    b3 = a0[100:180].copy()  # entirely shared
    return [tokenized(lake, "a", [a0, a1]), tokenized(lake, "b", [b0, b1, b2, b3])]


@pytest.mark.parametrize("policy", ["flag", "drop", "remove_span"])
def test_repeated_spans_and_policy_view(tmp_path: Path, policy: str) -> None:
    manifest = manifest_for(tmp_path, span_length=64, span_policy=policy)
    lake = Lake(tmp_path / "lake")
    versions = span_corpus(lake)
    with lake.writer("repeated_spans") as writer:
        out = sp.build_repeated_spans(list(reversed(versions)), manifest, writer)  # order from priority, not input
    hits = [
        (r["source"], r["row"], r["start"], r["length"], r["earlier_source"], r["earlier_row"], r["earlier_start"])
        for r in pq.read_table(out.version.file("spans.parquet")).to_pylist()
    ]
    assert hits == [
        ("b", 0, 30, 200, "a", 0, 50),
        ("b", 2, 0, 80, "a", 0, 300),
        ("b", 2, 110, 80, "a", 0, 300),
        ("b", 3, 0, 80, "a", 0, 100),
    ]
    docs = pq.read_table(out.version.file("documents.parquet")).to_pylist()
    full_action = "drop" if policy != "flag" else "flag"
    assert [(d["row"], d["tokens"], d["span_tokens"], d["action"]) for d in docs] == [
        (0, 260, 200, policy),
        (2, 190, 160, policy),
        (3, 80, 80, full_action),  # nothing would be left: remove_span drops it
    ]
    assert out.counts == {"documents": 6, "tokens": 1130, "spans": 4, "flagged_documents": 3, "span_tokens": 440}
    assert [r["flagged_documents"] for r in out.tables["repeated_span_sources"]] == [0, 3]
    b_lengths = pq.read_table(versions[1].file("index.parquet")).column("length").to_numpy()
    view = sp.span_policy_view(out.version, "b", b_lengths)
    tokens_b = np.fromfile(versions[1].file("tokens.bin"), dtype="<u2")
    if policy == "flag":
        assert view.rows.tolist() == [0, 1, 2, 3] and view.lengths.tolist() == b_lengths.tolist() and not view.cuts
    elif policy == "drop":
        assert view.rows.tolist() == [1] and view.lengths.tolist() == [101]
    else:
        assert view.rows.tolist() == [0, 1, 2] and view.lengths.tolist() == [61, 101, 31]
        assert view.cuts == {0: [(30, 200)], 2: [(0, 80), (110, 80)]}
        doc2 = tokens_b[261 + 101 : 261 + 101 + 191]
        assert view.tokens(2, doc2).tolist() == [*doc2[80:110].tolist(), 50256]
    assert view.tokens(1, tokens_b[261:362]).tolist() == tokens_b[261:362].tolist()
