"""Shared test fixtures: paths to the real sample data beside the project."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(
            f"real sample data not found at {path} (it sits in ../shared/data on developer machines and CI)"
        )
    return path


@pytest.fixture
def movielens_dir() -> Path:
    """Directory of MovieLens ml-latest-small (ratings.csv, movies.csv)."""
    return _require(SHARED_DATA / "movielens-small")


@pytest.fixture
def userbehavior_csv() -> Path:
    """The 4,320-row sample of the Taobao UserBehavior file."""
    return _require(SHARED_DATA / "userbehavior-sample" / "UserBehavior.csv")
