"""Counts that must reconcile, checked against what was actually written.

For every version: `in = out + sum(dropped)`; the file named by `extra.out_file` really holds `out`
rows (Parquet footer row count, so nothing is re-read); the file named by `extra.dropped_file` holds one
row per dropped record, its `reason` column matching `dropped` reason by reason; and `in` equals the sum
of `out` over the upstream versions of the assets named in `extra.in_from`. Used by the Dagster asset check
`counts_reconcile` and by `corpus verify`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pyarrow.parquet as pq

from corpus.lake import Version


def parquet_rows(version: Version, name: str) -> int:
    return int(pq.ParquetFile(version.file(name)).metadata.num_rows)


def reconcile(version: Version, upstream: Sequence[Version] = ()) -> list[str]:
    """Problems with the version's counts, one line each; empty when everything reconciles."""
    counts = version.counts
    extra = version.extra
    where = f"{version.asset}[{version.partition}] {version.version[:12]}"
    problems: list[str] = []
    if "in" in counts and "out" in counts:
        dropped = sum(int(n) for n in dict(counts.get("dropped", {})).values())
        if counts["in"] != counts["out"] + dropped:
            problems.append(f"{where}: in {counts['in']} != out {counts['out']} + dropped {dropped}")
    out_file = extra.get("out_file")
    if out_file and "out" in counts:
        try:
            rows = parquet_rows(version, out_file)
        except Exception as exc:  # a missing or unreadable file is itself the finding
            problems.append(f"{where}: cannot read {out_file}: {exc}")
        else:
            if rows != counts["out"]:
                problems.append(f"{where}: {out_file} has {rows} rows, manifest says out = {counts['out']}")
    dropped_file = extra.get("dropped_file")
    if dropped_file and "dropped" in counts:
        try:
            reasons = pq.read_table(version.file(dropped_file), columns=["reason"]).column(0).to_pylist()
        except Exception as exc:  # a missing or unreadable file is itself the finding
            problems.append(f"{where}: cannot read {dropped_file}: {exc}")
        else:
            stated = {str(k): int(n) for k, n in dict(counts["dropped"]).items() if int(n)}
            held = dict(Counter(str(r) for r in reasons))
            if held != stated:
                diff = ", ".join(
                    f"{reason} {held.get(reason, 0)} (manifest {stated.get(reason, 0)})"
                    for reason in sorted(set(held) | set(stated))
                    if held.get(reason, 0) != stated.get(reason, 0)
                )
                problems.append(f"{where}: {dropped_file} rows per reason differ from dropped: {diff}")
    in_from = extra.get("in_from")
    if in_from and "in" in counts:
        sources = [u for u in upstream if u.asset in in_from]
        if sources:
            expected = sum(int(u.counts.get("out", 0)) for u in sources)
            if counts["in"] != expected:
                names = ", ".join(f"{u.asset}[{u.partition}]" for u in sources)
                problems.append(f"{where}: in {counts['in']} != out of upstream {names} ({expected})")
    return problems
