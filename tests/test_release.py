"""corpus.release.point_latest: the release pointer and its history survive a kill at any point."""

from __future__ import annotations

import json
from pathlib import Path

from corpus.lake import Lake, Version
from corpus.release import latest_release, point_latest


def release(lake: Lake, tag: str) -> Version:
    with lake.writer("dataset_release") as writer:
        writer.path("release.json").write_text(tag, encoding="utf-8")
        return writer.commit(code_version="test", config={"tag": tag}, extra={"merkle_root": f"root-{tag}"})


def history(lake: Lake) -> list[str]:
    return [json.loads(line)["version"] for line in (lake.root / "releases" / "history.jsonl").read_text().splitlines()]


def test_pointing_again_at_the_latest_adds_no_history_line(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    a, b = release(lake, "a"), release(lake, "b")
    point_latest(lake, a)
    point_latest(lake, a)  # a rerun after a kill between the history line and the pointer
    point_latest(lake, b)
    point_latest(lake, a)  # going back to an older release is a new event
    assert history(lake) == [a.version, b.version, a.version]
    assert latest_release(lake.root).version == a.version


def test_dead_writers_pointer_file_is_removed_and_a_torn_line_stays_alone(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    a = release(lake, "a")
    releases = lake.root / "releases"
    releases.mkdir()
    stale = releases / ".tmp-999999999-LATEST"  # no such pid: its writer died before the rename
    stale.write_text("{}", encoding="utf-8")
    (releases / "history.jsonl").write_text('{"version": "x"}\n{"vers', encoding="utf-8")  # killed mid-line
    point_latest(lake, a)
    assert not stale.exists()
    lines = (releases / "history.jsonl").read_text().splitlines()
    assert lines[1] == '{"vers' and json.loads(lines[2])["version"] == a.version
    assert sorted(p.name for p in releases.iterdir()) == ["LATEST", "history.jsonl"]
