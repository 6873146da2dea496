"""`duplicate_clusters` alone at ~100 MB, ~300 MB and ~1 GB: wall time and peak RSS of one fresh process.

The corpora are benchmarks/scale.py's (real stdlib and site-packages files, each written 5 times with word
edits: mostly near duplicates, as crawls are), stored straight as `filtered_documents` versions of two
sources (code, text; no quality filter, so every file counts) with their `minhash_signatures`. Then, per
size, a child process imports the pipeline code (`--code DIR`, default this checkout; point it at an
older tree, e.g. `git archive <rev> | tar -x -C DIR`, for a before/after) and runs
`build_duplicate_clusters` once, exact confirmation and default settings; the child reports its wall
time and `ru_maxrss` (imports included, ~70 MB). The target of issue 10: peak RSS well under 2 GB at
1 GB and time within ~20% of linear from 100 MB to 1 GB.

Run: `.venv/bin/python benchmarks/dedup_scale.py [--sizes 100,300,1000] [--code DIR]` (~2 minutes on
2 cores, most of it writing the corpora). Writes benchmarks/results/dedup_scale.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "dedup_scale.json"


def prepare(size_mb: int, work: Path) -> dict[str, Any]:
    """Write the corpus of `size_mb` as filtered_documents + minhash_signatures versions in work/lake."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import pyarrow as pa
    import scale

    from corpus.config import load_manifest
    from corpus.lake import Lake
    from corpus.stages import dedup as st
    from corpus.stages.io import DOCUMENT_SCHEMA, ParquetSink

    schema = DOCUMENT_SCHEMA.append(pa.field("quality", pa.float64()))
    work.mkdir(parents=True, exist_ok=True)
    budget = size_mb * scale.MB // scale.COPIES
    chosen, total = [], 0
    for entry in scale.file_pool():
        if total >= budget:
            break
        chosen.append(entry)
        total += entry.size
    rng = random.Random(f"{scale.SEED}-{size_mb}")
    sources = ("code", "text")
    for name in sources:
        (work / f"{name}.jsonl").write_text("")
    (work / "sources.yaml").write_text(
        "sources:\n" + "".join(f"  - {{name: {n}, kind: jsonl, path: {n}.jsonl}}\n" for n in sources)
    )
    lake = Lake(work / "lake")
    manifest = load_manifest(work / "sources.yaml")
    writers = {name: lake.writer("filtered_documents", name) for name in sources}
    sinks = {name: ParquetSink(writers[name].path("documents.parquet"), schema) for name in sources}
    documents = n_bytes = 0
    for entry in chosen:
        data = entry.path.read_bytes()
        kind = "code" if entry.uri.endswith(".py") else "text"
        quality = hashlib.sha256(entry.uri.encode()).digest()[0] / 255  # per file, so copies tie on it
        for copy in range(scale.COPIES):
            body = data if copy == 0 else scale.edited(data, entry.uri, copy, rng)
            text = body.decode("utf-8", errors="replace")
            row = {"doc_id": hashlib.sha256(text.encode()).hexdigest(), "source": kind, "uri": entry.uri}
            row |= {"position": copy, "byte_offset": 0, "byte_length": len(body), "raw_sha256": "0" * 64}
            sinks[kind].add(row | {"text": text, "quality": quality})
            documents += 1
            n_bytes += len(body)
    signatures = []
    for name in sources:
        sinks[name].close()
        count = sinks[name].count
        counts = {"in": count, "out": count, "dropped": {}}
        filtered = writers[name].commit(
            code_version="benchmark", config={}, counts=counts, extra={"out_file": "documents.parquet"}
        )
        writers[name].__exit__(None, None, None)
        with lake.writer("minhash_signatures", name) as writer:
            version = st.build_minhash_signatures(filtered, writer, manifest.pipeline.dedup).version
            signatures.append([name, version.version])
    (work / "signatures.json").write_text(json.dumps(signatures))
    return {"size_mb": size_mb, "documents": documents, "bytes": n_bytes}


def child(work: Path) -> None:
    """In a fresh process (code from sys.path[0]): build duplicate_clusters once, print the figures as JSON."""
    from corpus.config import load_manifest
    from corpus.lake import Lake
    from corpus.stages import dedup as st

    lake = Lake(work / "lake")
    manifest = load_manifest(work / "sources.yaml")
    versions = [lake.open("minhash_signatures", p, v) for p, v in json.loads((work / "signatures.json").read_text())]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with lake.writer("duplicate_clusters") as writer:
        out = st.build_duplicate_clusters(versions, manifest, writer)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = out.tables["duplicate_index"][0]
    figures = {
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(peak / 1024),
        "rss_at_start_mib": round(before / 1024),
    }
    figures |= {"kept": out.counts["out"], "clusters": out.counts["clusters"], "exact_pairs": run["exact_pairs"]}
    figures |= {"exact_documents": run["exact_documents"], "exact_shingles": run["exact_shingles"]}
    print(json.dumps(figures))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,300,1000", help="corpus sizes in MB, comma-separated")
    parser.add_argument("--code", default=str(ROOT), help="the tree whose corpus/ runs duplicate_clusters")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.child:
        child(Path(args.child))
        return 0
    code = Path(args.code).resolve()
    points = []
    with tempfile.TemporaryDirectory(prefix="dedup-scale-") as tmp:
        for size in sorted(int(s) for s in args.sizes.split(",")):
            work = Path(tmp) / f"corpus-{size}"
            point = prepare(size, work)
            env = {**os.environ, "PYTHONPATH": str(code)}  # before the venv's own path to this checkout
            command = [sys.executable, str(Path(__file__).resolve()), "--child", str(work)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=code, env=env)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            point |= json.loads(done.stdout.strip().splitlines()[-1])
            points.append(point)
            line = f"{size:>5} MB {point['documents']:>7,} documents: {point['seconds']:7.2f} s, "
            line += f"peak RSS {point['peak_rss_mib']:,} MiB, {point['exact_pairs']:,} pairs compared"
            print(line, flush=True)
    base = points[0]
    linear = [round((p["seconds"] / base["seconds"]) / (p["bytes"] / base["bytes"]), 3) for p in points]
    print(f"time per byte vs the smallest size: {linear} (1.0 = linear)")
    load = Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"
    result = {"code": str(code), "points": points, "time_per_size_vs_linear": linear, "load_after": load}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
