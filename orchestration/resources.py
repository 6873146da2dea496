"""The pipeline resource: where the sources manifest, the lake and the metrics database are."""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
from pydantic import Field

from corpus.config import SourcesManifest, load_manifest
from corpus.lake import Lake
from corpus.metrics import MetricsStore

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCES = REPO_ROOT / "data" / "sources.yaml"
DEFAULT_LAKE = REPO_ROOT / "data" / "lake"
ENV_SOURCES = "CORPUS_SOURCES"
ENV_LAKE = "CORPUS_LAKE"


@dataclass(frozen=True)
class LakePaths:
    """Everything a run writes lives under one lake directory: versions, metrics and the Dagster home."""

    root: Path

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.duckdb"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster_home"

    @property
    def releases(self) -> Path:
        return self.root / "releases"


def default_sources() -> Path:
    return Path(os.environ.get(ENV_SOURCES) or DEFAULT_SOURCES).expanduser().resolve()


def default_lake() -> Path:
    return lake_path(os.environ.get(ENV_LAKE) or str(DEFAULT_LAKE))


def lake_path(value: str) -> Path:
    """A local lake directory from a path or a file:// URL, the directory `corpus push --to` writes for it
    (fsspec takes the URL's path as is, %-escapes included, so this does too).

    ValueError for a URL of another protocol: the pipeline writes and reads local directories.
    """
    if value.startswith("file://"):
        parsed = urllib.parse.urlparse(value)
        if parsed.netloc:  # fsspec would read file://host/x as the relative path host/x
            raise ValueError(f"{value}: a file:// URL with a host ({parsed.netloc}); write file:///path")
        value = parsed.path
    elif "://" in value:
        raise ValueError(f"{value} is a remote lake, not a local directory")
    return Path(value).expanduser().resolve()


class PipelineResource(dg.ConfigurableResource):
    """The sources manifest to read and the lake to write (versions, metrics.duckdb)."""

    sources: str = Field(description="Path of the sources manifest (YAML): the sources and pipeline settings.")
    lake: str = Field(description="Lake directory: asset versions, metrics.duckdb and the Dagster home.")

    def manifest(self) -> SourcesManifest:
        return load_manifest(self.sources)

    def store(self) -> Lake:
        return Lake(self.lake)

    def metrics(self) -> MetricsStore:
        return MetricsStore(LakePaths(Path(self.lake)).metrics)
