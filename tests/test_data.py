"""Tests of the interaction loader: real samples, the paper's split, histories and bad input."""

import collections
import csv
import logging
import math

import numpy as np
import pandas as pd
import pytest

from model_export import data
from nann_common import artifacts
from nann_common.errors import ArtifactError, InputError

# A hand-made log: user 7 has 5 behaviours, user 3 has 4, user 9 has 3, user 5 has 1.
# Rows are interleaved across users and in time order within each user.
HAND_ROWS = [
    (7, 100, 1, "pv", 10),
    (3, 200, 2, "pv", 11),
    (7, 101, 1, "buy", 12),
    (9, 300, 3, "pv", 13),
    (3, 201, 2, "cart", 14),
    (7, 102, 1, "pv", 15),
    (5, 999, 9, "pv", 16),
    (9, 301, 3, "fav", 17),
    (3, 202, 2, "pv", 18),
    (7, 103, 1, "pv", 19),
    (9, 302, 3, "pv", 20),
    (3, 203, 2, "pv", 21),
    (7, 104, 1, "pv", 22),
]
HAND_SEQUENCES = {3: [200, 201, 202, 203], 7: [100, 101, 102, 103, 104], 9: [300, 301, 302]}


def _write(path, rows) -> str:
    """Writes rows (tuples or raw strings) as a headerless CSV and returns its path."""
    lines = [r if isinstance(r, str) else ",".join(map(str, r)) for r in rows]
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def _hand_dataset(tmp_path, **kwargs) -> data.Dataset:
    return data.load_dataset_from_file(_write(tmp_path / "hand.csv", HAND_ROWS), min_behaviours=3, **kwargs)


def _original_items(ds, dense):
    return ds.item_ids[np.asarray(dense)].tolist()


def _dense_user(ds, original):
    return int(np.searchsorted(ds.user_ids, original))


# --- real samples ---------------------------------------------------------------------------------


def test_movielens_sample_loads_with_categories_from_movies_csv(movielens_dir):
    with open(movielens_dir / "ratings.csv", newline="") as f:
        ratings = list(csv.DictReader(f))
    with open(movielens_dir / "movies.csv", newline="") as f:
        genres = {int(m["movieId"]): m["genres"] for m in csv.DictReader(f)}
    per_user = collections.Counter(r["userId"] for r in ratings)
    movies = {int(r["movieId"]) for r in ratings}

    ds = data.load_dataset_from_file(movielens_dir, "movielens")

    assert ds.meta["counts"]["rows"] == len(ratings)
    assert ds.num_users == sum(n >= 10 for n in per_user.values()) == 610
    assert ds.num_items == len(movies)
    assert ds.num_items >= 9_724  # the ml-latest-small ratings cover 9,724 movies
    assert (len(ds.valid_users), len(ds.test_users), len(ds.train_users)) == (61, 61, 488)
    names = ds.category_names[ds.item_category]
    expected = [genres.get(int(m), data.UNKNOWN_CATEGORY) for m in ds.item_ids]
    assert names.tolist() == expected
    assert ds.category_names[ds.item_category[np.searchsorted(ds.item_ids, 1)]] == (
        "Adventure|Animation|Children|Comedy|Fantasy"
    )
    assert len(ds.seq_items) == sum(n for n in per_user.values() if n >= 10)
    assert ds.meta["inputs"]["sha256"] == artifacts.sha256_file(movielens_dir / "ratings.csv")
    assert ds.meta["inputs"]["movies_sha256"] == artifacts.sha256_file(movielens_dir / "movies.csv")


