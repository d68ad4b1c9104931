"""The Retrieve service end to end: a real server subprocess on a loopback port, real gRPC calls.

One server (embedded store, in-process model) is shared by the module; tests that need their
own (Redis, reload, SIGTERM, TF Serving) start one with ``start_server``.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ROOT, ServerProcess
from prometheus_client.parser import text_string_to_metric_families

from nann.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def blocklist(tmp_path_factory):
    """The module server's --blocklist file (absent at the start: nothing blocked)."""
    return tmp_path_factory.mktemp("blocklist") / "blocked.txt"


@pytest.fixture(scope="module")
def server(served_workdir, tmp_path_factory, blocklist):
    log = tmp_path_factory.mktemp("server") / "server.log"
    proc = ServerProcess(
        log,
        "--model",
        str(served_workdir / "export"),
        "--chunk-size",
        "4",
        "--blocklist",
        str(blocklist),
    )
    proc.wait_serving()
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.target)
    yield retrieval_pb2_grpc.RetrieverStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def snapshot(served_workdir):
    d = served_workdir / "features"
    return {name: np.load(d / f"{name}.npy") for name in ("users", "offsets", "items")}


@pytest.fixture(scope="module")
def saved_model(served_workdir):
    import tensorflow as tf

    return tf.saved_model.load(str(served_workdir / "export" / "1"))


def call(stub, timeout=30.0, **fields):
    """One Retrieve -> (candidates, trailing metadata, messages received)."""
    params = fields.pop("params", None)
    row_filter = fields.pop("filter", None)
    request = retrieval_pb2.RetrieveRequest(**fields)
    if params:
        request.params.CopyFrom(retrieval_pb2.SearchParams(**params))
    if row_filter is not None:
        request.filter.CopyFrom(retrieval_pb2.Filter(**row_filter))
    stream = stub.Retrieve(request, timeout=timeout)
    messages = list(stream)
    candidates = [c for m in messages for c in m.candidates]
    return candidates, dict(stream.trailing_metadata()), len(messages)


def user_history(snapshot, i):
    return snapshot["items"][snapshot["offsets"][i] : snapshot["offsets"][i + 1]]


def model_answer(saved_model, history, k=10, ef=(20, 40), steps=(0, 5), mode="beam_history"):
    """The export's own answer at its default query, from the signature the server runs."""
    import tensorflow as tf

    out = saved_model.signatures["retrieve_xla"](
        history=tf.constant([history], tf.int64),
        k=tf.constant([k]),
        ef=tf.constant([list(ef)]),
        steps=tf.constant([list(steps)]),
        mode=tf.constant([mode]),
    )
    return out["item_ids"].numpy()[0], out["scores"].numpy()[0], int(out["scored"].numpy()[0])


