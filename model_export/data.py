"""Loads interaction logs into time-ordered user sequences with the paper's user split."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from nann_common import artifacts
from nann_common.errors import ArtifactError, InputError

logger = logging.getLogger(__name__)

BEHAVIOUR_TYPES = ("pv", "buy", "cart", "fav")
FORMATS = ("userbehavior", "movielens")
PAD = -1  # padding value in history arrays

# Bytes parsed per vectorised block: large enough to amortise pandas' per-call cost,
# small enough that one block's DataFrame is a few hundred MB. Tests set it tiny.
BLOCK_BYTES = 64 << 20
UNKNOWN_CATEGORY = "(unknown)"
EVAL_USERS_LARGE = 10_000  # valid/test users each when at least LARGE_CORPUS_USERS survive
LARGE_CORPUS_USERS = 100_000
_MAX_EXAMPLES = 5
_ARRAYS_FILE = "dataset.npz"
_USERBEHAVIOR_FIELDS = (
    ("user_id", "id"),
    ("item_id", "id"),
    ("category_id", "id"),
    ("behavior_type", "behaviour"),
    ("timestamp", "int"),
)
_RATINGS_FIELDS = (("userId", "id"), ("movieId", "id"), ("rating", "float"), ("timestamp", "int"))
_RATINGS_HEADER = "userId,movieId,rating,timestamp"
_INT64_MAX = np.iinfo(np.int64).max
_NUMPY_DTYPES = {"id": np.int64, "int": np.int64, "float": np.float64, "behaviour": np.int8}


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value, compare fields explicitly
class Dataset:
    """Users' time-ordered behaviour sequences over a dense item corpus, split by user.

    Every user's behaviours are one contiguous slice of ``seq_items``, so histories
    and targets are index arithmetic on ``offsets`` and never copy per user.
    """

    item_ids: np.ndarray  # [N] int64 original item id of dense item i (ascending)
    item_category: np.ndarray  # [N] int32 dense category of item i
    category_names: np.ndarray  # [C] str original category label
    user_ids: np.ndarray  # [U] int64 original id of dense user u (kept users only)
    offsets: np.ndarray  # [U+1] int64; user u owns seq_items[offsets[u]:offsets[u+1]]
    seq_items: np.ndarray  # [T] int32 dense item ids, time-ordered within each user
    seq_timestamps: np.ndarray  # [T] int64
    train_users: np.ndarray  # int32 sorted dense user indices
    valid_users: np.ndarray
    test_users: np.ndarray
    meta: dict

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_categories(self) -> int:
        return len(self.category_names)

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    def ground_truth_positions(self, users) -> np.ndarray:
        """Absolute index of each user's ceil(l/2)-th behaviour, the paper's held-out target."""
        users = np.asarray(users, dtype=np.int64)
        start = self.offsets[users]
        length = self.offsets[users + 1] - start
        return start + (length + 1) // 2 - 1

    def sample_histories(self, users: int, max_len: int, seed: int = 0) -> np.ndarray:
        """Real behaviour histories of ``users`` seeded users: each one's most recent ``max_len``
        behaviours before its last, [min(users, U), max_len] int64 ORIGINAL item ids, ``PAD`` padded
        (what a caller sends)."""
        rng = np.random.default_rng(seed)
        chosen = rng.choice(self.num_users, size=min(users, self.num_users), replace=False)
        dense = self.histories(np.maximum(self.offsets[chosen + 1] - 1, 0), max_len)
        return np.where(dense >= 0, self.item_ids[np.maximum(dense, 0)], PAD).astype(np.int64)

    def histories(self, positions, max_len: int = 50) -> np.ndarray:
        """Behaviours of the same user strictly before each position, oldest first.

        Vectorised because training calls it once per batch.

        Args:
          positions: absolute indices into ``seq_items``.
          max_len: history length; longer histories keep their most recent behaviours.

        Returns:
          [n, max_len] int32, right-padded with ``PAD``.
        """
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {max_len}")
        if positions.size and (positions.min() < 0 or positions.max() >= len(self.seq_items)):
            raise ValueError(f"positions must lie in 0..{len(self.seq_items) - 1}")
        user = np.searchsorted(self.offsets, positions, side="right") - 1
        start = np.maximum(self.offsets[user], positions - max_len)
        steps = np.arange(max_len, dtype=np.int64)
        index = start[:, None] + steps[None, :]
        valid = steps[None, :] < (positions - start)[:, None]
        return np.where(valid, self.seq_items[np.where(valid, index, 0)], PAD).astype(np.int32)

    def eval_examples(self, split: str, max_len: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(users, histories, targets) of the "valid" or "test" users, one example each."""
        users = {"valid": self.valid_users, "test": self.test_users}.get(split)
        if users is None:
            raise ValueError(f"split must be 'valid' or 'test', got {split!r}")
        positions = self.ground_truth_positions(users)
        return users.astype(np.int32), self.histories(positions, max_len), self.seq_items[positions]

    def train_positions(self) -> np.ndarray:
        """Every position of a training user that has at least one behaviour before it."""
        users = self.train_users.astype(np.int64)
        first = self.offsets[users] + 1
        count = np.maximum(self.offsets[users + 1] - first, 0)
        run_start = np.cumsum(count) - count  # where each user's run begins in the output
        return np.repeat(first - run_start, count) + np.arange(count.sum(), dtype=np.int64)

    def item_counts(self, users) -> np.ndarray:
        """[N] int64 behaviour count per item over the given users, e.g. the noise distribution."""
        selected = np.zeros(self.num_users, dtype=bool)
        selected[np.asarray(users, dtype=np.int64)] = True
        rows = np.repeat(selected, np.diff(self.offsets))
        return np.bincount(self.seq_items[rows], minlength=self.num_items).astype(np.int64)


