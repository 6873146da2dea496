"""What the Dagster UI shows for a lake that `corpus run` made: the real dagster-webserver, asked over GraphQL.

The server runs as a subprocess in its own process group on a free loopback port, loading
`orchestration.definitions` from $CORPUS_SOURCES / $CORPUS_LAKE and the lake's Dagster home, as
`dagster-webserver -m orchestration.definitions` does for a user (read-only: the test only looks). Every
asset of the Definitions must be loaded and materialized, every partition of the partitioned ones, and
each latest materialization must carry the lake version id (the manifest's content hash) three ways: the
`version` metadata entry, the `dagster/data_version` tag and the asset's data version. Those ids must be
the lake's versions, a set closed under `corpus.release.lineage`.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from test_pipeline import tiny_manifest  # pytest's default (prepend) import mode puts tests/ on sys.path

from corpus.lake import UNPARTITIONED, Lake, Version
from corpus.release import latest_release, lineage
from orchestration import cli
from orchestration.definitions import build_definitions
from orchestration.resources import ENV_LAKE, ENV_SOURCES, LakePaths

# The graph as it stood at 13 assets; assets added since are checked the same way, from the Definitions.
CORE_ASSETS = {
    "raw_documents",
    "filtered_documents",
    "minhash_signatures",
    "duplicate_clusters",
    "deduplicated_documents",
    "tokenized_documents",
    "mixture_plan",
    "mixed_tokens",
    "training_windows",
    "packed_sequences",
    "dataset_release",
    "smoke_training",
    "poisoning_scan",
}
CORE_PARTITIONED = {
    "raw_documents",
    "filtered_documents",
    "minhash_signatures",
    "deduplicated_documents",
    "tokenized_documents",
}
SOURCES = ["docs", "books", "chat", "web"]  # tiny_manifest's order, which is the partitions' order
# Measured on this project's 2-core machine: loaded 3.5 s idle, 16-20 s at load average 11 (the code server
# importing dagster and torch is most of it). 90 s only bounds a hung start; it is not a speed assertion.
STARTUP_DEADLINE_S = 90.0
STOP_GRACE_S = 20.0

EVENT = """
    partition
    tags { key value }
    metadataEntries {
      label
      ... on TextMetadataEntry { text }
      ... on PathMetadataEntry { path }
    }
"""
ASSET_NODES = f"""
{{
  assetNodes {{
    assetKey {{ path }}
    isPartitioned
    isMaterializable
    partitionKeys
    dataVersion
    partitionStats {{ numMaterialized numPartitions numFailed numMaterializing }}
    assetMaterializations(limit: 1) {{ {EVENT} }}
    latestMaterializationByPartition {{ {EVENT} }}
  }}
}}
"""
# dataVersionByPartition fails on an unpartitioned node ("Asset node has no partitions definition"),
# so it is asked only of the partitioned ones.
PARTITION_VERSIONS = """
query PartitionVersions($keys: [AssetKeyInput!]) {
  assetNodes(assetKeys: $keys) { assetKey { path } partitionKeys dataVersionByPartition }
}
"""
WORKSPACE = """
{
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError { __typename ... on PythonError { message } }
      }
    }
    ... on PythonError { message }
  }
}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def graphql(port: int, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"GraphQL HTTP {exc.code}: {exc.read().decode()[:2000]}") from exc
    assert not answer.get("errors"), f"GraphQL errors: {json.dumps(answer['errors'])[:2000]}"
    return answer["data"]