def test_userbehavior_sample_loads(userbehavior_csv):
    with open(userbehavior_csv, newline="") as f:
        rows = list(csv.reader(f))
    per_user = collections.Counter(r[0] for r in rows)
    first_category = {}
    for r in rows:
        first_category.setdefault(int(r[1]), int(r[2]))

    ds = data.load_dataset_from_file(userbehavior_csv)

    counts = ds.meta["counts"]
    assert counts["rows"] == len(rows)
    assert ds.num_users == sum(n >= 10 for n in per_user.values()) == 43
    assert ds.num_items == len(first_category)
    assert ds.num_categories == len(set(first_category.values()))
    assert counts["behaviours"] == dict(collections.Counter(r[3] for r in rows)) | {
        t: 0 for t in data.BEHAVIOUR_TYPES if t not in {r[3] for r in rows}
    }
    assert [int(ds.category_names[c]) for c in ds.item_category] == [first_category[i] for i in ds.item_ids]
    assert ds.meta["inputs"] == {
        "file": str(userbehavior_csv),
        "sha256": artifacts.sha256_file(userbehavior_csv),
    }
    assert np.all(np.diff(ds.item_ids) > 0)
    for u in range(ds.num_users):
        assert np.all(np.diff(ds.seq_timestamps[ds.offsets[u] : ds.offsets[u + 1]]) >= 0)


# --- split ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_users", "per_eval_split"), [(3, 1), (25, 2), (100, 10)])
def test_split_sizes_and_disjointness(tmp_path, num_users, per_eval_split):
    rows = [(u, 1000 + (u + t) % 7, 1, "pv", t) for u in range(num_users) for t in range(10)]
    ds = data.load_dataset_from_file(_write(tmp_path / "ub.csv", rows), seed=3)

    assert (len(ds.valid_users), len(ds.test_users)) == (per_eval_split, per_eval_split)
    assert len(ds.train_users) == num_users - 2 * per_eval_split
    everyone = np.concatenate([ds.train_users, ds.valid_users, ds.test_users])
    assert sorted(everyone.tolist()) == list(range(num_users))
    for split in (ds.train_users, ds.valid_users, ds.test_users):
        assert split.dtype == np.int32 and np.all(np.diff(split) > 0)


def test_large_corpus_gets_ten_thousand_eval_users(tmp_path):
    users = np.repeat(np.arange(100_000), 10)
    frame = pd.DataFrame(
        {"u": users, "i": users % 5000, "c": 1, "b": "pv", "t": np.tile(np.arange(10), 100_000)}
    )
    path = tmp_path / "large.csv"
    frame.to_csv(path, header=False, index=False)

    ds = data.load_dataset_from_file(path)

    assert (len(ds.valid_users), len(ds.test_users), len(ds.train_users)) == (10_000, 10_000, 80_000)


def test_split_depends_only_on_seed(tmp_path):
    rows = [(u, u % 5, 1, "pv", t) for u in range(50) for t in range(10)]
    path = _write(tmp_path / "ub.csv", rows)
    a, b = data.load_dataset_from_file(path, seed=1), data.load_dataset_from_file(path, seed=1)
    c = data.load_dataset_from_file(path, seed=2)
    assert np.array_equal(a.test_users, b.test_users)
    assert not np.array_equal(a.test_users, c.test_users)


# --- sequences, targets, histories ----------------------------------------------------------------


def test_users_below_min_behaviours_are_dropped_but_their_items_stay(tmp_path):
    ds = _hand_dataset(tmp_path)
    assert ds.user_ids.tolist() == [3, 7, 9]
    assert ds.meta["counts"]["users_total"] == 4
    assert 999 in ds.item_ids  # seen only by user 5, who has one behaviour
    for original, items in HAND_SEQUENCES.items():
        u = _dense_user(ds, original)
        assert _original_items(ds, ds.seq_items[ds.offsets[u] : ds.offsets[u + 1]]) == items


def test_ground_truth_is_the_ceil_half_behaviour(tmp_path):
    ds = _hand_dataset(tmp_path)
    for original, items in HAND_SEQUENCES.items():
        u = _dense_user(ds, original)
        (position,) = ds.ground_truth_positions([u])
        assert _original_items(ds, [ds.seq_items[position]]) == [items[math.ceil(len(items) / 2) - 1]]