def test_importing_the_server_imports_no_training_or_index_code():
    code = (
        "import sys, server, server.app, server.backends, server.batching, server.client, "
        "server.config, server.errors, server.features, server.metrics, server.service\n"
        "bad = [m for m in ('model_export', 'index_builder', 'keras', 'hnswlib', 'matplotlib', "
        "'pandas', 'tensorflow') if m in sys.modules]\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("user_index", [0, 7, 123])
def test_streamed_candidates_equal_the_saved_model(stub, snapshot, saved_model, user_index):
    user = str(snapshot["users"][user_index])
    history = user_history(snapshot, user_index)
    candidates, trailer, messages = call(stub, user_id=user)
    ids, scores, scored = model_answer(saved_model, history)
    assert [c.item_id for c in candidates] == ids.tolist()
    np.testing.assert_allclose([c.score for c in candidates], scores, rtol=1e-6)
    assert [c.rank for c in candidates] == list(range(len(ids)))
    assert messages == 3  # 10 candidates in chunks of 4
    assert trailer["nann-items-scored"] == str(scored)
    assert trailer["nann-model-version"] == "1"
    assert trailer["nann-unknown-ids-dropped"] == "0"


def test_inline_history_equals_the_stored_one(stub, snapshot):
    stored, _, _ = call(stub, user_id=str(snapshot["users"][3]))
    inline, _, _ = call(stub, history=user_history(snapshot, 3).tolist())
    assert [c.item_id for c in inline] == [c.item_id for c in stored]


def test_unknown_ids_are_dropped_and_counted(stub, snapshot, saved_model):
    history = user_history(snapshot, 5)
    unknown = [int(history.max()) + 1_000_003, 10**15]
    candidates, trailer, _ = call(stub, history=[unknown[0], *history.tolist(), unknown[1]])
    assert trailer["nann-unknown-ids-dropped"] == "2"
    assert [c.item_id for c in candidates] == model_answer(saved_model, history)[0].tolist()


def test_only_the_most_recent_max_len_behaviours_are_used(stub, snapshot, served_workdir):
    meta = json.loads((served_workdir / "export" / "1" / "meta.json").read_text())
    max_len = meta["serving"]["max_len"]
    items = snapshot["items"]
    long_history = np.resize(items, max_len + 30)
    full, trailer, _ = call(stub, history=long_history.tolist())
    recent, _, _ = call(stub, history=long_history[-max_len:].tolist())
    assert trailer["nann-history-length"] == str(max_len)
    assert [c.item_id for c in full] == [c.item_id for c in recent]


def test_per_request_parameters_reach_the_model(stub, snapshot, saved_model):
    history = user_history(snapshot, 11)
    params = {"ef": [40, 80], "steps": [2, 3]}
    candidates, trailer, _ = call(stub, history=history.tolist(), k=25, params=params)
    ids, _, scored = model_answer(saved_model, history, k=25, ef=(40, 80), steps=(2, 3))
    assert [c.item_id for c in candidates] == ids.tolist()
    assert trailer["nann-items-scored"] == str(scored)


XLA_COMPILED = "Compilation of XLA executable"


@pytest.mark.e2e
def test_no_call_after_serving_pays_for_a_compilation(start_server, served_workdir, snapshot):
    """The warm-up compiles the XLA scorer at every shape a default-query call can take: after
    SERVING, calls of every history length, stored and inline, compile nothing (XLA logs each
    compilation at this verbosity)."""
    server = start_server(
        "--model",
        str(served_workdir / "export"),
        env={"TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "device_compiler=1"},
    )
    before = server.log()
    assert before.count(XLA_COMPILED) >= 10, "the warm-up compiled nothing; is the XLA signature served?"
    assert '"signature retrieve_xla' in before or "signature retrieve_xla" in before
    rng = np.random.default_rng(5)
    items = snapshot["items"]
    with grpc.insecure_channel(server.target) as channel:
        stub = retrieval_pb2_grpc.RetrieverStub(channel)
        for i in range(60):
            if i % 2:
                call(stub, user_id=str(snapshot["users"][i]))
            else:
                call(stub, history=rng.choice(items, size=int(rng.integers(1, 51))).tolist())
    after = server.log()[len(before) :]
    assert after.count(XLA_COMPILED) == 0, after[-3000:]


BAD_REQUESTS = [
    ({}, "INVALID_ARGUMENT", "give user_id"),
    ({"user_id": "no-such-user"}, "NOT_FOUND", "no behaviours in the feature store"),
    ({"history": [1], "k": -1}, "INVALID_ARGUMENT", "k must be >= 0"),
    ({"history": [1], "k": 100000}, "INVALID_ARGUMENT", "--max-k"),
    ({"history": [1], "k": 41}, "INVALID_ARGUMENT", "k must be in 1..min(ef of layer 0, items)"),
    ({"history": [1], "params": {"ef": [20]}}, "INVALID_ARGUMENT", "ef needs 2 values"),
    ({"history": [1], "params": {"ef": [20, 40, 80]}}, "INVALID_ARGUMENT", "ef needs 2 values"),
    ({"history": [1], "params": {"ef": [0, 40]}}, "INVALID_ARGUMENT", "every ef value must be >= 1"),
    ({"history": [1], "params": {"ef": [20, 10**6]}}, "INVALID_ARGUMENT", "--max-ef"),
    ({"history": [1], "params": {"steps": [1, 0]}}, "INVALID_ARGUMENT", "layer 0's (the last) >= 1"),
    ({"history": [1], "params": {"steps": [1, 999]}}, "INVALID_ARGUMENT", "--max-steps"),
    ({"history": [1], "params": {"mode": "greedy"}}, "INVALID_ARGUMENT", "mode must be one of"),
    ({"history": [1], "params": {"mode": "exhaustive"}}, "INVALID_ARGUMENT", "--allow-exhaustive"),
    ({"history": [-5, 1]}, "INVALID_ARGUMENT", "must be >= 0"),
    ({"history": list(range(1001))}, "INVALID_ARGUMENT", "--max-history"),
    ({"history": [10**15, 10**15 + 1]}, "INVALID_ARGUMENT", "none of the 2 ids"),
    ({"user_id": "u" * 300}, "INVALID_ARGUMENT", "longer than 256 bytes"),
    ({"history": [1], "request_id": "caf\u00e9"}, "INVALID_ARGUMENT", "request_id must be printable ASCII"),
    ({"history": [1], "request_id": "r" * 200}, "INVALID_ARGUMENT", "request_id must be printable ASCII"),
    (
        {"history": [1], "filter": {"exclude_item_ids": [-3]}},
        "INVALID_ARGUMENT",
        "exclude_item_ids must be >= 0",
    ),
    (
        {"history": [1], "filter": {"exclude_item_ids": list(range(10_001))}},
        "INVALID_ARGUMENT",
        "--max-exclude",
    ),
    ({"history": [1], "filter": {"categories": list(range(10_001))}}, "INVALID_ARGUMENT", "--max-exclude"),
]


@pytest.mark.parametrize("fields,code,message", BAD_REQUESTS)
def test_bad_requests_get_their_status_and_a_message_that_says_what_to_fix(
    stub, snapshot, fields, code, message
):
    fields = dict(fields)
    if fields.get("history") == [1]:
        fields["history"] = user_history(snapshot, 0)[-3:].tolist()
    with pytest.raises(grpc.RpcError) as caught:
        call(stub, **fields)
    assert caught.value.code().name == code
    assert message in caught.value.details()
    assert "Traceback" not in caught.value.details()


def test_a_filtered_call_returns_only_allowed_items_and_says_which_plan_ran(
    stub, snapshot, served_workdir, server
):
    from model_export.data import load_dataset

    ds = load_dataset(served_workdir / "dataset")
    category_of = dict(zip(ds.item_ids.tolist(), ds.category_names[ds.item_category].tolist(), strict=True))
    history = user_history(snapshot, 4)
    user = str(snapshot["users"][4])
    plain, _, _ = call(stub, user_id=user)
    # The user's history and the unfiltered answer's top 3 excluded: k still filled.
    top3 = [c.item_id for c in plain[:3]]
    got, trailer, _ = call(stub, user_id=user, filter={"exclude_history": True, "exclude_item_ids": top3})
    ids = [c.item_id for c in got]
    assert len(ids) == 10 and not set(ids) & (set(history.tolist()) | set(top3))
    assert trailer["nann-plan"] in ("walk", "exact", "walk+widen")
    assert trailer["nann-filter-unknown-ids"] == "0"
    # A category by its integer id and another by label; an unknown one is counted, not fatal.
    first, second = sorted(set(category_of.values()))[:2]
    got, trailer, _ = call(
        stub, user_id=user, filter={"categories": [int(first), 987654321], "category_labels": [second]}
    )
    assert len(got) == 10 and {category_of[c.item_id] for c in got} <= {first, second}
    assert trailer["nann-filter-unknown-ids"] == "1"
    got, _, _ = call(stub, user_id=user, filter={"exclude_categories": [int(first)]})
    assert len(got) == 10 and first not in {category_of[c.item_id] for c in got}
    # An allow-list of categories the model does not have: nothing allowed, an empty answer.
    got, trailer, _ = call(stub, user_id=user, filter={"categories": [987654321]})
    assert got == [] and trailer["nann-filter-unknown-ids"] == "1"
    # Unfiltered calls carry no plan.
    assert "nann-plan" not in call(stub, user_id=user)[1]
    assert server.health() == "SERVING"


def test_blocked_items_leave_the_next_answer_and_come_back_when_unblocked(stub, snapshot, server, blocklist):
    from server import items

    user = str(snapshot["users"][9])
    plain, _, _ = call(stub, user_id=user)
    top3 = [c.item_id for c in plain[:3]]
    try:
        assert items.main(["block", "--file", str(blocklist), *map(str, top3), "987654321"]) == 0
        got, trailer, _ = call(stub, user_id=user)
        ids = [c.item_id for c in got]
        assert len(ids) == 10 and not set(ids) & set(top3)  # k still filled
        assert ids[:7] == [c.item_id for c in plain[3:]]  # the rest of the answer moves up
        assert trailer["nann-plan"] in ("walk", "walk+widen") and int(trailer["nann-filter-removed"]) >= 3
        # Merged with the caller's own exclusions.
        got, _, _ = call(stub, user_id=user, filter={"exclude_item_ids": [plain[3].item_id]})
        assert not {c.item_id for c in got} & {*top3, plain[3].item_id}
        # A malformed edit is refused: the list in force stays.
        blocklist.write_text("12\nnot-an-id\n")
        assert not {c.item_id for c in call(stub, user_id=user)[0]} & set(top3)
        samples = _settled_samples(server)
        assert _sum(samples, "nann_blocklist_items") == 4  # listed; the one the model lacks is ignored
        assert _sum(samples, "nann_blocklist_errors_total", reason="malformed") == 1
    finally:
        blocklist.unlink(missing_ok=True)
    again, trailer, _ = call(stub, user_id=user)
    assert [c.item_id for c in again] == [c.item_id for c in plain] and "nann-plan" not in trailer
    assert server.health() == "SERVING"


def test_garbage_bytes_are_invalid_argument_not_a_crash(server):
    with grpc.insecure_channel(server.target) as channel:
        raw = channel.unary_stream(
            "/nann.retrieval.v1.Retriever/Retrieve",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(raw(b"\xff\xff\xff\x0f garbage", timeout=10))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert server.health() == "SERVING"


def test_a_passed_deadline_starts_no_work(stub, snapshot):
    with pytest.raises(grpc.RpcError) as caught:
        call(stub, timeout=0.0005, user_id=str(snapshot["users"][0]))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_reflection_lists_the_service(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert "nann.retrieval.v1.Retriever" in names and "grpc.health.v1.Health" in names


def _samples(text):
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _sum(samples, name, **labels):
    return sum(
        v
        for (n, lab), v in samples.items()
        if n == name and all(dict(lab).get(k) == x for k, x in labels.items())
    )


def _settled_samples(server, timeout_s=10.0):
    """Metrics once every started call has been handled.

    A call an earlier test gave up on (a passed deadline, a closed channel) may still end on the server
    after the client has moved on; counting from such a moment would charge its end to this test.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        samples = _samples(server.metrics_text())
        started = _sum(samples, "grpc_server_started_total")
        if started == _sum(samples, "grpc_server_handled_total") or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_metrics_parse_and_move(server, stub, snapshot):
    before = _settled_samples(server)
    call(stub, user_id=str(snapshot["users"][1]))
    with pytest.raises(grpc.RpcError):
        call(stub, user_id="no-such-user")
    after = _settled_samples(server)
    assert (
        _sum(after, "grpc_server_handled_total", grpc_code="OK")
        == _sum(before, "grpc_server_handled_total", grpc_code="OK") + 1
    )
    assert (
        _sum(after, "grpc_server_handled_total", grpc_code="NOT_FOUND")
        == _sum(before, "grpc_server_handled_total", grpc_code="NOT_FOUND") + 1
    )
    assert (
        _sum(after, "grpc_server_handling_seconds_count")
        == _sum(before, "grpc_server_handling_seconds_count") + 2
    )
    for stage in ("feature_fetch", "model_call", "stream_write"):
        assert _sum(after, "nann_stage_seconds_count", stage=stage) > _sum(
            before, "nann_stage_seconds_count", stage=stage
        )
    assert _sum(after, "nann_items_scored_count") == _sum(before, "nann_items_scored_count") + 1
    assert _sum(after, "nann_model_ready") == 1
    assert _sum(after, "nann_model_version_info", version="1") == 1
    assert _sum(after, "nann_table1_baseline_latency_seconds", marking="bitmap") == pytest.approx(0.0063)
    bounds = {dict(lab).get("le") for (n, lab) in after if n == "grpc_server_handling_seconds_bucket"}
    assert "0.0063" in bounds


@pytest.mark.e2e
def test_fuzz_ten_thousand_random_requests(server, snapshot, served_workdir):
    """Random and malformed requests: only the expected codes, no crash, still SERVING after."""
    rng = np.random.default_rng(7)
    users = snapshot["users"]
    items = snapshot["items"]
    expected = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}
    seen: dict[str, int] = {}
    lock = threading.Lock()
    huge = [2**63 - 1, -(2**63), 2**31 - 1, -(2**31), 0, 1, -1]
    huge32 = [2**31 - 1, -(2**31), 0, 1, -1, 65536]
    categories = [
        int(c)
        for c in json.loads(
            (served_workdir / "export" / "1" / "assets.extra" / "categories.json").read_text()
        )
    ]

    def random_request(i):
        r = retrieval_pb2.RetrieveRequest(request_id=f"fuzz-{i}")
        kind = rng.integers(0, 8)
        if kind == 0:
            r.user_id = str(users[rng.integers(len(users))])
        elif kind == 1:
            r.user_id = "".join(chr(c) for c in rng.integers(1, 0x2FF, rng.integers(0, 40)))
        elif kind == 2:
            r.history.extend(int(x) for x in rng.choice(items, rng.integers(1, 60)))
        elif kind == 3:
            r.history.extend(int(x) for x in rng.choice(huge, rng.integers(1, 5)))
        elif kind == 4:
            r.history.extend(int(x) for x in rng.integers(-(2**62), 2**62, rng.integers(0, 1200)))
        elif kind == 5:
            r.user_id = str(rng.integers(-(2**62), 2**62))
        if rng.random() < 0.5:
            r.k = int(rng.choice(huge32 + [5, 10, 40, 41, 1000]))
        if rng.random() < 0.4:
            r.params.ef.extend(int(x) for x in rng.choice(huge32 + [20, 40], rng.integers(0, 4)))
        if rng.random() < 0.4:
            r.params.steps.extend(int(x) for x in rng.choice(huge32 + [1, 2], rng.integers(0, 4)))
        if rng.random() < 0.1:
            r.request_id = "".join(chr(c) for c in rng.integers(1, 0x2FF, rng.integers(0, 200)))
        if rng.random() < 0.3:
            r.params.mode = str(
                rng.choice(["beam", "beam_sets", "hnsw", "exhaustive", "", "x" * 300, "\x00"])
            )
        if rng.random() < 0.3:  # filters: huge lists, negative and unknown ids, empty allow-lists
            f = r.filter
            f.exclude_history = bool(rng.random() < 0.5)
            if rng.random() < 0.5:
                f.exclude_item_ids.extend(int(x) for x in rng.choice(items, rng.integers(0, 300)))
            if rng.random() < 0.1:
                f.exclude_item_ids.extend(int(x) for x in rng.choice(huge, rng.integers(1, 4)))
            if rng.random() < 0.05:
                f.exclude_item_ids.extend(range(int(rng.integers(9_990, 10_020))))
            if rng.random() < 0.3:
                f.categories.extend(int(x) for x in rng.choice(huge + categories, rng.integers(0, 4)))
            if rng.random() < 0.2:
                f.exclude_categories.extend(int(x) for x in rng.choice(huge + categories, rng.integers(0, 4)))
            if rng.random() < 0.1:
                f.category_labels.extend(str(x) for x in rng.choice(categories + ["", "x" * 300], 2))
        return r

    requests = [random_request(i) for i in range(10_000)]
    garbage = [bytes(rng.integers(0, 256, rng.integers(1, 64), dtype=np.uint8)) for _ in range(200)]

    def worker(chunk):
        with grpc.insecure_channel(server.target) as channel:
            stub = retrieval_pb2_grpc.RetrieverStub(channel)
            raw = channel.unary_stream(
                "/nann.retrieval.v1.Retriever/Retrieve",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            for req in chunk:
                try:
                    if isinstance(req, bytes):
                        list(raw(req, timeout=30))
                    else:
                        list(stub.Retrieve(req, timeout=30))
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                    assert "Traceback" not in (e.details() or "")
                with lock:
                    seen[code] = seen.get(code, 0) + 1

    everything = requests + garbage
    threads = [threading.Thread(target=worker, args=(everything[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert sum(seen.values()) == len(everything), seen
    assert set(seen) <= expected, seen
    assert seen.get("OK", 0) > 500 and seen.get("INVALID_ARGUMENT", 0) > 1000, seen
    assert server.proc.poll() is None
    assert server.health() == "SERVING"
    assert '"level": "CRITICAL"' not in server.log() and "Traceback" not in server.log()


# -- servers of their own -----------------------------------------------------------------------


@pytest.mark.e2e
def test_health_is_serving_only_after_the_warm_up(start_server, served_workdir):
    server = start_server("--model", str(served_workdir / "export"), wait=False)
    seen: list[str] = []
    server.wait_serving(seen=seen)
    assert seen[-1] == "SERVING" and "NOT_SERVING" in seen[:-1], seen
    log = server.log()
    warmed = log.index("warm-up requests")
    assert warmed < log.index('"event": "serving"')


@pytest.mark.e2e
def test_sigterm_drains_in_flight_calls_then_exits_zero(start_server, served_workdir, snapshot):
    # A 1.5 s batching window keeps calls in flight long enough to signal in the middle of them.
    server = start_server(
        "--model",
        str(served_workdir / "export"),
        "--max-batch",
        "8",
        "--batch-window-ms",
        "1500",
        "--grace-s",
        "20",
    )
    results = []

    def one(i):
        with grpc.insecure_channel(server.target) as channel:
            stub = retrieval_pb2_grpc.RetrieverStub(channel)
            try:
                results.append(len(call(stub, user_id=str(snapshot["users"][i]))[0]))
            except grpc.RpcError as e:
                results.append(e.code().name)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while (
        time.monotonic() < deadline and _sum(_samples(server.metrics_text()), "nann_in_flight_requests") < 4
    ):
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=60)
    assert server.proc.wait(60) == 0
    assert results == [10, 10, 10, 10], results
    assert '"event": "draining"' in server.log()


def _copy_version(src: Path, base: Path, version: int) -> Path:
    tmp = base / f".{version}.tmp"
    shutil.copytree(src, tmp)
    final = base / str(version)
    tmp.rename(final)
    return final


@pytest.mark.e2e
def test_hot_reload_under_load_fails_no_request_and_a_damaged_version_is_refused(
    start_server, served_workdir, snapshot, tmp_path
):
    base = tmp_path / "export"
    base.mkdir()
    _copy_version(served_workdir / "export" / "1", base, 1)
    server = start_server(
        "--model",
        str(base),
        "--features",
        f"embedded:{served_workdir / 'features'}",
        "--reload-interval-s",
        "0.2",
    )
    stop = threading.Event()
    outcomes: list[str] = []
    versions: set[str] = set()

    def load():
        with grpc.insecure_channel(server.target) as channel:
            stub = retrieval_pb2_grpc.RetrieverStub(channel)
            i = 0
            while not stop.is_set():
                try:
                    _, trailer, _ = call(stub, user_id=str(snapshot["users"][i % 50]))
                    versions.add(trailer["nann-model-version"])
                    outcomes.append("OK")
                except grpc.RpcError as e:
                    outcomes.append(e.code().name)
                i += 1

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        _copy_version(served_workdir / "export" / "1", base, 2)
        deadline = time.monotonic() + 120
        while "2" not in versions and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "2" in versions, server.log()[-3000:]
        damaged = _copy_version(served_workdir / "export" / "1", base, 3)
        variables = next((damaged / "variables").glob("*.data-*"))
        blob = bytearray(variables.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        variables.write_bytes(bytes(blob))
        deadline = time.monotonic() + 60
        while (
            time.monotonic() < deadline
            and _sum(_samples(server.metrics_text()), "nann_model_reloads_total", outcome="refused") < 1
        ):
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    samples = _samples(server.metrics_text())
    assert _sum(samples, "nann_model_reloads_total", outcome="refused") == 1
    assert _sum(samples, "nann_model_reloads_total", outcome="success") == 1
    assert _sum(samples, "nann_model_version_info", version="2") == 1
    assert set(outcomes) == {"OK"} and len(outcomes) > 20, outcomes[-5:]
    assert "3" not in versions
    assert "refused model version 3" in server.log()
    _, trailer, _ = call(
        retrieval_pb2_grpc.RetrieverStub(grpc.insecure_channel(server.target)),
        user_id=str(snapshot["users"][0]),
    )
    assert trailer["nann-model-version"] == "2"


@pytest.mark.e2e
def test_micro_batched_answers_equal_single_calls(start_server, served_workdir, snapshot, saved_model):
    server = start_server(
        "--model", str(served_workdir / "export"), "--max-batch", "8", "--batch-window-ms", "20"
    )
    answers = {}

    def one(i):
        with grpc.insecure_channel(server.target) as channel:
            answers[i] = call(retrieval_pb2_grpc.RetrieverStub(channel), user_id=str(snapshot["users"][i]))[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for i in range(8):
        ids, _, _ = model_answer(saved_model, user_history(snapshot, i))
        assert [c.item_id for c in answers[i]] == ids.tolist()
    assert _sum(_samples(server.metrics_text()), "nann_batch_users_sum") == 8


@pytest.mark.e2e
def test_a_cancelled_call_is_dropped_before_the_model_runs_it(start_server, served_workdir, snapshot):
    # A 2 s batching window holds the call in the queue; the client cancels it meanwhile.
    server = start_server(
        "--model", str(served_workdir / "export"), "--max-batch", "8", "--batch-window-ms", "2000"
    )
    with grpc.insecure_channel(server.target) as channel:
        stream = retrieval_pb2_grpc.RetrieverStub(channel).Retrieve(
            retrieval_pb2.RetrieveRequest(user_id=str(snapshot["users"][0])), timeout=30
        )
        time.sleep(0.5)
        stream.cancel()
        with pytest.raises(grpc.RpcError) as caught:
            list(stream)
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        samples = _samples(server.metrics_text())
        if _sum(samples, "grpc_server_handled_total", grpc_code="CANCELLED") == 1:
            break
        time.sleep(0.2)
    assert _sum(samples, "grpc_server_handled_total", grpc_code="CANCELLED") == 1
    assert _sum(samples, "nann_batch_users_count") == 0  # no model call ran for it
    assert server.health() == "SERVING"


def test_a_damaged_first_version_stops_the_start_with_a_clear_message(start_server, served_workdir, tmp_path):
    base = tmp_path / "export"
    base.mkdir()
    damaged = _copy_version(served_workdir / "export" / "1", base, 1)
    (damaged / "assets.extra" / "item_ids.npy").write_bytes(b"not numpy")
    server = start_server(
        "--model", str(base), "--features", f"embedded:{served_workdir / 'features'}", wait=False
    )
    assert server.proc.wait(120) == 2
    assert "does not match its recorded sha256" in server.log()


def test_bad_settings_are_refused_before_anything_starts(served_workdir):
    out = subprocess.run(
        [sys.executable, "-m", "server", "--model", str(served_workdir / "export"), "--chunk-size", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"NANN_MAX_K": "ten", "PATH": ""},
    )
    assert out.returncode == 2
    assert "NANN_MAX_K='ten'" in out.stderr
