"""loadtest/: the step load's arithmetic, real headless locust runs against the real server, and
the stack without containers (server on the Redis store + a real Prometheus + locust), whose
Prometheus request rate must agree with locust's within 10%."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.steps import StepRecorder

ROOT = Path(__file__).resolve().parents[1]


def _run(module: str, *args: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})},
    )


def test_step_recorder_counts_each_step_after_its_settle_time_and_picks_the_best_within_objective():
    rec = StepRecorder([1, 2, 4], step_s=10, settle_s=2)
    rec.add(0.5, 1.0, True)  # before start: ignored
    rec.start(100.0)
    for i in range(100):  # step 0: 10 ms calls, 0.1 s apart; the first 2 s are not counted
        rec.add(100.0 + i * 0.1, 10.0, True)
    for i in range(200):  # step 1: 20 calls/s over [10, 20) s, two slow calls
        rec.add(110.0 + i * 0.05, 300.0 if i in (50, 150) else 20.0, True)
    for i in range(400):  # step 2: faster but over the objective
        rec.add(120.0 + i * 0.025, 80.0, True)
    rec.add(131.0, 5.0, True)  # after the last step: ignored
    s = rec.summary(p99_ms=50)
    assert [st["calls"] for st in s["steps"]] == [80, 160, 320]
    assert s["steps"][0]["qps"] == pytest.approx(10.0)
    assert s["steps"][1]["p99_ms"] > 50  # 2 of 160 calls at 300 ms: p99 sees them
    assert [st["within_objective"] for st in s["steps"]] == [True, False, False]
    assert (s["max_qps_within_objective"], s["at_users"]) == (pytest.approx(10.0), 1)
    assert "highest sustained QPS at p99 <= 50 ms: 10.0 (1 users)" in StepRecorder.format(s)
    with pytest.raises(ValueError, match="settle"):
        StepRecorder([1], step_s=5, settle_s=5)


def test_locustfile_without_features_says_what_to_set(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANN_LOADTEST")}
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--headless", "-t", "1s"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode != 0
    assert "NANN_LOADTEST_FEATURES is not set" in result.stderr + result.stdout


@pytest.fixture(scope="module")
def server(served_workdir, tmp_path_factory):
    """One server on the embedded store for the headless runs of this module."""
    from conftest import ServerProcess

    process = ServerProcess(
        tmp_path_factory.mktemp("loadtest") / "server.log", "--model", str(served_workdir / "export")
    )
    process.wait_serving()
    yield process
    process.stop()


@pytest.mark.e2e
def test_headless_run_reports_first_and_last_message_and_failures_by_status_code(
    server, served_workdir, tmp_path
):
    features = str(served_workdir / "features")
    out = tmp_path / "ok"
    ok = _run(
        "loadtest.run",
        *("--host", server.target, "--features", features, "--out", str(out)),
        *("--users", "2", "--duration", "6", "--k", "10", "--inline", "0.5", "--mode", "beam_history"),
        timeout=180,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calls"] > 20 and summary["failures"] == 0
    assert summary["first_message_ms"]["50%"] <= summary["whole_call_ms"]["50%"]
    for name in ("report.html", "locust_stats.csv", "locust_failures.csv", "locust_stats_history.csv"):
        assert (out / name).stat().st_size > 0, name

    bad = tmp_path / "deadline"
    failed = _run(
        "loadtest.run",
        *("--host", server.target, "--features", features, "--out", str(bad)),
        *("--users", "2", "--duration", "3", "--k", "10", "--deadline-s", "0.0005"),
        timeout=180,
    )
    assert failed.returncode == 1, failed.stdout + failed.stderr
    summary = json.loads((bad / "summary.json").read_text())
    assert summary["failures"] > 0
    assert all("DEADLINE_EXCEEDED" in error for error in summary["failures_by_error"]), summary

    unknown = tmp_path / "mode"
    failed = _run(
        "loadtest.run",
        *("--host", server.target, "--features", features, "--out", str(unknown)),
        *("--users", "2", "--duration", "4", "--k", "10", "--mode", "greedy"),
        timeout=180,
    )
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert (unknown / "summary.json").exists(), failed.stdout + failed.stderr
    errors = json.loads((unknown / "summary.json").read_text())["failures_by_error"]
    assert errors and all("INVALID_ARGUMENT" in e and "mode must be one of" in e for e in errors), errors
    assert server.health() == "SERVING"


@pytest.mark.e2e
def test_step_load_prints_the_highest_qps_within_the_objective(server, served_workdir, tmp_path):
    out = tmp_path / "steps"
    result = _run(
        "loadtest.run",
        *("--host", server.target, "--features", str(served_workdir / "features"), "--out", str(out)),
        *("--step-users", "1,3", "--step-s", "5", "--settle-s", "1", "--p99-ms", "10000"),  # k: the default
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert [s["users"] for s in steps["steps"]] == [1, 3]
    assert all(s["calls"] > 0 and s["within_objective"] for s in steps["steps"])
    assert steps["max_qps_within_objective"] == max(s["qps"] for s in steps["steps"])
    assert "highest sustained QPS at p99 <= 10000 ms" in result.stdout


@pytest.mark.e2e
def test_stack_without_containers_prometheus_agrees_with_locust(served_workdir, redis_db13, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("the Prometheus server is not installed (Debian/Ubuntu package prometheus)")
    out = tmp_path / "stack"
    result = _run(
        "loadtest.stack",
        *("--workdir", str(served_workdir), "--redis", redis_db13, "--out", str(out)),
        *("--users", "4", "--duration", "30", "--k", "10"),
        timeout=600,
    )
    summary = json.loads((out / "stack.json").read_text()) if (out / "stack.json").exists() else None
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{summary}"
    assert summary["locust"]["failures"] == 0 and summary["locust"]["calls"] > 50
    assert abs(summary["prometheus_over_locust"] - 1) <= 0.10
    assert all(summary["checks"].values()), summary["checks"]
    assert (out / "locust" / "report.html").exists()
