"""Feature stores: a user's recent behaviours (original item ids, oldest first), embedded or in Redis.

Both answer :meth:`FeatureStore.history`. The embedded store maps the snapshot that
``python -m model_export features`` writes (``users.npy``, ``offsets.npy``, ``items.npy``;
schema in its meta.json). The Redis store keeps one capped list per user under
``nann:h:<user_id>`` (RPUSH appends the newest behaviour, LTRIM caps the length), so a
read is one LRANGE and an append is one pipelined RPUSH + LTRIM.

Command line (the real-time feature path)::

    python -m server.features load --snapshot DIR/features --redis redis://127.0.0.1:6379/0
    python -m server.features append --redis redis://127.0.0.1:6379/0 --user U --item I [--item J ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from nann_common import artifacts
from nann_common.errors import ArtifactError, NannError
from server.errors import Unavailable

logger = logging.getLogger(__name__)

SNAPSHOT_KIND = "features"
KEY_PREFIX = "nann:h:"
META_KEY = "nann:features:meta"
DEFAULT_CAP = 50


class FeatureStore:
    """Where the server reads a user's behaviours."""

    name = "store"

    def history(self, user_id: str) -> np.ndarray | None:
        """int64 item ids, oldest first, or None when the store has no such user.

        Raises:
          Unavailable: the store cannot be reached (the caller gets UNAVAILABLE and may retry).
        """
        raise NotImplementedError

    def close(self) -> None:
        pass


class EmbeddedStore(FeatureStore):
    """The snapshot, memory-mapped: no external service, read-only."""

    name = "embedded"

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        meta = artifacts.read_meta(directory, SNAPSHOT_KIND)
        try:
            self.users = np.load(directory / "users.npy", mmap_mode="r")
            self.offsets = np.load(directory / "offsets.npy", mmap_mode="r")
            self.items = np.load(directory / "items.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{directory} is an unreadable feature snapshot ({e}); rebuild it") from e
        if len(self.offsets) != len(self.users) + 1 or int(self.offsets[-1]) != len(self.items):
            raise ArtifactError(f"{directory}: offsets do not match users and items; rebuild the snapshot")
        self.directory = directory
        self.meta = meta
        logger.info("embedded feature store %s: %d users", directory, len(self.users))

    def history(self, user_id: str) -> np.ndarray | None:
        try:
            uid = int(user_id)
        except ValueError:
            return None
        i = int(np.searchsorted(self.users, uid))
        if i >= len(self.users) or int(self.users[i]) != uid:
            return None
        return np.asarray(self.items[int(self.offsets[i]) : int(self.offsets[i + 1])], np.int64)