class _RowProblems:
    """Collects malformed rows: raises on the first unless skipping, else counts them."""

    def __init__(self, path: Path, skip: bool, fields):
        self.path, self.skip, self.fields = path, skip, fields
        self.count = 0
        self.examples: list[str] = []

    def add(self, line_no: int, problem: str) -> None:
        where = f"{self.path}:{line_no}"
        if not self.skip:
            columns = ",".join(name for name, _ in self.fields)
            raise InputError(
                f"{where}: {problem}. Each row must be {columns}; fix or delete that line, "
                "or pass --skip-bad-rows (skip_bad_rows=True) to skip malformed rows"
            )
        self.count += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{where}: {problem}")

    def report(self) -> None:
        if self.count:
            logger.warning(
                "skipped %d malformed rows in %s; first examples: %s",
                self.count,
                self.path,
                "; ".join(self.examples),
            )


def _parse_int(raw: bytes) -> int | None:
    """Parses an integer the way pandas' C parser does, which also accepts "2.0" and "1e3"."""
    if b"_" in raw:  # Python's int() takes "1_000", pandas does not
        return None
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        value = float(raw)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def _parse_field(raw: bytes, name: str, kind: str):
    """Parses one field, returning (value, None) or (None, what is wrong with it)."""
    text = raw.decode("utf-8", "replace")
    if kind == "behaviour":
        if text in BEHAVIOUR_TYPES:
            return BEHAVIOUR_TYPES.index(text), None
        return None, f"unknown {name} {text!r}; accepted types are {', '.join(BEHAVIOUR_TYPES)}"
    if kind == "float":
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        return (value, None) if math.isfinite(value) else (None, f"{name} {text!r} is not a number")
    value = _parse_int(raw)
    if value is None:
        return None, f"{name} {text!r} is not an integer"
    if abs(value) > _INT64_MAX:
        return None, f"{name} {text!r} does not fit in 64 bits"
    if kind == "id" and value < 0:
        return None, f"{name} {text!r} is negative; ids must be non-negative integers"
    return value, None


def _parse_line(line: bytes, fields) -> list | str:
    """Parses one line into its values, or returns what is wrong with it."""
    raw = line.split(b",")
    if len(raw) != len(fields):
        return f"expected {len(fields)} comma-separated fields, found {len(raw)}"
    values = []
    for (name, kind), value in zip(fields, raw, strict=True):
        parsed, problem = _parse_field(value.strip(), name, kind)
        if problem:
            return problem
        values.append(parsed)
    return values