@pytest.mark.parametrize("max_len", [1, 2, 4, 50])
def test_histories_are_the_behaviours_just_before_right_padded(tmp_path, max_len):
    ds = _hand_dataset(tmp_path)
    for original, items in HAND_SEQUENCES.items():
        u = _dense_user(ds, original)
        positions = np.arange(ds.offsets[u], ds.offsets[u + 1])
        histories = ds.histories(positions, max_len=max_len)
        assert histories.shape == (len(items), max_len) and histories.dtype == np.int32
        for t, row in enumerate(histories):
            expected = items[max(0, t - max_len) : t]  # never reaches into the previous user
            assert _original_items(ds, row[: len(expected)]) == expected
            assert np.all(row[len(expected) :] == data.PAD)


def test_eval_examples_pair_histories_with_ground_truth(tmp_path):
    ds = _hand_dataset(tmp_path)
    for split, users in (("valid", ds.valid_users), ("test", ds.test_users)):
        got_users, histories, targets = ds.eval_examples(split, max_len=3)
        positions = ds.ground_truth_positions(users)
        assert np.array_equal(got_users, users)
        assert np.array_equal(targets, ds.seq_items[positions]) and targets.dtype == np.int32
        assert np.array_equal(histories, ds.histories(positions, max_len=3))
    with pytest.raises(ValueError, match="valid"):
        ds.eval_examples("train")


def test_train_positions_skip_first_behaviours_and_other_splits(tmp_path):
    rows = [(u, (u * 7 + t) % 11, 1, "pv", t) for u in range(30) for t in range(3 + u % 4)]
    ds = data.load_dataset_from_file(_write(tmp_path / "ub.csv", rows), min_behaviours=3)
    expected = [p for u in ds.train_users for p in range(ds.offsets[u] + 1, ds.offsets[u + 1])]
    assert ds.train_positions().tolist() == expected
    assert ds.train_positions().dtype == np.int64


def test_item_counts_cover_only_the_given_users(tmp_path):
    ds = _hand_dataset(tmp_path)
    u3, u7 = _dense_user(ds, 3), _dense_user(ds, 7)
    counts = ds.item_counts([u3, u7])
    assert counts.shape == (ds.num_items,) and counts.sum() == 9
    assert counts[np.searchsorted(ds.item_ids, 300)] == 0


def test_out_of_order_rows_are_sorted_stably_and_warned(tmp_path, caplog):
    rows = [
        (1, 10, 1, "pv", 5),
        (1, 11, 1, "pv", 3),
        (1, 12, 1, "pv", 3),  # ties keep file order
        (2, 20, 1, "pv", -40),  # any integer is a timestamp
        (2, 21, 1, "pv", 7),
        (3, 30, 1, "pv", 9),
        (3, 31, 1, "pv", 1),
    ]
    path = _write(tmp_path / "ub.csv", rows)
    with caplog.at_level(logging.WARNING, logger="model_export.data"):
        ds = data.load_dataset_from_file(path, min_behaviours=2)

    assert f"2 of 3 users had rows out of time order in {path}; sorted by timestamp" in caplog.text
    assert ds.meta["counts"]["users_out_of_order"] == 2
    assert _original_items(ds, ds.seq_items) == [11, 12, 10, 20, 21, 31, 30]
    assert ds.seq_timestamps.tolist() == [3, 3, 5, -40, 7, 1, 9]


def test_huge_timestamp_spread_still_sorts_stably(tmp_path):
    # A spread too wide for one combined int64 sort key takes the two-key sort.
    big = 2**62
    rows = [(u, 10 * u + k, 1, "pv", t) for u in range(3) for k, t in enumerate([big, -big, 0, -big])]
    ds = data.load_dataset_from_file(_write(tmp_path / "ub.csv", rows), min_behaviours=2)
    assert ds.meta["counts"]["users_out_of_order"] == 3
    assert _original_items(ds, ds.seq_items[:4]) == [1, 3, 2, 0]
    assert ds.seq_timestamps[:4].tolist() == [-big, -big, 0, big]


