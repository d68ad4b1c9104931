"""Locust load test of the Retrieve service (gRPC, server streaming).

    NANN_LOADTEST_FEATURES=W/features locust -f loadtest/locustfile.py --host 127.0.0.1:50051

Each simulated user calls Retrieve back to back (no think time: the user count is the number of
calls in flight) for users drawn at random from the feature snapshot, consumes the whole
candidate stream and reports two entries: ``Retrieve first message`` (time to the first streamed
candidates) and ``Retrieve`` (time to the last message, i.e. the whole call; its count is the
call count). A failed call is one ``Retrieve`` failure named by its status code
(``DEADLINE_EXCEEDED: ...``); so is an answer with no candidates.

Settings (environment):

- ``NANN_LOADTEST_FEATURES``  (required) a ``DIR/features`` snapshot (``python -m model_export
  features``); users are drawn from it
- ``NANN_LOADTEST_INLINE``    fraction of calls that send the user's history inline instead of
  the user id (default 0: the server reads its feature store)
- ``NANN_LOADTEST_K``         candidates per call (default 0: the model's default)
- ``NANN_LOADTEST_DEADLINE_S`` deadline of every call (default 2.0)
- ``NANN_LOADTEST_EF``, ``NANN_LOADTEST_STEPS``  per-layer search parameters, comma-separated
  (default: the model's)
- ``NANN_LOADTEST_MODE``      search mode, e.g. beam or beam_history (default: the model's)
- ``NANN_LOADTEST_SEED``      seed of the user draw (default 0)
- ``NANN_LOADTEST_STEP_USERS`` step load: comma-separated user counts, one step each (e.g.
  ``1,2,4,8,16``); unset = locust's usual ``-u``/``-r``/``-t``
- ``NANN_LOADTEST_STEP_S``    seconds per step (default 30); the first ``NANN_LOADTEST_SETTLE_S``
  (default 5) of each step are not counted
- ``NANN_LOADTEST_P99_MS``    the step load's latency objective (default 50)
- ``NANN_LOADTEST_REPORT``    where the step load writes its per-step table (JSON)

With the step load, the run prints each step's sustained QPS and p50 / p99 of whole calls, and
the highest QPS whose p99 is within the objective.
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import LoadTestShape, User, events, task  # first: locust patches the stdlib for gevent

# isort: split
import grpc
import grpc.experimental.gevent as grpc_gevent

from loadtest.steps import StepRecorder
from nann.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from server.features import EmbeddedStore

grpc_gevent.init_gevent()

FIRST = "Retrieve first message"
WHOLE = "Retrieve"


def _env_ints(name: str) -> list[int]:
    text = os.environ.get(name, "").strip()
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{name}={text!r}: expected comma-separated integers") from None


def _env_float(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    try:
        return float(text) if text else default
    except ValueError:
        raise SystemExit(f"{name}={text!r}: expected a number") from None


class Workload:
    """Users and request settings from the environment, loaded once per locust process."""

    def __init__(self):
        features = os.environ.get("NANN_LOADTEST_FEATURES", "").strip()
        if not features:
            raise SystemExit(
                "NANN_LOADTEST_FEATURES is not set: point it at a DIR/features snapshot "
                "(python -m model_export features --workdir DIR)"
            )
        try:
            self.store = EmbeddedStore(features)
        except Exception as e:  # noqa: BLE001  (the message names the file and the fix)
            raise SystemExit(f"NANN_LOADTEST_FEATURES={features}: {e}") from None
        lengths = self.store.offsets[1:] - self.store.offsets[:-1]
        self.users = [int(u) for u, n in zip(self.store.users, lengths, strict=True) if n > 0]
        if not self.users:
            raise SystemExit(f"{features}: no user has a history")
        self.inline = _env_float("NANN_LOADTEST_INLINE", 0.0)
        self.k = int(_env_float("NANN_LOADTEST_K", 0))
        self.deadline_s = _env_float("NANN_LOADTEST_DEADLINE_S", 2.0)
        ef, steps = _env_ints("NANN_LOADTEST_EF"), _env_ints("NANN_LOADTEST_STEPS")
        mode = os.environ.get("NANN_LOADTEST_MODE", "").strip()
        self.params = (
            retrieval_pb2.SearchParams(mode=mode, ef=ef, steps=steps) if ef or steps or mode else None
        )
        self.seed = int(_env_float("NANN_LOADTEST_SEED", 0))

    def request(self, rng: random.Random, number: int) -> retrieval_pb2.RetrieveRequest:
        user = rng.choice(self.users)
        request = retrieval_pb2.RetrieveRequest(k=self.k, request_id=f"locust-{number}")
        if self.params is not None:
            request.params.CopyFrom(self.params)
        if self.inline > 0 and rng.random() < self.inline:
            request.history.extend(int(x) for x in self.store.history(str(user)))
        else:
            request.user_id = str(user)
        return request


_workload: Workload | None = None
_recorder: StepRecorder | None = None
_user_count = 0


def workload() -> Workload:
    global _workload
    if _workload is None:
        _workload = Workload()
    return _workload


@events.init.add_listener
def _on_init(environment, **_kwargs):
    workload()  # fail at start-up, not in the first call, when the snapshot is missing
    if STEP_USERS and environment.runner is not None:
        global _recorder
        _recorder = StepRecorder(STEP_USERS, STEP_S, SETTLE_S)


@events.test_start.add_listener
def _on_test_start(**_kwargs):
    if _recorder is not None:
        _recorder.start(time.monotonic())


@events.request.add_listener
def _on_request(name, response_time, exception, **_kwargs):
    if _recorder is not None and name == WHOLE:
        _recorder.add(time.monotonic(), response_time, exception is None)


@events.quitting.add_listener
def _on_quitting(environment, **_kwargs):
    if _recorder is None:
        return
    summary = _recorder.summary(P99_MS)
    print(_recorder.format(summary), flush=True)
    report = os.environ.get("NANN_LOADTEST_REPORT", "").strip()
    if report:
        with open(report, "w") as f:
            json.dump(summary, f, indent=2)


class CallFailed(Exception):
    """A failed Retrieve, named by its gRPC status code so locust groups failures by code."""


class RetrieveUser(User):
    """One caller: Retrieve back to back, the whole stream consumed, a deadline on every call."""

    def on_start(self):
        global _user_count
        _user_count += 1
        self.work = workload()
        self.rng = random.Random(self.work.seed * 100_003 + _user_count)
        self.calls = 0
        self.channel = grpc.insecure_channel(self.host)
        self.stub = retrieval_pb2_grpc.RetrieverStub(self.channel)

    def on_stop(self):
        self.channel.close()

    @task
    def retrieve(self):
        self.calls += 1
        request = self.work.request(self.rng, self.calls)
        fire = self.environment.events.request.fire
        started = time.perf_counter()
        candidates, error = 0, None
        try:
            for message in self.stub.Retrieve(request, timeout=self.work.deadline_s):
                if candidates == 0:
                    fire(
                        request_type="grpc",
                        name=FIRST,
                        response_time=(time.perf_counter() - started) * 1000,
                        response_length=len(message.candidates),
                        exception=None,
                        context={},
                    )
                candidates += len(message.candidates)
            if candidates == 0:
                error = CallFailed("EMPTY: the answer had no candidates")
        except grpc.RpcError as e:
            error = CallFailed(f"{e.code().name}: {e.details()}")
        fire(
            request_type="grpc",
            name=WHOLE,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=candidates,
            exception=error,
            context={"user_id": request.user_id},
        )


STEP_USERS = _env_ints("NANN_LOADTEST_STEP_USERS")
STEP_S = _env_float("NANN_LOADTEST_STEP_S", 30.0)
SETTLE_S = _env_float("NANN_LOADTEST_SETTLE_S", 5.0)
P99_MS = _env_float("NANN_LOADTEST_P99_MS", 50.0)

if STEP_USERS:

    class StepLoad(LoadTestShape):
        """Holds each user count of NANN_LOADTEST_STEP_USERS for NANN_LOADTEST_STEP_S, then stops."""

        def tick(self):
            step = int(self.get_run_time() // STEP_S)
            if step >= len(STEP_USERS):
                return None
            users = STEP_USERS[step]
            return users, users