def _plain_line_pattern(fields) -> re.Pattern:
    """Regex of a plainly well-formed line, which the scan accepts without parsing it.

    At most 18 digits, so every number it accepts fits in int64.
    """
    kinds = {
        "id": rb"\d{1,18}",
        "int": rb"-?\d{1,18}",
        "float": rb"\d{1,18}(?:\.\d{1,18})?",
        "behaviour": rb"(?:pv|buy|cart|fav)",
    }
    return re.compile(rb",".join(kinds[kind] for _, kind in fields) + rb"\r?")


def _scan_block(block: bytes, first_line: int, fields, problems: _RowProblems) -> list[np.ndarray]:
    """Finds the exact bad lines of a block the vectorised parse refused; returns its good rows."""
    plain = _plain_line_pattern(fields)
    good: list[bytes] = []
    for line_no, line in enumerate(block.split(b"\n"), start=first_line):
        if plain.fullmatch(line):
            good.append(line)
            continue
        if not line.strip():
            continue  # pandas skips blank lines; so do we
        parsed = _parse_line(line.rstrip(b"\r"), fields)
        if isinstance(parsed, str):
            if line_no == 1 and fields is _USERBEHAVIOR_FIELDS:
                parsed += " (UserBehavior.csv has no header line; delete it)"
            problems.add(line_no, parsed)
        else:
            good.append(line)
    columns = _parse_block_fast(b"\n".join(good) + b"\n", fields)
    if columns is None:  # a line Python accepts but pandas does not: parse the good lines here
        rows = [_parse_line(line.rstrip(b"\r"), fields) for line in good]
        columns = [np.array([row[i] for row in rows], dtype=dtype) for i, dtype in enumerate(_dtypes(fields))]
    return columns


def _parse_block_fast(block: bytes, fields) -> list[np.ndarray] | None:
    """Vectorised parse; None when the block needs the line-by-line scan."""
    # Behaviour types are read as a category (a handful of strings) and mapped to codes below.
    dtypes = {name: "category" if kind == "behaviour" else _NUMPY_DTYPES[kind] for name, kind in fields}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)  # e.g. extra fields on row 1
            warnings.simplefilter("ignore", RuntimeWarning)  # e.g. "1e30" overflowing a cast
            frame = pd.read_csv(
                io.BytesIO(block),
                header=None,
                names=[name for name, _ in fields],
                dtype=dtypes,
                engine="c",
                quoting=csv.QUOTE_NONE,
                index_col=False,
            )
    except (ValueError, OverflowError, pd.errors.ParserWarning):
        return None
    columns = []
    for name, kind in fields:
        series = frame[name]
        if kind == "behaviour":
            lookup = np.array(
                [BEHAVIOUR_TYPES.index(c) if c in BEHAVIOUR_TYPES else -1 for c in series.cat.categories]
                + [-1],
                dtype=np.int8,
            )
            values = lookup[series.cat.codes.to_numpy()]  # code -1 (missing) maps to the last entry
            bad = values < 0
        else:
            values = series.to_numpy()
            bad = values < 0 if kind == "id" else (~np.isfinite(values) if kind == "float" else None)
        if bad is not None and bad.any():
            return None
        columns.append(values)
    return columns


def _read_rows(path: Path, fields, problems: _RowProblems, header: str | None = None):
    """Reads a CSV in byte blocks split at newlines, hashing it on the way.

    Returns:
      (one numpy array per field, sha256 hex of the whole file)
    """
    parts: list[list[np.ndarray]] = [[] for _ in fields]
    digest = hashlib.sha256()
    line_no, carry, first = 1, b"", True
    try:
        f = open(path, "rb")  # closed by the with-block below
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}; check its permissions") from e
    with (
        f,
        tqdm(
            total=os.path.getsize(path), unit="B", unit_scale=True, disable=None, desc=path.name
        ) as progress,
    ):
        while True:
            chunk = f.read(BLOCK_BYTES)
            digest.update(chunk)
            progress.update(len(chunk))
            buffer = carry + chunk
            cut = len(buffer) if not chunk else buffer.rfind(b"\n") + 1  # at end of file, take the rest
            if cut == 0:
                if not chunk:
                    break
                carry = buffer  # a line longer than one block: keep reading
                continue
            block, carry = buffer[:cut], buffer[cut:]
            if first and header is not None:
                end = block.find(b"\n") + 1 or len(block)
                found = block[:end].decode("utf-8", "replace").strip().lstrip("\ufeff")
                if found != header:
                    raise InputError(
                        f"{path}:1: header is {found!r}, expected {header!r}; "
                        "point at the ratings.csv of a MovieLens ml-latest(-small) download"
                    )
                block, line_no = block[end:], 2
            first = False
            columns = _parse_block_fast(block, fields)
            if columns is None:
                columns = _scan_block(block, line_no, fields, problems)
            for part, column in zip(parts, columns, strict=True):
                part.append(column)
            line_no += block.count(b"\n")
            if not chunk:
                break
    columns = []
    for part, dtype in zip(parts, _dtypes(fields), strict=True):
        columns.append(np.concatenate(part).astype(dtype, copy=False) if part else np.zeros(0, dtype))
        part.clear()  # free each column's pieces before joining the next one
    if first:
        raise InputError(f"{path}:1: the file is empty; {_expected(fields, header)}")
    return columns, digest.hexdigest()