def test_item_category_comes_from_its_first_row(tmp_path):
    rows = [(1, 5, 70, "pv", 1), (2, 5, 80, "pv", 2), (3, 6, 90, "pv", 3), (1, 6, 60, "pv", 4)]
    ds = data.load_dataset_from_file(_write(tmp_path / "ub.csv", rows), min_behaviours=1)
    assert ds.category_names.tolist() == ["70", "90"]
    assert ds.category_names[ds.item_category].tolist() == ["70", "90"]


def test_crlf_line_ends_and_blank_lines_are_accepted(tmp_path):
    path = tmp_path / "ub.csv"
    text = "\r\n".join(",".join(map(str, r)) for r in HAND_ROWS)
    path.write_bytes(text.replace("\r\n", "\r\n\r\n", 1).encode() + b"\r\n")
    ds = data.load_dataset_from_file(path, min_behaviours=3)
    assert np.array_equal(ds.seq_items, _hand_dataset(tmp_path).seq_items)


# --- artifacts ------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    ds = _hand_dataset(tmp_path)
    data.save_dataset(ds, tmp_path / "dataset")
    loaded = data.load_dataset(tmp_path / "dataset")
    for name in data._ARRAY_FIELDS:
        before, after = getattr(ds, name), getattr(loaded, name)
        assert after.dtype == before.dtype and np.array_equal(after, before), name
    assert {k: v for k, v in loaded.meta.items() if k != "files"} == ds.meta
    assert set(loaded.meta["files"]) == {"dataset.npz"}  # what artifacts.digest() names the dataset by
    assert np.array_equal(loaded.eval_examples("test")[1], ds.eval_examples("test")[1])


def test_corrupted_dataset_raises_artifact_error(tmp_path):
    data.save_dataset(_hand_dataset(tmp_path), tmp_path / "dataset")
    npz = tmp_path / "dataset" / "dataset.npz"
    raw = bytearray(npz.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    npz.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="sha256"):
        data.load_dataset(tmp_path / "dataset")


def test_failing_runs_leave_no_dataset_directory(tmp_path, monkeypatch):
    target = tmp_path / "work" / "dataset"
    bad = _write(tmp_path / "bad.csv", [*HAND_ROWS, "1,2,3,click,4"])

    def prepare():
        data.save_dataset(data.load_dataset_from_file(bad, min_behaviours=3), target)

    with pytest.raises(InputError):
        prepare()
    assert not target.exists()

    def broken_write_meta(directory, meta):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts, "write_meta", broken_write_meta)
    with pytest.raises(OSError, match="disk full"):
        data.save_dataset(_hand_dataset(tmp_path), target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no half-written temporary directory either


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ("1,2,3,pv", "expected 5 comma-separated fields, found 4"),
        ("1,2,3,pv,5,6", "expected 5 comma-separated fields, found 6"),
        ("1,abc,3,pv,5", "item_id 'abc' is not an integer"),
        ("1,2,3,pv,soon", "timestamp 'soon' is not an integer"),
        ("1,2.5,3,pv,5", "item_id '2.5' is not an integer"),
        ("1,1_000,3,pv,5", "item_id '1_000' is not an integer"),
        ("1,-2,3,pv,5", "item_id '-2' is negative"),
        ("1,2,-3,pv,5", "category_id '-3' is negative"),
        ("1,2,3,click,5", "unknown behavior_type 'click'; accepted types are pv, buy, cart, fav"),
        ("1,2,3,,5", "unknown behavior_type ''"),
        ("1,2,3,pv,99999999999999999999", "timestamp '99999999999999999999' does not fit in 64 bits"),
    ],
)
def test_malformed_row_names_file_line_and_fix(tmp_path, bad_line, problem):
    path = _write(tmp_path / "ub.csv", [*HAND_ROWS[:4], bad_line, *HAND_ROWS[4:]])
    with pytest.raises(InputError) as error:
        data.load_dataset_from_file(path, min_behaviours=3)
    message = str(error.value)
    assert f"{path}:5: {problem}" in message
    assert "skip_bad_rows=True" in message


