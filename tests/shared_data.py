"""The reference texts in ../shared beside the repository (CI has them; a user's fresh clone does not).

Tests that need one call `shared_text`: where ../shared is missing they are skipped, saying what is missing,
instead of failing, so the README's `make test` passes on a machine that has never seen ../shared.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


def shared_path(relative: str) -> Path:
    """../shared/<relative>, or skip the test that asked for it."""
    path = SHARED / relative
    if not path.is_file():
        pytest.skip(f"{path} is not there (../shared comes with CI, not with a clone)")
    return path


def shared_text(relative: str) -> str:
    return shared_path(relative).read_text(encoding="utf-8")