def _dtypes(fields) -> list[type]:
    return [_NUMPY_DTYPES[kind] for _, kind in fields]


def _expected(fields, header: str | None) -> str:
    if header:
        return f"expected the header {header!r} followed by one rating per line"
    return f"expected one {','.join(name for name, _ in fields)} row per line, no header"


def _read_movies(path: Path) -> pd.DataFrame:
    """movies.csv as movieId -> genres (titles may hold quoted commas, so pandas parses it)."""
    if not path.is_file():
        raise InputError(
            f"{path} not found: MovieLens movies.csv (movieId,title,genres) must sit beside ratings.csv"
        )
    try:
        movies = pd.read_csv(
            path, dtype={"movieId": "int64", "title": str, "genres": str}, keep_default_na=False
        )
    except (ValueError, OverflowError) as e:
        raise InputError(
            f"{path}: cannot parse movies.csv ({e}); restore it from the MovieLens download"
        ) from e
    if list(movies.columns[:1]) != ["movieId"] or "genres" not in movies.columns:
        raise InputError(
            f"{path}:1: header is {','.join(map(str, movies.columns))!r}, expected 'movieId,title,genres'"
        )
    return movies.drop_duplicates("movieId")


def _split_users(num_users: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random train/valid/test users: 10,000 eval users each on large data, else 10% each."""
    per_split = EVAL_USERS_LARGE if num_users >= LARGE_CORPUS_USERS else max(1, num_users // 10)
    order = np.random.default_rng(seed).permutation(num_users).astype(np.int32)
    valid, test, train = np.split(order, [per_split, 2 * per_split])
    return np.sort(train), np.sort(valid), np.sort(test)


def _first_rows(codes: np.ndarray, num_codes: int) -> np.ndarray:
    """Row index where each code first appears."""
    rows = pd.Series(codes).drop_duplicates().index.to_numpy()
    first = np.empty(num_codes, dtype=np.int64)
    first[codes[rows]] = rows
    return first


def _stable_time_order(users: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """Permutation that sorts rows grouped by user by time within each user, ties in file order."""
    span = int(timestamps.max()) - int(timestamps.min()) + 1
    if (int(users.max()) + 1) * span >= 2**63:  # one int64 key would overflow: slower two-key sort
        return np.lexsort((timestamps, users))
    # One combined key: rows are already grouped by user, so the stable sort is nearly linear.
    key = users.astype(np.int64) * span + (timestamps - timestamps.min())
    return np.argsort(key, kind="stable")


def _build(path: Path, rows: dict, item_labels, min_behaviours: int, seed: int, meta: dict) -> Dataset:
    """Dense ids, per-user time order, the min_behaviours filter and the user split.

    Args:
      rows: "users", "items", "timestamps" arrays; popped as soon as they are used so
        that the full file is not held twice.
      item_labels: ``item_labels(first_rows, item_ids)`` gives every item's category
        label from the row where the item first appears.
    """
    # Hash-based factorize is several times faster than np.unique on 100M rows.
    item_dense, item_ids = pd.factorize(rows.pop("items"), sort=True)
    first_rows = _first_rows(item_dense, len(item_ids))
    category_values, item_category = np.unique(item_labels(first_rows, item_ids), return_inverse=True)
    del first_rows
    user_dense, user_values = pd.factorize(rows.pop("users"), sort=True)
    user_dense = user_dense.astype(np.int32)
    timestamps = rows.pop("timestamps")

    # Stable sort by user keeps file order within a user; re-sort by time only if needed.
    order = np.argsort(user_dense, kind="stable")
    sorted_users, sorted_ts = user_dense[order], timestamps[order]
    backwards = (sorted_ts[1:] < sorted_ts[:-1]) & (sorted_users[1:] == sorted_users[:-1])
    out_of_order = np.zeros(len(user_values), dtype=bool)
    out_of_order[sorted_users[1:][backwards]] = True
    users_out_of_order = int(out_of_order.sum())
    if users_out_of_order:
        logger.warning(
            "%d of %d users had rows out of time order in %s; sorted by timestamp",
            users_out_of_order,
            len(user_values),
            path,
        )
        order = order[_stable_time_order(sorted_users, sorted_ts)]
        sorted_users, sorted_ts = user_dense[order], timestamps[order]
    del backwards, user_dense, timestamps

    counts = np.bincount(sorted_users, minlength=len(user_values))
    keep = counts >= min_behaviours
    num_kept = int(keep.sum())
    if num_kept == 0:
        raise InputError(
            f"{path}: no user has at least min_behaviours={min_behaviours} behaviours (the most any user "
            f"has is {counts.max()}); use a larger file or a lower min_behaviours"
        )
    if num_kept < 3:
        raise InputError(
            f"{path}: only {num_kept} users have at least min_behaviours={min_behaviours} behaviours, but "
            "the train, validation and test splits need 3; use a larger file or a lower min_behaviours"
        )
    kept_rows = keep[sorted_users]
    seq_items = item_dense[order[kept_rows]].astype(np.int32)
    seq_timestamps = sorted_ts[kept_rows]
    del order, kept_rows, item_dense, sorted_users, sorted_ts
    train, valid, test = _split_users(num_kept, seed)
    meta["counts"].update(
        users_total=len(user_values),
        users_kept=num_kept,
        items=len(item_ids),
        categories=len(category_values),
        users_out_of_order=users_out_of_order,
    )
    return Dataset(
        item_ids=item_ids.astype(np.int64),
        item_category=item_category.astype(np.int32),
        category_names=category_values.astype(str),
        user_ids=user_values[keep].astype(np.int64),
        offsets=np.concatenate([[0], np.cumsum(counts[keep])]).astype(np.int64),
        seq_items=seq_items,
        seq_timestamps=seq_timestamps,
        train_users=train,
        valid_users=valid,
        test_users=test,
        meta=meta,
    )


def _movie_labels(movies: pd.DataFrame, movies_path: Path, counts: dict):
    """Category labeller for MovieLens: a movie's full genres string, "(unknown)" if unlisted."""

    def item_labels(_first_rows, item_ids):
        genres = pd.Series(movies["genres"].to_numpy(), index=movies["movieId"].to_numpy())
        labels = genres.reindex(item_ids)
        missing = labels.isna().to_numpy()
        counts["items_without_movie"] = int(missing.sum())
        if missing.any():
            logger.warning(
                "%d rated movies are missing from %s (e.g. movieId %s); their category is %r",
                missing.sum(),
                movies_path,
                ", ".join(map(str, item_ids[missing][:_MAX_EXAMPLES])),
                UNKNOWN_CATEGORY,
            )
        return labels.fillna(UNKNOWN_CATEGORY).to_numpy(dtype=str)

    return item_labels


def load_dataset_from_file(
    path, fmt: str = "userbehavior", *, min_behaviours: int = 10, seed: int = 0, skip_bad_rows: bool = False
) -> Dataset:
    """Reads an interaction log and builds the dataset the model trains and is evaluated on.

    Args:
      path: the UserBehavior CSV, or a MovieLens directory (or its ratings.csv).
      fmt: one of ``FORMATS``.
      min_behaviours: users with fewer behaviours are dropped, as in the paper.
      seed: seed of the user split.
      skip_bad_rows: skip (and count) malformed rows instead of failing on the first.

    Returns:
      The dataset; ``meta`` records its provenance and counts.

    Raises:
      InputError: the file is missing, empty or malformed, or too few users remain.
    """
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; accepted formats are {', '.join(FORMATS)}")
    if min_behaviours < 1:
        raise InputError(f"min_behaviours must be at least 1, got {min_behaviours}")
    path = Path(path)
    if fmt == "movielens" and path.is_dir():
        path = path / "ratings.csv"
    if not path.is_file():
        wanted = (
            "a MovieLens directory holding ratings.csv and movies.csv, or its ratings.csv"
            if fmt == "movielens"
            else "the UserBehavior CSV file"
        )
        raise InputError(f"{path} not found or not a file; give the path of {wanted}")
    params = {"format": fmt, "min_behaviours": min_behaviours, "seed": seed, "skip_bad_rows": skip_bad_rows}
    counts: dict = {}
    if fmt == "movielens":
        movies_path = path.parent / "movies.csv"
        movies = _read_movies(movies_path)  # before the long ratings read: fail fast
        fields, header = _RATINGS_FIELDS, _RATINGS_HEADER
    else:
        fields, header = _USERBEHAVIOR_FIELDS, None

    problems = _RowProblems(path, skip_bad_rows, fields)
    columns, digest = _read_rows(path, fields, problems, header)
    problems.report()
    num_rows = len(columns[0])
    if num_rows == 0:
        detail = f"all {problems.count} rows are malformed" if problems.count else "it holds no data rows"
        raise InputError(f"{path}: {detail}; {_expected(fields, header)}")
    inputs = {"file": str(path), "sha256": digest}
    counts.update(rows=num_rows, skipped_rows=problems.count)

    if fmt == "userbehavior":
        users, items, categories, behaviours, timestamps = columns
        per_type = np.bincount(behaviours, minlength=len(BEHAVIOUR_TYPES)).tolist()
        counts["behaviours"] = dict(zip(BEHAVIOUR_TYPES, per_type, strict=True))

        def item_labels(first_rows, _item_ids):
            return categories[first_rows]

    else:
        users, items, _ratings, timestamps = columns
        counts["behaviours"] = {"rating": num_rows}
        inputs.update(movies_file=str(movies_path), movies_sha256=artifacts.sha256_file(movies_path))
        item_labels = _movie_labels(movies, movies_path, counts)
    del columns
    rows = {"users": users, "items": items, "timestamps": timestamps}
    del users, items, timestamps
    meta = {**artifacts.provenance("dataset", params, inputs), "counts": counts}
    dataset = _build(path, rows, item_labels, min_behaviours, seed, meta)
    logger.info(
        "loaded %s: %d rows, %d of %d users kept, %d items, %d categories",
        path,
        num_rows,
        dataset.num_users,
        counts["users_total"],
        dataset.num_items,
        dataset.num_categories,
    )
    return dataset


_ARRAY_FIELDS = (
    "item_ids",
    "item_category",
    "category_names",
    "user_ids",
    "offsets",
    "seq_items",
    "seq_timestamps",
    "train_users",
    "valid_users",
    "test_users",
)


def save_dataset(ds: Dataset, directory) -> None:
    """Writes the dataset as one .npz plus meta.json; the directory appears only when complete."""
    with artifacts.atomic_dir(directory) as tmp:
        with open(tmp / _ARRAYS_FILE, "wb") as f:
            np.savez(f, **{name: getattr(ds, name) for name in _ARRAY_FIELDS})
        artifacts.write_meta(tmp, ds.meta)


def load_dataset(directory) -> Dataset:
    """Reads a dataset written by :func:`save_dataset`, verifying its checksums first.

    Raises:
      ArtifactError: the directory holds no dataset, or it is damaged or incomplete.
    """
    directory = Path(directory)
    meta = artifacts.read_meta(
        directory, "dataset"
    )  # keeps "files": artifacts.digest() names the dataset by them
    try:
        with np.load(directory / _ARRAYS_FILE, allow_pickle=False) as arrays:
            fields = {name: arrays[name] for name in _ARRAY_FIELDS}
    except (OSError, KeyError, ValueError) as e:
        raise ArtifactError(f"{directory / _ARRAYS_FILE} is unreadable ({e}); rebuild the dataset") from e
    offsets = fields["offsets"]
    if len(offsets) != len(fields["user_ids"]) + 1 or offsets[-1] != len(fields["seq_items"]):
        raise ArtifactError(f"{directory} has inconsistent offsets; rebuild the dataset")
    return Dataset(**fields, meta=meta)
