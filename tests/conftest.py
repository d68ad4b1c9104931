"""Shared test fixtures: the real sample data beside the project, one trained and exported tiny
workdir for the whole test run, and a helper that runs the real server as a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nann_common.xla import configure as configure_xla

configure_xla()  # the tests compile XLA exports with the server's settings

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# start layer 1, as the tiny graph has few upper-layer nodes; k 10 leaves room in ef_0 = 40.
# Mode beam: the serving tests compare the server's default answers with beam's.
# The export's defaults (beam_history, T top-down (1,) 0, 5, every 2nd start node, the XLA signature)
# with k and ef fitted to a 1,500-item corpus: the tests serve the query production serves.
EXPORT_PARAMS = {"k": 10, "ef": (20, 40)}


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


@pytest.fixture(scope="session")
def served_workdir(tmp_path_factory) -> Path:
    """A tiny din model, its graph, ONE exported SavedModel (version 1) and the feature snapshot.

    Built once per test run: training and export are the slow part of every serving test.
    Tests must not write into it; copy ``export/1`` elsewhere to make new versions.
    """
    from index_builder.build import BuildConfig, build_index
    from model_export import data
    from model_export.export import ExportConfig, export
    from model_export.features import write_features
    from model_export.synthetic import synthesize
    from model_export.train import TrainConfig, train

    root = tmp_path_factory.mktemp("served")
    csv = root / "interactions.csv"
    synthesize(1500, 300, csv, seed=2, mean_length=20, show_progress=False)
    work = root / "work"
    data.save_dataset(data.load_dataset_from_file(csv), work / "dataset")
    train(
        data.load_dataset(work / "dataset"),
        work,
        TrainConfig(arch="din", epochs=1, batch_size=64, negatives=19, seed=0),
    )
    build_index(work, BuildConfig(m=8, ef_construction=40, threads=1))
    export(work, ExportConfig(**EXPORT_PARAMS))
    write_features(work)
    return work


SHARED_REDIS = "redis://127.0.0.1:6379/13"


@pytest.fixture
def redis_db13():
    """DB 13 of the machine's Redis (the test is skipped if none answers); every key the
    project writes there (``nann:*``) is deleted afterwards."""
    import redis

    from server import features

    client = features.redis_client(SHARED_REDIS, timeout_s=1.0)
    try:
        client.ping()
    except redis.exceptions.RedisError as e:
        pytest.skip(f"no Redis at {SHARED_REDIS} ({e}); the project's machines run one at 127.0.0.1:6379")
    yield SHARED_REDIS
    keys = list(client.scan_iter(match=features.KEY_PREFIX + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.delete(features.META_KEY)
    client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m server`` on free loopback ports, its log in a file; stopped by SIGTERM."""

    def __init__(self, log_path: Path, *args: str, env: dict | None = None):
        self.port, self.metrics_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server",
                "--port",
                str(self.port),
                "--metrics-port",
                str(self.metrics_port),
                *args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=ROOT,
        )

    def health(self, timeout: float = 2.0) -> str:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            except grpc.RpcError as e:
                return e.code().name
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_serving(self, timeout: float = 180.0, seen: list | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            status = self.health(timeout=1.0)
            if seen is not None and (not seen or seen[-1] != status):
                seen.append(status)
            if status == "SERVING":
                return
            time.sleep(0.1)
        raise AssertionError(f"server not SERVING after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def metrics_text(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def start_server(tmp_path):
    """Factory: start_server(*args) -> a ServerProcess already SERVING; all are stopped at teardown."""
    started = []

    def start(*args: str, wait: bool = True, env: dict | None = None) -> ServerProcess:
        server = ServerProcess(tmp_path / f"server-{len(started)}.log", *args, env=env)
        started.append(server)
        if wait:
            server.wait_serving()
        return server

    yield start
    for server in started:
        server.stop()
