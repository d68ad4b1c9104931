"""Artifact directories: readable by other users once in place, and unreadable ones refused with
a message that says how to fix them (a container's non-root server reads a mounted model)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nann_common import artifacts
from nann_common.errors import ArtifactError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_an_artifact_gets_mkdirs_permissions_not_mkdtemps(tmp_path):
    old = os.umask(0o022)
    try:
        with artifacts.atomic_dir(tmp_path / "thing") as tmp:
            (tmp / "data.txt").write_text("x")
            artifacts.write_meta(tmp, {"kind": "thing", "format_version": artifacts.FORMAT_VERSION})
    finally:
        os.umask(old)
    assert _mode(tmp_path / "thing") == 0o755
    artifacts.read_meta(tmp_path / "thing", "thing")


def test_every_directory_of_a_served_model_is_readable_by_others(served_workdir):
    for sub in ("export", "features"):
        for path in [served_workdir / sub, *(served_workdir / sub).rglob("*")]:
            wanted = stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0)
            assert _mode(path) & wanted == wanted, f"{path}: {oct(_mode(path))}"


def test_an_unreadable_artifact_is_refused_with_the_fix(tmp_path, monkeypatch):
    with artifacts.atomic_dir(tmp_path / "thing") as tmp:
        artifacts.write_meta(tmp, {"kind": "thing", "format_version": artifacts.FORMAT_VERSION})

    def denied(self, *args, **kwargs):  # what a non-root user sees on a 0700 directory
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ArtifactError, match=r"permission denied; make the thing readable.*chmod -R a\+rX"):
        artifacts.read_meta(tmp_path / "thing", "thing")
