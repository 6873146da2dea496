"""Lineage in standard forms: OpenLineage run events per materialization, and a Croissant description.

OpenLineage (openlineage-python, file transport): one COMPLETE RunEvent per materialization recorded in
metrics.duckdb (`materializations`: asset, partition, version, Dagster run id, time). The job is the
asset (`asset/partition` for a partitioned one) in namespace `corpus`; the run id is a UUIDv7 made from
the materialization time and (Dagster run id, asset, partition, version), so exporting twice gives the
same ids; a `parent` facet names the Dagster run (and its job when known). Inputs are the upstream
versions the manifest cites and the output is the version written, each dataset named by its lake
directory `<lake>/<asset>/<partition>` in namespace `file` with a `version` facet holding the content
hash, a `schema` facet for Parquet outputs and `outputStatistics` (rows, bytes, files). Events are
appended, one JSON object per line, to `<lake>/lineage/openlineage.jsonl` unless told otherwise.
`corpus run` emits the events of its own materializations when it finishes.

Croissant (MLCommons, JSON-LD, conformsTo 1.1): the final dataset of a release: every file of the window
shards, the packed rows and the mixed stream's document index as a FileObject with its sha256 and size
(paths relative to the lake), and record sets for the documents of the stream (Parquet columns), the
windows (max_length + 1 little-endian uint16 ids every `stride` tokens of a shard) and the packed rows
(the [rows, max_length] arrays of tokens, segment ids and position ids). Binary token layouts are
described in each record set's description: Croissant has no extractor for raw uint16 arrays.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from corpus.lake import Lake, LakeError, Version
from corpus.layout import packed_shards
from corpus.metrics import MetricsError, MetricsStore
from corpus.release import latest_release, lineage

NAMESPACE = "corpus"
DATASET_NAMESPACE = "file"
EVENTS_FILE = "lineage/openlineage.jsonl"
CROISSANT_CONFORMS_TO = "http://mlcommons.org/croissant/1.1"


def _package_version() -> str:
    try:
        return metadata.version("corpus-pipeline")
    except metadata.PackageNotFoundError:
        return "0"


PRODUCER = f"urn:corpus-pipeline:{_package_version()}"


# ---------------------------------------------------------------- OpenLineage


def materializations(
    lake_root: Path, *, since: dt.datetime | None = None, versions: Sequence[Version] | None = None
) -> list[dict[str, Any]]:
    """Rows of the metrics `materializations` table: newer than `since` (naive UTC), or of `versions`."""
    store = MetricsStore(Path(lake_root) / "metrics.duckdb")
    sql = (
        "SELECT asset, partition, version, run_id, materialized_at FROM materializations WHERE true"
        + (" AND materialized_at >= ?" if since is not None else "")
        + " ORDER BY materialized_at, asset, partition"
    )
    rows = store.query(sql, [since] if since is not None else [])
    if versions is not None:
        wanted = {(v.asset, v.partition, v.version) for v in versions}
        rows = [r for r in rows if (r["asset"], r["partition"], r["version"]) in wanted]
    return rows


def _dataset_name(lake: Lake, asset: str, partition: str) -> str:
    return str(lake.partition_dir(asset, partition))


def _schema_facet(version: Version) -> Any:
    from openlineage.client.generated.schema_dataset import SchemaDatasetFacet, SchemaDatasetFacetFields

    out_file = version.extra.get("out_file")
    if not out_file or out_file not in version.files:
        return None
    schema = pq.read_schema(version.path / out_file)
    return SchemaDatasetFacet(fields=[SchemaDatasetFacetFields(name=f.name, type=str(f.type)) for f in schema])


def run_event(lake: Lake, version: Version, run_id: str, when: dt.datetime, parent_job: str | None = None) -> Any:
    """The COMPLETE RunEvent of one materialization of `version` in Dagster run `run_id`."""
    from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
    from openlineage.client.generated import parent_run
    from openlineage.client.generated.dataset_version_dataset import DatasetVersionDatasetFacet
    from openlineage.client.generated.job_type_job import JobTypeJobFacet
    from openlineage.client.generated.output_statistics_output_dataset import OutputStatisticsOutputDatasetFacet
    from openlineage.client.generated.processing_engine_run import ProcessingEngineRunFacet
    from openlineage.client.uuid import generate_static_uuid

    when = when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    key = f"{run_id}/{version.asset}/{version.partition}/{version.version}"
    run_facets: dict[str, Any] = {
        "processing_engine": ProcessingEngineRunFacet(
            version=str(version.manifest.get("code_version")), name="corpus-pipeline"
        ),
        "parent": parent_run.ParentRunFacet(
            run=parent_run.Run(runId=run_id),
            job=parent_run.Job(namespace="dagster", name=parent_job or "corpus_run"),
        ),
    }
    job_name = version.asset if version.partition == "_all" else f"{version.asset}/{version.partition}"
    inputs = [
        InputDataset(
            namespace=DATASET_NAMESPACE,
            name=_dataset_name(lake, ref.asset, ref.partition),
            facets={"version": DatasetVersionDatasetFacet(datasetVersion=ref.version)},
        )
        for ref in version.upstream
    ]
    facets: dict[str, Any] = {"version": DatasetVersionDatasetFacet(datasetVersion=version.version)}
    schema = _schema_facet(version)
    if schema is not None:
        facets["schema"] = schema
    counts = version.counts
    rows = counts.get("out", counts.get("documents"))
    output = OutputDataset(
        namespace=DATASET_NAMESPACE,
        name=_dataset_name(lake, version.asset, version.partition),
        facets=facets,
        outputFacets={
            "outputStatistics": OutputStatisticsOutputDatasetFacet(
                rowCount=int(rows) if isinstance(rows, int) else None,
                size=sum(int(f["bytes"]) for f in version.manifest["files"]),
                fileCount=len(version.manifest["files"]),
            )
        },
    )
    return RunEvent(
        eventType=RunState.COMPLETE,
        eventTime=when.isoformat(),
        run=Run(runId=str(generate_static_uuid(when, key.encode())), facets=run_facets),
        job=Job(
            namespace=NAMESPACE,
            name=job_name,
            facets={"jobType": JobTypeJobFacet(processingType="BATCH", integration="CORPUS", jobType="ASSET")},
        ),
        inputs=inputs,
        outputs=[output],
        producer=PRODUCER,
    )


def emit_openlineage(
    lake_root: Path,
    *,
    since: dt.datetime | None = None,
    release: Version | None = None,
    out: Path | None = None,
    parent_jobs: Mapping[str, str] | None = None,
) -> tuple[Path, int]:
    """Append one RunEvent per materialization (newer than `since`, or of the latest release's lineage when
    `since` is None) to `out` (default `<lake>/lineage/openlineage.jsonl`); returns the file and the count.

    Events already in `out` are not appended again (their run ids are derived from the materialization, so
    the same one always gives the same id): exporting after `corpus run` appended its events, or twice,
    leaves one event per materialization.
    """
    from openlineage.client import OpenLineageClient
    from openlineage.client.transport.file import FileConfig, FileTransport

    lake = Lake(lake_root)
    if since is None:
        release = release or latest_release(lake.root)
        rows = materializations(lake.root, versions=lineage(lake, [release]))
    else:
        rows = materializations(lake.root, since=since)
    out = Path(out) if out else lake.root / EVENTS_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    client = OpenLineageClient(transport=FileTransport(FileConfig(log_file_path=str(out), append=True)))
    emitted = _emitted_run_ids(out)
    seen: set[tuple[str, str, str, str]] = set()
    count = 0
    for row in rows:
        key = (row["run_id"], row["asset"], row["partition"], row["version"])
        if key in seen:
            continue
        seen.add(key)
        try:
            version = lake.open(row["asset"], row["partition"], row["version"])
        except LakeError:
            continue  # removed by `corpus gc` since; its events were emitted when it was made
        event = run_event(lake, version, row["run_id"], row["materialized_at"], (parent_jobs or {}).get(row["asset"]))
        if event.run.runId in emitted:
            continue
        client.emit(event)
        emitted.add(event.run.runId)
        count += 1
    return out, count


def _emitted_run_ids(path: Path) -> set[str]:
    """The run ids of the run events a JSON-lines file already holds (none when it does not exist).

    Lines that are no run event (a DatasetEvent or JobEvent another tool wrote, a line cut short when a
    process was killed mid-write) are passed over; a file not ending in a newline gets one, so the next
    event starts its own line.
    """
    if not path.exists():
        return set()
    ids = set()
    with path.open("rb") as lines:
        last = b"\n"
        for line in lines:
            last = line
            try:
                ids.add(str(json.loads(line)["run"]["runId"]))
            except (ValueError, KeyError, TypeError):
                continue
    if not last.endswith(b"\n"):
        with path.open("ab") as handle:
            handle.write(b"\n")
    return ids


def emit_openlineage_quietly(lake_root: Path, since: dt.datetime, parent_jobs: Mapping[str, str]) -> str:
    """For the end of `corpus run`: emit, and say what happened in one line instead of failing the run."""
    try:
        path, count = emit_openlineage(lake_root, since=since, parent_jobs=parent_jobs)
    except (MetricsError, LakeError, OSError, RuntimeError) as exc:
        return f"OpenLineage events not written: {exc}"
    return f"OpenLineage: {count} run events appended to {path}"


# ---------------------------------------------------------------- Croissant

CROISSANT_CONTEXT: dict[str, Any] = {
    "@language": "en",
    "@vocab": "https://schema.org/",
    "arrayShape": "cr:arrayShape",
    "citeAs": "cr:citeAs",
    "column": "cr:column",
    "conformsTo": "dct:conformsTo",
    "containedIn": "cr:containedIn",
    "cr": "http://mlcommons.org/croissant/",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/",
    "equivalentProperty": "cr:equivalentProperty",
    "examples": {"@id": "cr:examples", "@type": "@json"},
    "extract": "cr:extract",
    "field": "cr:field",
    "fileProperty": "cr:fileProperty",
    "fileObject": "cr:fileObject",
    "fileSet": "cr:fileSet",
    "format": "cr:format",
    "includes": "cr:includes",
    "isArray": "cr:isArray",
    "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath",
    "key": "cr:key",
    "md5": "cr:md5",
    "parentField": "cr:parentField",
    "path": "cr:path",
    "recordSet": "cr:recordSet",
    "references": "cr:references",
    "regex": "cr:regex",
    "repeated": "cr:repeated",
    "replace": "cr:replace",
    "samplingRate": "cr:samplingRate",
    "sc": "https://schema.org/",
    "separator": "cr:separator",
    "source": "cr:source",
    "subField": "cr:subField",
    "transform": "cr:transform",
}
_PARQUET_TYPES = {"string": "sc:Text", "large_string": "sc:Text", "int64": "sc:Integer", "bool": "sc:Boolean"}


def _file_object(lake: Lake, version: Version, name: str, fmt: str, description: str) -> dict[str, Any]:
    entry = version.files[name]
    rel = (version.path / name).relative_to(lake.root).as_posix()
    return {
        "@type": "cr:FileObject",
        "@id": rel,
        "name": rel,
        "description": description,
        "contentUrl": rel,
        "encodingFormat": fmt,
        "contentSize": f"{entry['bytes']} B",
        "sha256": entry["sha256"],
    }


def _field(record_set: str, name: str, data_type: str, description: str, source: dict[str, Any], **extra: Any) -> dict:
    return {
        "@type": "cr:Field",
        "@id": f"{record_set}/{name}",
        "name": name,
        "description": description,
        "dataType": data_type,
        "source": source,
        **extra,
    }


def croissant(lake_root: Path, release: Version | None = None) -> dict[str, Any]:
    """The Croissant JSON-LD description of a release's final dataset (default: the latest release)."""
    lake = Lake(lake_root)
    release = release or latest_release(lake.root)
    versions = {v.asset: v for v in lineage(lake, [release]) if v.partition == "_all"}
    for needed in ("mixed_tokens", "training_windows", "packed_sequences"):
        if needed not in versions:
            raise LakeError(f"release {release.version[:12]} has no {needed} version; nothing to describe")
    mixed, windows, packed = versions["mixed_tokens"], versions["training_windows"], versions["packed_sequences"]
    length, stride = int(windows.extra["max_length"]), int(windows.extra["stride"])
    distribution = [
        _file_object(lake, release, "release.json", "application/json", "The release: Merkle root and versions."),
        _file_object(
            lake,
            mixed,
            "stream_index.parquet",
            "application/x-parquet",
            "Every document of the training stream, in order: split, position, source, doc_id, epoch, raw uri.",
        ),
    ]
    shard_ids = []
    for shard in windows.extra.get("shards", []):
        obj = _file_object(
            lake,
            windows,
            str(shard["path"]),
            "application/octet-stream",
            f"{shard['split']} window shard: {shard['tokens']} little-endian uint16 GPT-2 ids from stream position "
            f"{shard['stream_start']}, {shard['windows']} windows from window {shard['first_window']}.",
        )
        distribution.append(obj)
        shard_ids.append(obj["@id"])
    windows_set_id = f"{windows.path.relative_to(lake.root).as_posix()}/train-*.bin"
    if shard_ids:
        distribution.append(
            {
                "@type": "cr:FileSet",
                "@id": windows_set_id,
                "name": windows_set_id,
                "description": "The train window shards, in name order.",
                "encodingFormat": "application/octet-stream",
                "includes": windows_set_id,
            }
        )
    packed_ids: dict[str, dict[str, str]] = {}
    packed_root = packed.path.relative_to(lake.root).as_posix()
    for split in dict(packed.extra.get("splits", {})):
        shards = packed_shards(packed, split)
        for shard in shards:
            for name in sorted(n for n in packed.files if n.startswith(f"{shard['dir']}/")):
                distribution.append(
                    _file_object(
                        lake,
                        packed,
                        name,
                        "application/x-npy",
                        f"{split} packed rows {shard['first_row']}..{shard['first_row'] + shard['rows'] - 1}: NumPy "
                        f"array {name.split('/')[-1]} (its rows count from 0).",
                    )
                )
        if not shards:
            continue
        for array in ("tokens", "segment_ids", "position_ids"):
            set_id = f"{packed_root}/{split}/*/{array}.npy"
            distribution.append(
                {
                    "@type": "cr:FileSet",
                    "@id": set_id,
                    "name": set_id,
                    "description": f"The {split} split's {array} arrays, one per shard directory in name order "
                    f"({len(shards)} shards; shard k holds the split's rows from its manifest first_row on).",
                    "encodingFormat": "application/x-npy",
                    "includes": set_id,
                }
            )
            packed_ids.setdefault(split, {})[array] = set_id
    stream_id = distribution[1]["@id"]
    schema = pq.read_schema(mixed.path / "stream_index.parquet")
    documents = {
        "@type": "cr:RecordSet",
        "@id": "documents",
        "name": "documents",
        "description": "One record per contiguous piece of a document placed in the training stream: a "
        "document repeated across epochs appears once per epoch, and one whose repeated spans were removed "
        "(dedup.span_policy remove_span) once per remaining piece; stream_start and length are token positions "
        "in the split's stream, offset the piece's first token within the tokenized document.",
        "key": [{"@id": "documents/split"}, {"@id": "documents/stream_start"}],
        "field": [
            _field(
                "documents",
                f.name,
                _PARQUET_TYPES.get(str(f.type), "sc:Text"),
                f"Column {f.name} of stream_index.parquet.",
                {"fileObject": {"@id": stream_id}, "extract": {"column": f.name}},
            )
            for f in schema
        ],
    }
    windows_set = {
        "@type": "cr:RecordSet",
        "@id": "windows",
        "name": "windows",
        "description": f"Training windows: window i of a shard is the {length + 1} uint16 ids at token offset "
        f"i x {stride} of the shard file; input_ids are the first {length}, labels the last {length} (shifted by "
        "one). The windows of the shards in order are exactly the windows over each split's stream.",
        "field": [
            _field(
                "windows",
                name,
                "sc:Integer",
                what,
                {"fileSet": {"@id": windows_set_id}, "extract": {"fileProperty": "content"}},
                isArray=True,
                arrayShape=str(length),
            )
            for name, what in (
                ("input_ids", f"{length} token ids: the model input."),
                ("labels", f"{length} token ids: the targets, input shifted by one."),
            )
        ],
    }
    packed_sets = [
        {
            "@type": "cr:RecordSet",
            "@id": set_id,
            "name": set_id,
            "description": description,
            "field": [
                _field(
                    set_id,
                    name,
                    "sc:Integer",
                    what,
                    {"fileSet": {"@id": packed_ids["train"][name]}, "extract": {"fileProperty": "content"}},
                    isArray=True,
                    arrayShape=str(length),
                )
            ],
        }
        for set_id, name, what, description in (
            (
                "packed_rows",
                "tokens",
                "token ids",
                f"Packed rows of exactly {length} tokens (best-fit decreasing; padding is token 50256 with segment "
                "id -1): the [rows, max_length] arrays of the train shards, concatenated in shard order. A shard's "
                "piece table (piece_row, piece_start, piece_length, piece_doc, piece_doc_offset) maps every token to "
                "its document; piece_row counts the shard's rows, piece_doc indexes the split's records of "
                "'documents' in stream order.",
            ),
            (
                "packed_segment_ids",
                "segment_ids",
                "piece index within the row, -1 on padding",
                "Row r aligns with row r of packed_rows: which piece (document) each token belongs to.",
            ),
            (
                "packed_position_ids",
                "position_ids",
                "position within the piece, restarting at 0",
                "Row r aligns with row r of packed_rows: each token's position within its document piece.",
            ),
        )
        if "train" in packed_ids
    ]
    return {
        "@context": CROISSANT_CONTEXT,
        "@type": "sc:Dataset",
        "conformsTo": CROISSANT_CONFORMS_TO,
        "name": f"corpus-release-{release.version[:12]}",
        "description": (
            f"Training shards of release {release.version}: {windows.counts.get('train_windows', 0):,} train and "
            f"{windows.counts.get('validation_windows', 0):,} validation windows of {length} tokens, "
            f"{packed.counts.get('train_rows', 0):,} train packed rows. Merkle root over every file of the lineage: "
            f"{release.extra.get('merkle_root')}."
        ),
        "version": "1.0.0",
        "url": release.path.as_uri(),
        "license": "https://spdx.org/licenses/NOASSERTION",
        "datePublished": _release_date(lake, release),
        "identifier": release.version,
        "citeAs": f"@misc{{corpus_release_{release.version[:12]}, title = {{corpus release {release.version}}}, "
        f"note = {{Merkle root {release.extra.get('merkle_root')}}}}}",
        "distribution": distribution,
        "recordSet": [documents, windows_set, *packed_sets],
    }


def _release_date(lake: Lake, release: Version) -> str:
    history = lake.root / "releases" / "history.jsonl"
    if history.is_file():
        for line in reversed(history.read_text(encoding="utf-8").splitlines()):
            if line.strip() and json.loads(line).get("version") == release.version:
                return str(json.loads(line)["released_at"])[:10]
    return dt.date.today().isoformat()