def test_userbehavior_header_line_is_explained(tmp_path):
    path = _write(tmp_path / "ub.csv", ["user_id,item_id,category_id,behavior_type,timestamp", *HAND_ROWS])
    with pytest.raises(InputError, match=r"ub\.csv:1: user_id 'user_id' is not an integer.*no header line"):
        data.load_dataset_from_file(path)


_RATINGS_HEADER = "userId,movieId,rating,timestamp\n"
_MOVIES_HEADER = "movieId,title,genres\n"


@pytest.mark.parametrize(
    ("fmt", "target", "files", "pattern"),
    [
        ("userbehavior", "ub.csv", {"ub.csv": ""}, r"ub\.csv:1: the file is empty"),
        ("userbehavior", "ub.csv", {"ub.csv": "\n\n"}, r"ub\.csv: it holds no data rows"),
        (
            "userbehavior",
            "missing.csv",
            {},
            r"missing\.csv not found or not a file; give the path of the UserBehavior CSV",
        ),
        ("parquet", "ub.csv", {"ub.csv": "1,2,3,pv,4\n"}, "accepted formats are userbehavior, movielens"),
        (
            "movielens",
            ".",
            {"ratings.csv": "", "movies.csv": _MOVIES_HEADER},
            r"ratings\.csv:1: the file is empty",
        ),
        (
            "movielens",
            ".",
            {"ratings.csv": _RATINGS_HEADER, "movies.csv": _MOVIES_HEADER},
            r"ratings\.csv: it holds no data rows",
        ),
        (
            "movielens",
            "ratings.csv",
            {"ratings.csv": "user,movie,rating,time\n1,1,4.0,5\n", "movies.csv": _MOVIES_HEADER},
            r"ratings\.csv:1: header is 'user,movie,rating,time', expected 'userId,movieId,rating,timestamp'",
        ),
        (
            "movielens",
            ".",
            {"ratings.csv": _RATINGS_HEADER + "1,1,4.0,5\n1,1,good,6\n", "movies.csv": _MOVIES_HEADER},
            r"ratings\.csv:3: rating 'good' is not a number",
        ),
        (
            "movielens",
            ".",
            {"ratings.csv": _RATINGS_HEADER + "1,1,4.0,5\n", "movies.csv": "movieId\n1\n"},
            r"movies\.csv:1: header is 'movieId', expected 'movieId,title,genres'",
        ),
        ("movielens", ".", {"ratings.csv": _RATINGS_HEADER + "1,1,4.0,5\n"}, "must sit beside ratings.csv"),
        ("movielens", "nowhere", {}, "a MovieLens directory holding ratings.csv and movies.csv"),
        ("userbehavior", ".", {}, r"not a file; give the path of the UserBehavior CSV"),
    ],
)
def test_unusable_files_are_explained(tmp_path, fmt, target, files, pattern):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(InputError, match=pattern):
        data.load_dataset_from_file(tmp_path / target, fmt)


def test_no_surviving_user_reports_the_largest_count(tmp_path):
    path = _write(tmp_path / "ub.csv", [(1, 1, 1, "pv", 1), (1, 2, 1, "pv", 2), (2, 1, 1, "pv", 3)])
    with pytest.raises(
        InputError, match=r"the most any user has is 2\); use a larger file or a lower min_behaviours"
    ):
        data.load_dataset_from_file(path)


