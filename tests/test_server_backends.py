"""The production parts: the Redis feature store (the machine's Redis and one of the test's own)
and the TF Serving backend (real tensorflow-serving-api protos against a PredictionService
double that runs the same SavedModel, since no TF Serving binary exists here)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ROOT, free_port

from nann.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from server import features


def call(target, **fields):
    with grpc.insecure_channel(target) as channel:
        stream = retrieval_pb2_grpc.RetrieverStub(channel).Retrieve(
            retrieval_pb2.RetrieveRequest(**fields), timeout=30
        )
        candidates = [c for m in stream for c in m.candidates]
        return candidates, dict(stream.trailing_metadata())


@pytest.fixture(scope="module")
def snapshot(served_workdir):
    d = served_workdir / "features"
    return {name: np.load(d / f"{name}.npy") for name in ("users", "offsets", "items")}


@pytest.fixture
def shared_redis(served_workdir, redis_db13):
    """The snapshot loaded into DB 13 of the machine's Redis; our keys are deleted afterwards."""
    features.load_snapshot(served_workdir / "features", redis_db13)
    return redis_db13


class OwnRedis:
    """A redis-server of the test's own on a free port, to stop and restart at will."""

    def __init__(self, directory: Path):
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed (Debian package redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = features.redis_client(self.url, timeout_s=0.5)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                client.ping()
                return
            except Exception:
                time.sleep(0.05)
        raise AssertionError("own redis-server did not start")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


def test_redis_round_trip_equals_the_snapshot(shared_redis, snapshot):
    store = features.RedisStore(shared_redis)
    for i in (0, 17, len(snapshot["users"]) - 1):
        expect = snapshot["items"][snapshot["offsets"][i] : snapshot["offsets"][i + 1]]
        np.testing.assert_array_equal(store.history(str(snapshot["users"][i])), expect)
    assert store.history("no-such-user") is None
    store.close()


@pytest.mark.e2e
def test_server_on_redis_answers_as_on_the_embedded_store(
    start_server, served_workdir, shared_redis, snapshot
):
    embedded = start_server("--model", str(served_workdir / "export"))
    on_redis = start_server("--model", str(served_workdir / "export"), "--features", shared_redis)
    for i in (0, 9):
        user = str(snapshot["users"][i])
        assert [c.item_id for c in call(on_redis.target, user_id=user)[0]] == [
            c.item_id for c in call(embedded.target, user_id=user)[0]
        ]


@pytest.mark.e2e
def test_an_appended_behaviour_changes_the_next_answer(start_server, served_workdir, shared_redis, snapshot):
    server = start_server("--model", str(served_workdir / "export"), "--features", shared_redis)
    user = str(snapshot["users"][4])
    before = [c.item_id for c in call(server.target, user_id=user)[0]]
    # Append behaviours from another user's, different history: the real-time path.
    other = snapshot["items"][snapshot["offsets"][200] : snapshot["offsets"][201]][-5:]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.features",
            "append",
            "--redis",
            shared_redis,
            "--user",
            user,
            *[f"--item={int(x)}" for x in other],
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    after, trailer = call(server.target, user_id=user)
    assert [c.item_id for c in after] != before
    expect = np.concatenate([snapshot["items"][snapshot["offsets"][4] : snapshot["offsets"][5]], other])[-50:]
    np.testing.assert_array_equal(features.RedisStore(shared_redis).history(user), expect)
    assert trailer["nann-history-length"] == str(len(expect))


@pytest.mark.e2e
def test_unavailable_while_redis_is_down_and_recovers_by_itself(
    start_server, served_workdir, snapshot, tmp_path
):
    redis = OwnRedis(tmp_path)
    redis.start()
    try:
        features.load_snapshot(served_workdir / "features", redis.url)
        server = start_server(
            "--model", str(served_workdir / "export"), "--features", redis.url, "--redis-timeout-s", "0.2"
        )
        user = str(snapshot["users"][2])
        expect = [c.item_id for c in call(server.target, user_id=user)[0]]
        redis.stop()
        with pytest.raises(grpc.RpcError) as caught:
            call(server.target, user_id=user)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "redis" in caught.value.details()
        assert server.health() == "SERVING"
        redis.start()
        features.load_snapshot(served_workdir / "features", redis.url)  # it kept nothing on disk
        deadline = time.monotonic() + 30
        while True:
            try:
                got = [c.item_id for c in call(server.target, user_id=user)[0]]
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                time.sleep(0.2)
        assert got == expect
        assert "nann_feature_store_errors_total" in server.metrics_text()
    finally:
        redis.stop()


# -- TF Serving ----------------------------------------------------------------------------------


class PredictionServiceDouble:
    """A PredictionService that answers Predict from the same SavedModel directory, as TF Serving does:
    model name, signature name and version checked, tensors through TensorProto both ways, and each
    version's warm-up records replayed before it answers (TF Serving's --enable_model_warmup, which
    the compose file and the k8s manifests set): a signature's first call builds its graph."""

    def __init__(self, base: Path, name: str):
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_log_pb2, prediction_service_pb2_grpc

        self.models = {int(p.name): tf.saved_model.load(str(p)) for p in base.iterdir() if p.name.isdigit()}
        for version, model in self.models.items():
            records = base / str(version) / "assets.extra" / "tf_serving_warmup_requests"
            for raw in tf.data.TFRecordDataset(str(records)) if records.exists() else ():
                request = prediction_log_pb2.PredictionLog.FromString(raw.numpy()).predict_log.request
                inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
                model.signatures[request.model_spec.signature_name](**inputs)
        self.name = name
        self.requests = []
        double = self

        class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
            def Predict(self, request, context):
                double.requests.append(request)
                if request.model_spec.name != double.name:
                    context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found: {request.model_spec.name}")
                version = request.model_spec.version.value or max(double.models)
                if version not in double.models:
                    context.abort(grpc.StatusCode.NOT_FOUND, f"version {version} not loaded")
                fn = double.models[version].signatures[request.model_spec.signature_name or "serving_default"]
                inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
                try:
                    out = fn(**inputs)
                except tf.errors.InvalidArgumentError as e:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.message)
                response = predict_pb2.PredictResponse()
                response.model_spec.CopyFrom(request.model_spec)
                response.model_spec.version.value = version
                for k, v in out.items():
                    response.outputs[k].CopyFrom(tf.make_tensor_proto(v.numpy()))
                return response

        self.port = free_port()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Servicer(), self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    def stop(self):
        self.server.stop(0).wait()


