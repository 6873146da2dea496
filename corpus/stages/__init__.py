"""The pipeline's stages as plain functions: read upstream lake versions, write one new version.

Each stage takes committed upstream `Version`s and a `VersionWriter`, and returns a `StageOutput`
holding the committed version, the counts that must reconcile (`in = out + dropped`), the metric rows
for DuckDB and the figures for Dagster metadata. Dagster assets in `assets/` are thin wrappers around
these; tests and the command line can call them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from corpus.lake import Version


@dataclass
class StageOutput:
    version: Version
    counts: dict[str, Any]
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    markdown: str = ""