def test_too_few_users_for_three_splits(tmp_path):
    path = _write(tmp_path / "ub.csv", [(u, 1, 1, "pv", t) for u in (1, 2) for t in range(10)])
    with pytest.raises(InputError, match="only 2 users"):
        data.load_dataset_from_file(path)


def test_skip_bad_rows_counts_and_reports_examples(tmp_path, caplog):
    bad = ["1,2,3,click,5", "x,2,3,pv,5", "1,2,3"]
    path = _write(tmp_path / "ub.csv", [*HAND_ROWS[:2], bad[0], *HAND_ROWS[2:], bad[1], bad[2]])
    with caplog.at_level(logging.WARNING, logger="model_export.data"):
        ds = data.load_dataset_from_file(path, min_behaviours=3, skip_bad_rows=True)

    assert ds.meta["counts"]["skipped_rows"] == 3
    assert ds.meta["counts"]["rows"] == len(HAND_ROWS)
    assert ds.meta["params"]["skip_bad_rows"] is True
    assert f"skipped 3 malformed rows in {path}" in caplog.text
    assert f"{path}:3: unknown behavior_type 'click'" in caplog.text
    assert f"{path}:16: expected 5 comma-separated fields" in caplog.text
    assert np.array_equal(ds.seq_items, _hand_dataset(tmp_path).seq_items)


def test_all_rows_malformed_is_an_error_even_when_skipping(tmp_path):
    path = _write(tmp_path / "ub.csv", ["1,2,3,click,4", "a,b,c,d,e"])
    with pytest.raises(InputError, match=r"all 2 rows are malformed"):
        data.load_dataset_from_file(path, skip_bad_rows=True)


def test_movie_missing_from_movies_csv_gets_unknown_category(tmp_path, caplog):
    (tmp_path / "movies.csv").write_text(
        'movieId,title,genres\n1,"Toy Story, The (1995)",Animation|Children\n'
    )
    ratings = ["userId,movieId,rating,timestamp"] + [
        f"{u},{1 + t % 2},4.0,{t}" for u in range(3) for t in range(10)
    ]
    (tmp_path / "ratings.csv").write_text("\n".join(ratings))  # no final newline, as in some downloads
    with caplog.at_level(logging.WARNING, logger="model_export.data"):
        ds = data.load_dataset_from_file(tmp_path / "ratings.csv", "movielens")

    assert ds.category_names[ds.item_category].tolist() == ["Animation|Children", data.UNKNOWN_CATEGORY]
    assert "1 rated movies are missing" in caplog.text and "movieId 2" in caplog.text
    assert ds.meta["counts"]["rows"] == 30


# --- block reading --------------------------------------------------------------------------------


def test_many_blocks_match_one_block_and_report_later_bad_lines(tmp_path, monkeypatch):
    rows = [
        (u, (u * 13 + t) % 17, t % 3, data.BEHAVIOUR_TYPES[t % 4], 1000 + t)
        for u in range(40)
        for t in range(10)
    ]
    path = _write(tmp_path / "ub.csv", rows)
    whole = data.load_dataset_from_file(path)

    monkeypatch.setattr(data, "BLOCK_BYTES", 64)  # about four rows a block, lines straddle blocks
    split = data.load_dataset_from_file(path)
    for name in data._ARRAY_FIELDS:
        assert np.array_equal(getattr(split, name), getattr(whole, name)), name
    assert split.meta["inputs"] == whole.meta["inputs"]

    monkeypatch.setattr(data, "BLOCK_BYTES", 16)  # shorter than a line
    assert np.array_equal(data.load_dataset_from_file(path).seq_items, whole.seq_items)

    lines = [",".join(map(str, r)) for r in rows]
    lines[336] = "39,1,1,pv,-0x10"
    with pytest.raises(InputError, match=r"ub2\.csv:337: timestamp '-0x10' is not an integer"):
        data.load_dataset_from_file(_write(tmp_path / "ub2.csv", lines))
