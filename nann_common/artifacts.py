"""Versioned workdir artifacts: atomic directory writes, provenance and checksums.

Every stage writes its output as one directory holding data files plus
``meta.json``. The directory is first assembled under a hidden temporary name
inside the workdir and renamed into place only when complete, so a failed run
never leaves a half-written artifact. ``meta.json`` records what produced the
artifact (command, parameters, input checksums, package versions) and the
sha256 of every file, which :func:`read_meta` verifies on load.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from nann_common.errors import ArtifactError

META_FILE = "meta.json"
FORMAT_VERSION = 1
_PACKAGES = ("tensorflow", "keras", "numpy", "pandas", "hnswlib")


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Returns the hex sha256 of a file, read in chunks so any size fits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages whose behaviour shapes the artifacts."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def provenance(kind: str, params: dict, inputs: dict | None = None) -> dict:
    """Builds the provenance block stored in every ``meta.json``.

    Args:
      kind: artifact kind, e.g. ``"dataset"`` or ``"model"``.
      params: the parameters that produced it (JSON-serialisable).
      inputs: input name -> checksum (or any JSON value identifying the input).
    """
    return {
        "kind": kind,
        "format_version": FORMAT_VERSION,
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "params": params,
        "inputs": inputs or {},
        "packages": package_versions(),
    }


def temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """``tempfile.mkdtemp`` in ``parent`` with the permissions ``mkdir`` would give (0777 & ~umask).

    mkdtemp creates 0700, which a renamed artifact would keep: a server running as another user
    (a container's non-root user reading a mounted model) could not read it.
    """
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary directory that replaces ``final`` only if the block succeeds.

    The temporary directory lives beside ``final`` (same filesystem, so the
    rename is atomic) and is removed on any exception. An existing ``final`` is
    replaced only after the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(final.parent, f".{final.name}.tmp-")
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_meta(directory: str | os.PathLike, meta: dict) -> dict:
    """Adds the checksum of every file under ``directory`` to ``meta`` and writes ``directory/meta.json``."""
    directory = Path(directory)
    files = {
        p.relative_to(directory).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p != directory / META_FILE
    }
    meta = {**meta, "files": files}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def read_meta(directory: str | os.PathLike, kind: str, verify: bool = True) -> dict:
    """Reads ``meta.json`` of an artifact and verifies its kind and file checksums.

    Raises:
      ArtifactError: the artifact is missing, of another kind, or a file is
        missing or does not match its recorded checksum.
    """
    directory = Path(directory)
    try:
        return _read_meta(directory, kind, verify)
    except PermissionError as e:
        raise ArtifactError(
            f"{e.filename or directory}: permission denied; make the {kind} readable by this user "
            f"(uid {os.getuid()}), e.g. chmod -R a+rX {directory}"
        ) from e
    except OSError as e:
        raise ArtifactError(f"{e.filename or directory}: cannot read the {kind} ({e.strerror or e})") from e


def _read_meta(directory: Path, kind: str, verify: bool) -> dict:
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise ArtifactError(
            f"{directory} holds no {kind} artifact ({META_FILE} is missing); "
            "run the stage that produces it first"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{meta_path} is not valid JSON ({e}); rebuild the {kind}") from e
    if meta.get("kind") != kind:
        raise ArtifactError(f"{directory} holds a {meta.get('kind')!r} artifact, expected {kind!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{directory} has format version {meta.get('format_version')}, this code reads "
            f"{FORMAT_VERSION}; rebuild the {kind}"
        )
    if verify:
        for name, info in meta.get("files", {}).items():
            path = directory / name
            if not path.is_file():
                raise ArtifactError(f"{path} is missing; the {kind} artifact is incomplete, rebuild it")
            if sha256_file(path) != info["sha256"]:
                raise ArtifactError(
                    f"{path} does not match its recorded sha256; the {kind} is damaged, rebuild it"
                )
    return meta


def digest(meta: dict) -> str:
    """One sha256 naming an artifact's content: the hash of its files' checksums."""
    files = {name: info["sha256"] for name, info in meta.get("files", {}).items()}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