def start_webserver(root: Path, manifest: Path, lake: Path, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    env = dict(os.environ)
    env.update({"DAGSTER_HOME": str(LakePaths(lake).dagster_home), ENV_SOURCES: str(manifest), ENV_LAKE: str(lake)})
    executable = Path(sys.executable).with_name("dagster-webserver")
    command = [str(executable)] if executable.is_file() else [sys.executable, "-m", "dagster_webserver"]
    command += ["-h", "127.0.0.1", "-p", str(port), "-m", "orchestration.definitions", "--read-only"]
    log = root / "webserver.log"
    with open(log, "wb") as handle:
        # Its own session (process group): SIGTERM to the group reaches the code server it spawns too.
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    return process, log


def wait_until_loaded(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Poll until the code location is LOADED; fail at once if the server dies or the location errors."""
    deadline = time.monotonic() + STARTUP_DEADLINE_S
    last = "no answer yet"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"dagster-webserver exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            workspace = graphql(port, WORKSPACE)["workspaceOrError"]
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            last = repr(exc)
        else:
            assert workspace["__typename"] == "Workspace", workspace
            [entry] = workspace["locationEntries"]
            error = entry["locationOrLoadError"]
            assert error is None or error["__typename"] != "PythonError", f"code location failed: {error}"
            if entry["loadStatus"] == "LOADED":
                return
            last = f"location {entry['name']} {entry['loadStatus']}"
        time.sleep(0.25)
    raise AssertionError(
        f"dagster-webserver not loaded after {STARTUP_DEADLINE_S} s ({last}):\n{log.read_text()[-3000:]}"
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=STOP_GRACE_S)
    try:  # the code server child may outlive its parent by a moment
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def recorded_version(event: dict[str, Any]) -> tuple[str, str, str]:
    """(version metadata, manifest path metadata, dagster/data_version tag) of one materialization."""
    entries = {entry["label"]: entry for entry in event["metadataEntries"]}
    tags = {tag["key"]: tag["value"] for tag in event["tags"]}
    return entries["version"]["text"], entries["manifest"]["path"], tags["dagster/data_version"]


def test_webserver_shows_every_asset_materialized_with_its_lake_version(tmp_path: Path) -> None:
    manifest = tiny_manifest(tmp_path / "corpus")
    lake_root = tmp_path / "lake"
    assert cli.main(["run", "--sources", str(manifest), "--lake", str(lake_root)]) == 0

    defs = build_definitions(manifest, lake_root)
    graph = defs.resolve_asset_graph()
    assets = {key.to_user_string() for key in graph.get_all_asset_keys()}
    partitioned = {key.to_user_string() for key in graph.get_all_asset_keys() if graph.get(key).partitions_def}
    assert assets >= CORE_ASSETS and partitioned >= CORE_PARTITIONED

    # What the lake says, without Dagster: one run wrote one version per asset and partition (reading
    # each back checks its manifest hash), and their lineage is closed: every upstream reference
    # recorded in a manifest points at one of these same versions.
    lake = Lake(lake_root)
    expected: dict[tuple[str, str], Version] = {}
    for asset in sorted(assets):
        for partition in SOURCES if asset in partitioned else [None]:
            # dot-entries (e.g. `.inputs`) are the lake's own bookkeeping, not versions
            [directory] = [d for d in lake.partition_dir(asset, partition).iterdir() if not d.name.startswith(".")]
            version = lake.open(asset, partition, directory.name)
            expected[asset, version.partition] = version
    closure = {(v.asset, v.partition, v.version) for v in lineage(lake, expected.values())}
    assert closure == {(asset, partition, v.version) for (asset, partition), v in expected.items()}
    assert expected["dataset_release", UNPARTITIONED].version == latest_release(lake_root).version

    port = free_port()
    process, log = start_webserver(tmp_path, manifest, lake_root, port)
    try:
        wait_until_loaded(process, port, log)
        nodes = {tuple(node["assetKey"]["path"]): node for node in graphql(port, ASSET_NODES)["assetNodes"]}
        assert set(nodes) == {(asset,) for asset in assets}
        seen: dict[tuple[str, str], tuple[str, str, str]] = {}
        for (asset,), node in nodes.items():
            assert node["isMaterializable"], asset
            assert node["isPartitioned"] == (asset in partitioned), asset
            if asset in partitioned:
                assert node["partitionKeys"] == SOURCES
                assert node["partitionStats"] == {
                    "numMaterialized": 4,
                    "numPartitions": 4,
                    "numFailed": 0,
                    "numMaterializing": 0,
                }, asset
                events = node["latestMaterializationByPartition"]
                assert sorted(event["partition"] for event in events) == sorted(SOURCES), asset
                for event in events:
                    seen[asset, event["partition"]] = recorded_version(event)
            else:
                assert node["partitionKeys"] == [] and node["partitionStats"] is None, asset
                [event] = node["assetMaterializations"]
                assert event["partition"] is None, asset
                seen[asset, UNPARTITIONED] = recorded_version(event)
                assert node["dataVersion"] == expected[asset, UNPARTITIONED].version, asset
        assert set(seen) == set(expected)
        for key, (metadata_version, manifest_path, tag_version) in seen.items():
            version = expected[key]
            assert metadata_version == tag_version == version.version, key
            assert manifest_path == str(version.manifest_path), key

        keys = [{"path": [asset]} for asset in sorted(partitioned)]
        answered = set()
        for node in graphql(port, PARTITION_VERSIONS, {"keys": keys})["assetNodes"]:
            [asset] = node["assetKey"]["path"]
            by_partition = dict(zip(node["partitionKeys"], node["dataVersionByPartition"], strict=True))
            assert by_partition == {source: expected[asset, source].version for source in SOURCES}, asset
            answered.add(asset)
        assert answered == partitioned
    finally:
        stop(process)