@pytest.mark.e2e
def test_tfserving_backend_answers_as_the_in_process_one(start_server, served_workdir, snapshot):
    categories = json.loads(
        (served_workdir / "export" / "1" / "assets.extra" / "categories.json").read_text()
    )
    double = PredictionServiceDouble(served_workdir / "export", "nann")
    try:
        via_tfs = start_server(
            "--model",
            str(served_workdir / "export"),
            "--backend",
            f"tfserving://127.0.0.1:{double.port}/nann",
        )
        local = start_server("--model", str(served_workdir / "export"))
        for i in (0, 5, 77):
            user = str(snapshot["users"][i])
            remote, trailer = call(via_tfs.target, user_id=user, k=20)
            mine, _ = call(local.target, user_id=user, k=20)
            assert [c.item_id for c in remote] == [c.item_id for c in mine]
            np.testing.assert_allclose([c.score for c in remote], [c.score for c in mine], rtol=1e-6)
            assert trailer["nann-model-version"] == "1"
            # Filters travel as the retrieve signature's inputs: the same answer and plan.
            row_filter = retrieval_pb2.Filter(exclude_history=True, categories=[int(categories[i % 2])])
            remote, trailer = call(via_tfs.target, user_id=user, k=20, filter=row_filter)
            mine, local_trailer = call(local.target, user_id=user, k=20, filter=row_filter)
            assert len(remote) == 20 and [c.item_id for c in remote] == [c.item_id for c in mine]
            assert trailer["nann-plan"] == local_trailer["nann-plan"]
        plain, last = double.requests[-2:]
        assert plain.model_spec.name == "nann" and plain.model_spec.signature_name == "retrieve"
        assert plain.model_spec.version.value == 1  # pinned to the version whose contract is loaded
        assert set(plain.inputs) == {"history", "k", "ef", "steps", "mode"}
        assert last.model_spec.signature_name == "retrieve_filtered"
        assert set(last.inputs) == {"history", "k", "ef", "steps", "mode"} | {
            "exclude_items",
            "exclude_history",
            "allow_categories",
            "exclude_categories",
        }
        # TF Serving going away: UNAVAILABLE (after the retries), and the server stays up.
        double.stop()
        with pytest.raises(grpc.RpcError) as caught:
            call(via_tfs.target, user_id=str(snapshot["users"][0]))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert via_tfs.health() == "SERVING"
    finally:
        double.stop()


def test_warmup_records_are_predict_requests_tf_serving_can_replay(served_workdir):
    """assets.extra/tf_serving_warmup_requests: PredictionLog records against the retrieve signature."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = served_workdir / "export" / "1" / "assets.extra" / "tf_serving_warmup_requests"
    model = tf.saved_model.load(str(path.parents[1]))
    sizes, names = [], []
    for raw in tf.data.TFRecordDataset(str(path)):
        log = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        request = log.predict_log.request
        name = request.model_spec.signature_name
        assert name in ("retrieve", "retrieve_filtered")
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        out = model.signatures[name](**inputs)
        sizes.append(int(out["item_ids"].shape[0]))
        names.append(name)
    assert 1 <= len(sizes) <= 1000 and set(sizes) == {1, 4, 16, 32}
    assert names.count("retrieve_filtered") == 3  # each filter kind once, so its first call is warm


@pytest.mark.e2e
def test_tls_serves_a_client_that_trusts_the_certificate(start_server, served_workdir, snapshot, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (Debian package openssl)")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    server = start_server(
        "--model", str(served_workdir / "export"), "--tls-cert", str(cert), "--tls-key", str(key), wait=False
    )
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    deadline = time.monotonic() + 180
    while True:
        with grpc.secure_channel(server.target, creds) as channel:
            try:
                stream = retrieval_pb2_grpc.RetrieverStub(channel).Retrieve(
                    retrieval_pb2.RetrieveRequest(user_id=str(snapshot["users"][0])), timeout=10
                )
                candidates = [c for m in stream for c in m.candidates]
                break
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, e
                time.sleep(0.5)
    assert len(candidates) == 10
    with pytest.raises(grpc.RpcError):  # a plaintext client is refused
        call(server.target, user_id=str(snapshot["users"][0]))