def redis_client(url: str, timeout_s: float = 0.25, pool: int = 32):
    """A redis-py client with explicit timeouts, pool size and no hidden retries.

    redis-py's defaults (5 s socket timeouts, 10 retries) would hold a request far past any
    deadline; a store that is down must fail fast so the caller gets UNAVAILABLE.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        max_connections=pool,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )


class RedisStore(FeatureStore):
    """One capped Redis list per user; reads fail fast with :class:`Unavailable` when Redis is down."""

    name = "redis"

    def __init__(self, url: str, timeout_s: float = 0.25, pool: int = 32, cap: int | None = None):
        import redis

        self.url = url
        self.client = redis_client(url, timeout_s, pool)
        self._errors = redis.exceptions.RedisError
        self.cap = cap

    def history(self, user_id: str) -> np.ndarray | None:
        start = -self.cap if self.cap else 0
        try:
            raw = self.client.lrange(KEY_PREFIX + user_id, start, -1)
        except self._errors as e:
            raise Unavailable(f"feature store (redis) unreachable: {type(e).__name__}; retry later") from e
        if not raw:
            return None
        try:
            return np.array([int(x) for x in raw], np.int64)
        except ValueError as e:
            raise Unavailable(f"feature store holds a malformed history for user {user_id!r}") from e

    def close(self) -> None:
        self.client.close()


def open_store(spec: str, timeout_s: float = 0.25, pool: int = 32, cap: int | None = None) -> FeatureStore:
    """``embedded:DIR`` or ``redis://HOST:PORT/DB`` -> a store.

    Raises:
      ArtifactError: the embedded snapshot is missing or damaged.
      NannError: an unknown scheme.
    """
    if spec.startswith("embedded:"):
        return EmbeddedStore(spec[len("embedded:") :])
    if spec.startswith(("redis://", "rediss://")):
        return RedisStore(spec, timeout_s, pool, cap)
    raise NannError(f"unknown feature store {spec!r}; use embedded:DIR or redis://HOST:PORT/DB")


def load_snapshot(
    snapshot: str | Path, url: str, cap: int | None = None, batch_users: int = 2000, rows=None
) -> int:
    """Copies a snapshot into Redis, pipelined, replacing each user's list. Returns the users loaded.

    Args:
      rows: optional indices into the snapshot's users to load (a benchmark's sample); default all.
    """
    store = EmbeddedStore(snapshot)
    cap = cap or int(store.meta["params"].get("max_behaviours", DEFAULT_CAP))
    client = redis_client(url, timeout_s=10.0, pool=2)
    order = np.arange(len(store.users)) if rows is None else np.asarray(rows)
    total = len(order)
    started = last_log = time.monotonic()
    for lo in range(0, total, batch_users):
        hi = min(lo + batch_users, total)
        pipe = client.pipeline(transaction=False)
        for i in order[lo:hi].tolist():
            key = KEY_PREFIX + str(int(store.users[i]))
            items = store.items[int(store.offsets[i]) : int(store.offsets[i + 1])][-cap:]
            pipe.delete(key)
            if len(items):
                pipe.rpush(key, *[int(x) for x in items])
        pipe.execute()
        now = time.monotonic()
        if now - last_log >= 5 or hi == total:
            logger.info(
                "loaded %d / %d users into %s (%.0f users/s)", hi, total, url, hi / max(now - started, 1e-9)
            )
            last_log = now
    client.set(META_KEY, artifacts.digest(store.meta))
    client.close()
    return total


def append(url: str, user_id: str, items: list[int], cap: int = DEFAULT_CAP) -> int:
    """Appends behaviours (newest last) to a user's list, keeping the newest ``cap``. Returns its length."""
    client = redis_client(url, timeout_s=5.0, pool=2)
    key = KEY_PREFIX + user_id
    pipe = client.pipeline(transaction=True)
    pipe.rpush(key, *items)
    pipe.ltrim(key, -cap, -1)
    pipe.llen(key)
    length = pipe.execute()[-1]
    client.close()
    return int(length)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.features",
        description="Load a feature snapshot into Redis, or append behaviours.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    lo = sub.add_parser("load", help="copy DIR/features into Redis (replaces each user's list)")
    lo.add_argument("--snapshot", required=True, help="a feature snapshot (python -m model_export features)")
    lo.add_argument("--redis", required=True, help="redis://HOST:PORT/DB")
    lo.add_argument(
        "--cap", type=int, default=None, help="behaviours kept per user (default: the snapshot's)"
    )
    ap = sub.add_parser("append", help="append behaviours to a user's list: the next Retrieve sees them")
    ap.add_argument("--redis", required=True, help="redis://HOST:PORT/DB")
    ap.add_argument("--user", required=True, help="user id")
    ap.add_argument("--item", type=int, action="append", required=True, help="item id (repeat for several)")
    ap.add_argument("--cap", type=int, default=DEFAULT_CAP, help=f"list length kept (default {DEFAULT_CAP})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    import redis

    try:
        if args.command == "load":
            n = load_snapshot(args.snapshot, args.redis, args.cap)
            print(f"loaded {n} users into {args.redis}")
        else:
            if args.cap < 1:
                raise NannError(f"--cap must be >= 1, got {args.cap}")
            length = append(args.redis, args.user, args.item, args.cap)
            print(f"user {args.user}: {length} behaviours")
    except (NannError, redis.exceptions.RedisError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
