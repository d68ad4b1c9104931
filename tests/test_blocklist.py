"""The live blocklist (server/items.py): the file and Redis homes, the operator's commands, and
what happens to a list that cannot be used. The served effect is in tests/test_server.py."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import free_port

from nann_common.errors import NannError
from server import items
from server.metrics import Metrics


def _sample(metrics: Metrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_file_commands_and_the_server_side_reader(tmp_path, capsys):
    path = tmp_path / "lists" / "blocked.txt"
    metrics = Metrics()
    reader = items.open_blocklist(str(path), cap=5, metrics=metrics)
    assert reader.current().ids.tolist() == []  # a missing file is an empty list
    assert items.main(["block", "--file", str(path), "30", "10", "20", "10"]) == 0
    assert capsys.readouterr().out.strip() == "3 items blocked"
    assert reader.current().ids.tolist() == [10, 20, 30]
    assert metrics.registry.get_sample_value("nann_blocklist_items") == 3
    assert items.main(["unblock", "--file", str(path), "20", "99"]) == 0
    assert reader.current().ids.tolist() == [10, 30]
    capsys.readouterr()
    assert items.main(["list", "--file", str(path)]) == 0
    assert capsys.readouterr().out.split() == ["10", "30"]
    # Past the cap the command changes nothing and says why.
    assert items.main(["block", "--file", str(path), "--max", "5", "1", "2", "3", "4"]) == 2
    assert "more than --max-blocklist 5; nothing was changed" in capsys.readouterr().err
    assert items.change("list", [], file=str(path)).tolist() == [10, 30]
    assert items.main(["block", "--file", str(path), "-5"]) == 2
    assert "item ids are >= 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text,reason,message",
    [
        ("10\nten\n", "malformed", "line 2: 'ten' is not an item id"),
        ("10\n-3\n", "malformed", "line 2: item ids are >= 0"),
        ("1\n2\n3\n4\n5\n6\n", "over_cap", "more than --max-blocklist 5"),
    ],
)
def test_a_list_that_cannot_be_used_is_refused_and_the_previous_one_stays(tmp_path, text, reason, message):
    path = tmp_path / "blocked.txt"
    path.write_text("# taken down\n7\n8  # out of stock\n")
    metrics = Metrics()
    reader = items.open_blocklist(str(path), cap=5, metrics=metrics)
    assert reader.current().ids.tolist() == [7, 8]
    path.write_text(text)  # an in-place edit: a new size, so the reader looks again
    assert reader.current().ids.tolist() == [7, 8]
    assert message in reader.error
    assert _sample(metrics, "nann_blocklist_errors_total", reason=reason) == 1
    # A server does not start on a list it cannot use: it has no previous list to keep.
    with pytest.raises(NannError, match="--blocklist"):
        items.open_blocklist(str(path), cap=5)
    path.write_text("9\n")
    assert reader.current().ids.tolist() == [9] and reader.error is None


@pytest.fixture
def redis_url(redis_db13):
    from server.features import redis_client

    client = redis_client(redis_db13, timeout_s=1.0)
    client.delete(items.SET_KEY, items.VERSION_KEY)
    yield redis_db13
    client.delete(items.SET_KEY, items.VERSION_KEY)
    client.close()


def test_redis_commands_reach_every_reader_and_bad_states_keep_the_previous_list(redis_url, capsys):
    metrics = Metrics()
    reader = items.open_blocklist(redis_url, cap=4, metrics=metrics)
    other = items.open_blocklist(redis_url, cap=4)  # a second replica
    assert reader.current().ids.tolist() == []
    assert items.main(["block", "--redis", redis_url, "5", "3"]) == 0
    assert reader.current().ids.tolist() == [3, 5] and other.current().ids.tolist() == [3, 5]
    assert items.main(["block", "--redis", redis_url, "--max", "4", "1", "2", "9"]) == 2
    assert "nothing was changed" in capsys.readouterr().err
    assert reader.current().ids.tolist() == [3, 5]
    assert items.main(["unblock", "--redis", redis_url, "3"]) == 0
    assert other.current().ids.tolist() == [5] and reader.current().ids.tolist() == [5]
    capsys.readouterr()
    assert items.main(["list", "--redis", redis_url]) == 0
    assert capsys.readouterr().out.split() == ["5"]
    # Written past the cap by hand: refused, the previous list serves on.
    from server.features import redis_client

    client = redis_client(redis_url, timeout_s=1.0)
    client.sadd(items.SET_KEY, 11, 12, 13, 14)
    client.incr(items.VERSION_KEY)
    client.close()
    assert reader.current().ids.tolist() == [5]
    assert _sample(metrics, "nann_blocklist_errors_total", reason="over_cap") == 1
    # Redis out of reach: the last list read serves on, counted, retried after a pause.
    reader.client = redis_client(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    assert reader.current().ids.tolist() == [5]
    assert reader.current().ids.tolist() == [5]
    assert _sample(metrics, "nann_blocklist_errors_total", reason="unreachable") == 1
    for r in (reader, other):
        r.close()


def test_a_server_refuses_to_start_on_an_unreachable_redis_blocklist():
    with pytest.raises(NannError, match="--blocklist redis://"):
        items.open_blocklist(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)


def test_parse_ids_sorts_and_deduplicates():
    assert items.parse_ids(["3", " 1 ", "", "# c", "3 # again"], "x").tolist() == [1, 3]
    assert items.parse_ids([], "x").dtype == np.int64
