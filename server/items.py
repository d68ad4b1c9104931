"""Live item availability: the blocklist, items no Retrieve call returns, changed without a new model.

An operator marks items unavailable (out of stock, taken down) and available again; the next
call honours it. The list lives in one of two places:

- a file (``--blocklist FILE``, the embedded default): one original item id a line, ``#``
  starts a comment. The server looks at the file's size and modification time on every call
  and re-reads it when they change. The commands below replace it atomically; an editor that
  writes it in place may be read half-written, which the server refuses (see below).
- Redis (``--blocklist redis://HOST:PORT/DB``, for a fleet of replicas): the set
  ``nann:blocked`` and the counter ``nann:blocked:version``, bumped in the same transaction as
  every change. A call reads the counter (one round trip) and the set only when it moved.

The server merges the blocked ids into every call's exclusions (blocked items can still be
walked through; they never enter the answer). A list is used whole or not at all: one that does
not parse, or holds more than ``--max-blocklist`` ids, is refused with an error in the log and
``nann_blocklist_errors_total``, and the previous list stays in force. Redis out of reach does the
same (the last list read serves on; retried after a second). Items gone for good belong in the
model, not here: export a version without them (docs/service.md, Live availability).

Command line::

    python -m server.items block   (--redis URL | --file FILE) ITEM [ITEM ...]
    python -m server.items unblock (--redis URL | --file FILE) ITEM [ITEM ...]
    python -m server.items list    (--redis URL | --file FILE)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from nann_common.errors import NannError

logger = logging.getLogger(__name__)

SET_KEY = "nann:blocked"
VERSION_KEY = "nann:blocked:version"
DEFAULT_CAP = 10_000
RETRY_AFTER_S = 1.0


class OverCap(NannError):
    """A blocklist longer than its cap."""


class Blocked(NamedTuple):
    """One state of the blocklist: original item ids (sorted, unique) and what names this state."""

    ids: np.ndarray
    version: str


EMPTY = Blocked(np.zeros(0, np.int64), "empty")


def parse_ids(lines, source: str) -> np.ndarray:
    """Lines of ids (``#`` comments and blank lines allowed) -> sorted unique int64 ids >= 0.

    Raises:
      NannError: naming the first bad line.
    """
    ids = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            value = int(text)
        except ValueError:
            raise NannError(f"{source}, line {number}: {text[:40]!r} is not an item id") from None
        if value < 0:
            raise NannError(f"{source}, line {number}: item ids are >= 0, got {value}")
        ids.append(value)
    return np.unique(np.array(ids, np.int64))


class Blocklist:
    """Where the server reads the blocked items; :meth:`current` never raises."""

    name = "none"

    def __init__(self, cap: int = DEFAULT_CAP, metrics=None):
        self.cap = cap
        self.metrics = metrics
        self._state = EMPTY
        self._generation = 0
        self._lock = threading.Lock()
        self.error: str | None = None  # why the last read was refused, None after a good one

    def current(self) -> Blocked:
        return self._state

    def _accept(self, ids: np.ndarray, version: str) -> None:
        if len(ids) > self.cap:
            raise OverCap(
                f"the blocklist holds {len(ids)} items, more than --max-blocklist {self.cap}; "
                "the previous list stays in force. Unblock items, or take long-gone items out of "
                "the model (a new version) and off the list"
            )
        self._generation += 1  # every accepted read is a new state, whatever its source says
        self._state = Blocked(ids, f"{version}#{self._generation}")
        self.error = None
        if self.metrics is not None:
            self.metrics.blocklist_items.set(len(ids))
        logger.info(json.dumps({"event": "blocklist", "source": self.name, "items": len(ids)}))

    def _refuse(self, reason: str, error: Exception) -> None:
        self.error = str(error)
        if self.metrics is not None:
            self.metrics.blocklist_errors.labels(reason).inc()
        logger.error(json.dumps({"event": "blocklist_refused", "reason": reason, "error": str(error)}))

    def close(self) -> None:
        pass


class FileBlocklist(Blocklist):
    """A text file of ids, re-read when its size or modification time changes."""

    name = "file"

    def __init__(self, path: str | Path, cap: int = DEFAULT_CAP, metrics=None):
        super().__init__(cap, metrics)
        self.path = Path(path)
        self._seen = None
        self.current()

    def current(self) -> Blocked:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        except OSError as e:
            stamp = ("error", str(e))
        if stamp == self._seen:
            return self._state
        with self._lock:
            if stamp == self._seen:
                return self._state
            self._seen = stamp
            try:
                if stamp is None:
                    logger.warning(json.dumps({"event": "blocklist_missing", "path": str(self.path)}))
                    self._accept(np.zeros(0, np.int64), "missing")
                else:
                    with open(self.path, encoding="utf-8") as f:
                        ids = parse_ids(f, str(self.path))
                    self._accept(ids, f"file:{stamp[0]}:{stamp[1]}")
            except (NannError, OSError, UnicodeDecodeError) as e:
                self._refuse("over_cap" if isinstance(e, OverCap) else "malformed", e)
        return self._state


class RedisBlocklist(Blocklist):
    """The Redis set ``nann:blocked``; its version counter is read on every call."""

    name = "redis"

    def __init__(self, url: str, cap: int = DEFAULT_CAP, metrics=None, timeout_s: float = 0.25):
        super().__init__(cap, metrics)
        import redis

        from server.features import redis_client

        self.url = url
        self.client = redis_client(url, timeout_s, pool=8)
        self._errors = redis.exceptions.RedisError
        self._version = None
        self._retry_at = 0.0
        self.current()

    def current(self) -> Blocked:
        now = time.monotonic()
        if now < self._retry_at:
            return self._state
        try:
            version = self.client.get(VERSION_KEY)
            if version == self._version:
                return self._state
            with self._lock:
                pipe = self.client.pipeline(transaction=True)
                pipe.get(VERSION_KEY)
                pipe.smembers(SET_KEY)
                version, members = pipe.execute()
                if version != self._version:
                    try:
                        ids = parse_ids(sorted(m.decode() for m in members), f"redis set {SET_KEY}")
                        self._accept(ids, f"redis:{(version or b'0').decode()}")
                    except NannError as e:
                        self._refuse("over_cap" if isinstance(e, OverCap) else "malformed", e)
                    self._version = version
        except self._errors as e:
            self._retry_at = now + RETRY_AFTER_S
            self._refuse("unreachable", e)
        return self._state

    def close(self) -> None:
        self.client.close()


def open_blocklist(spec: str, cap: int = DEFAULT_CAP, metrics=None, timeout_s: float = 0.25) -> Blocklist:
    """``""`` (none), ``redis://HOST:PORT/DB`` or a file path -> a blocklist, read once.

    Raises:
      NannError: the first read was refused. A server must not start serving blocked items: with
        no previous list to keep, it does not start (a missing file is an empty list).
    """
    if not spec:
        return Blocklist(cap, metrics)
    if spec.startswith(("redis://", "rediss://")):
        blocklist = RedisBlocklist(spec, cap, metrics, timeout_s)
    else:
        blocklist = FileBlocklist(spec, cap, metrics)
    if blocklist.error is not None:
        blocklist.close()
        raise NannError(f"--blocklist {spec}: {blocklist.error}")
    return blocklist


# -- the operator's commands -------------------------------------------------------------------
def _write_file(path: Path, ids: np.ndarray) -> None:
    """Replaces the file atomically (a temporary file in the same directory, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("# blocked item ids (python -m server.items), one a line\n")
            f.writelines(f"{int(i)}\n" for i in ids)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _read_file(path: Path) -> np.ndarray:
    if not path.exists():
        return np.zeros(0, np.int64)
    with open(path, encoding="utf-8") as f:
        return parse_ids(f, str(path))


def change(command: str, items: list[int], *, redis_url: str = "", file: str = "", cap: int = DEFAULT_CAP):
    """block / unblock / list -> the ids blocked afterwards (sorted).

    Raises:
      NannError: a negative id, or a block that would take the list past ``cap`` (nothing written).
    """
    new = np.unique(np.array(items, np.int64))
    if len(new) and new.min() < 0:
        raise NannError(f"item ids are >= 0, got {int(new.min())}")
    if file:
        path = Path(file)
        ids = _read_file(path)
        if command == "list":
            return ids
        after = np.union1d(ids, new) if command == "block" else np.setdiff1d(ids, new)
        if len(after) > cap:
            raise NannError(_over_cap(len(after), cap))
        _write_file(path, after)
        return after
    from server.features import redis_client

    client = redis_client(redis_url, timeout_s=5.0, pool=2)
    try:
        if command == "block":
            # WATCH the version so a concurrent change cannot slip past the cap check.
            with client.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(VERSION_KEY)
                        present = pipe.smismember(SET_KEY, new.tolist()) if len(new) else []
                        total = pipe.scard(SET_KEY) + sum(1 for p in present if not p)
                        if total > cap:
                            raise NannError(_over_cap(total, cap))
                        pipe.multi()
                        pipe.sadd(SET_KEY, *new.tolist())
                        pipe.incr(VERSION_KEY)
                        pipe.execute()
                        break
                    except _watch_error():
                        continue
        elif command == "unblock" and len(new):
            pipe = client.pipeline(transaction=True)
            pipe.srem(SET_KEY, *new.tolist())
            pipe.incr(VERSION_KEY)
            pipe.execute()
        members = client.smembers(SET_KEY)
    finally:
        client.close()
    return np.unique(np.array([int(m) for m in members], np.int64))


def _watch_error():
    import redis

    return redis.exceptions.WatchError


def _over_cap(total: int, cap: int) -> str:
    return (
        f"the blocklist would hold {total} items, more than --max-blocklist {cap}; nothing was "
        "changed. Every call carries the list, so it is kept short: take items gone for good "
        "out of the model (a new version) and unblock them"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.items",
        description="Block and unblock items live: a running server (--blocklist) honours the change "
        "on its next call, with no new model version. Ids are the interactions file's original item ids.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command, text in (
        ("block", "never return these items"),
        ("unblock", "return these items again"),
        ("list", "print the blocked items, one a line"),
    ):
        p = sub.add_parser(command, help=text)
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--redis", help="redis://HOST:PORT/DB (the server's --blocklist redis://...)")
        where.add_argument("--file", help="the server's --blocklist FILE (replaced atomically)")
        if command != "list":
            p.add_argument("items", nargs="+", type=int, metavar="ITEM", help="original item id")
            p.add_argument(
                "--max",
                type=int,
                default=DEFAULT_CAP,
                help=f"refuse to grow the list past this many items (default {DEFAULT_CAP}, "
                "the server's --max-blocklist default)",
            )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    import redis

    try:
        ids = change(
            args.command,
            getattr(args, "items", []),
            redis_url=args.redis or "",
            file=args.file or "",
            cap=getattr(args, "max", DEFAULT_CAP),
        )
    except (NannError, OSError, redis.exceptions.RedisError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "list":
        sys.stdout.writelines(f"{int(i)}\n" for i in ids)
    else:
        print(f"{len(ids)} items blocked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
