"""``python -m loadtest.stack``: the monitoring stack without containers, checked end to end.

Starts, on loopback ports of this machine:

1. the feature loader, once: ``W/features`` into Redis (``--redis``, default DB 13 of the local
   Redis) with ``python -m server.features load``;
2. the Retrieve server on ``W/export`` with the Redis store;
3. a real Prometheus server (Debian/Ubuntu package ``prometheus``) scraping the server's
   /metrics every second, with ``deploy/prometheus``'s recording and alerting rules;
4. a bounded headless locust run (``python -m loadtest.run``);

then asks Prometheus for the Retrieve request rate over the run and compares it with locust's:
they must agree within ``--tolerance`` (default 10%), with no failed call. Writes
``stack.json`` (and locust's reports) into ``--out``; exits 1 if a check fails.

    python -m loadtest.stack --workdir W --users 4 --duration 30 --out runs/stack
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

from loadtest import run as loadrun
from server.client import wait_serving

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus"
RETRIEVE = 'grpc_server_handled_total{grpc_service="nann.retrieval.v1.Retriever",grpc_method="Retrieve"}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A child process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict | None = None):
        self.name, self.log = name, log
        self._file = open(log, "w")
        self.proc = subprocess.Popen(
            cmd, stdout=self._file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=ROOT
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._file.close()
        return self.proc.returncode

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def prometheus_config(metrics_port: int, rules_dir: Path) -> str:
    return f"""global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - {rules_dir / "recording_rules.yml"}
  - {rules_dir / "alert_rules.yml"}
scrape_configs:
  - job_name: nann-retrieval
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
"""


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, timeout: float = 5.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read()

    def wait_ready(self, timeout: float, alive) -> bool:
        deadline = time.monotonic() + timeout
        while alive() and time.monotonic() < deadline:
            try:
                self.get("/-/ready", timeout=1.0)
                return True
            except OSError:
                time.sleep(0.3)
        return False

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        body = json.loads(self.get("/api/v1/query?" + urllib.parse.urlencode(params)))
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus query {expr!r} failed: {body}")
        return body["data"]["result"]

    def scalar(self, expr: str, at: float | None = None) -> float | None:
        result = self.query(expr, at)
        return float(result[0]["value"][1]) if result else None

    def target_health(self) -> list[str]:
        body = json.loads(self.get("/api/v1/targets"))
        return [t["health"] for t in body["data"]["activeTargets"]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.stack",
        description="Server (Redis store) + real Prometheus + headless locust on this machine, checked.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--workdir", required=True, help="workdir with export/ and features/")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/13", help="Redis the features are loaded into")
    p.add_argument("--users", type=int, default=4, help="locust users (calls in flight)")
    p.add_argument("--duration", type=float, default=30.0, help="locust run time, seconds (>= 15)")
    p.add_argument("--k", type=int, default=0, help="candidates per call (0 = the model's default)")
    p.add_argument("--deadline-s", type=float, default=2.0, help="deadline of every call")
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed relative QPS disagreement")
    p.add_argument("--prometheus", default="prometheus", help="the Prometheus server binary")
    p.add_argument("--out", required=True, help="directory for stack.json, logs and locust's reports")
    args = p.parse_args(argv)
    if args.duration < 15:
        p.error("--duration must be at least 15 s: the first 5 s and the last 3 s are not compared")
    for sub in ("export", "features"):
        if not (Path(args.workdir) / sub).is_dir():
            p.error(f"--workdir {args.workdir} has no {sub}/ (python -m model_export export / features)")
    if shutil.which(args.prometheus) is None:
        p.error(f"{args.prometheus!r} not found: install the Prometheus server (Debian package prometheus)")
    return args


def run_stack(args: argparse.Namespace) -> dict:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir).resolve()
    py = sys.executable
    env = {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    load = subprocess.run(
        [py, "-m", "server.features", "load", "--snapshot", str(work / "features"), "--redis", args.redis],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    (out / "loader.log").write_text(load.stdout + load.stderr)
    if load.returncode != 0:
        raise SystemExit(f"feature loader failed (exit {load.returncode}):\n{load.stderr[-2000:]}")
    port, metrics_port, prom_port = free_port(), free_port(), free_port()
    target = f"127.0.0.1:{port}"
    started: list[Process] = []
    tmp = Path(tempfile.mkdtemp(prefix="nann-prometheus-"))
    try:
        server = Process(
            "server",
            [py, "-m", "server", "--model", str(work / "export"), "--features", args.redis]
            + ["--port", str(port), "--metrics-port", str(metrics_port), "--reload-interval-s", "0"],
            out / "server.log",
            env,
        )
        started.append(server)
        (tmp / "prometheus.yml").write_text(prometheus_config(metrics_port, RULES))
        prom_proc = Process(
            "prometheus",
            [
                args.prometheus,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
            ]
            + [f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
            out / "prometheus.log",
        )
        started.append(prom_proc)
        prom = Prometheus(f"http://127.0.0.1:{prom_port}")
        if not wait_serving(target, timeout=300, alive=server.alive):
            raise SystemExit(f"the server did not become SERVING:\n{server.tail()}")
        if not prom.wait_ready(timeout=60, alive=prom_proc.alive):
            raise SystemExit(f"Prometheus did not become ready:\n{prom_proc.tail()}")
        deadline = time.monotonic() + 30
        while prom.target_health() != ["up"] and time.monotonic() < deadline:
            time.sleep(0.5)
        if prom.target_health() != ["up"]:
            raise SystemExit(f"Prometheus does not reach the server's /metrics: {prom.target_health()}")
        print(f"server {target} (Redis store {args.redis}), Prometheus :{prom_port} scraping :{metrics_port}")

        load_args = loadrun.parse_args(
            ["--host", target, "--features", str(work / "features"), "--out", str(out / "locust")]
            + ["--users", str(args.users), "--duration", str(args.duration), "--k", str(args.k)]
            + ["--deadline-s", str(args.deadline_s)]
        )
        locust = loadrun.run(load_args)
        time.sleep(3)  # two more scrapes and rule evaluations after the last call
        # The steady part of the run: 5 s in (users starting) to 3 s before the end (users stopping).
        t_a, t_b = locust["started_unix"] + 5, locust["started_unix"] + args.duration - 3
        window = int(t_b - t_a)
        prom_qps = prom.scalar(f"sum(rate({RETRIEVE}[{window}s]))", at=t_a + window)
        by_code = {
            r["metric"].get("grpc_code", ""): float(r["value"][1])
            for r in prom.query(f"sum by (grpc_code) ({RETRIEVE})")
        }
        recorded = prom.scalar("sum(nann:retrieve_qps:rate1m)", at=t_a + window)
        firing = [r["metric"].get("alertname") for r in prom.query('ALERTS{alertstate="firing"}')]
        server_exit = server.stop()
    finally:
        for proc in reversed(started):
            proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = prom_qps / locust["qps"] if prom_qps and locust["qps"] else None
    checks = {
        "no_failed_call": locust["failures"] == 0,
        "qps_agree": ratio is not None and abs(ratio - 1) <= args.tolerance,
        # The server also counts calls that locust's stopping users did not record (up to about a
        # second of load: 0.75 s, 2.6% of a 30 s run, was seen at 440 QPS), so the server may count
        # up to one second of calls more, never fewer.
        "prometheus_counted_the_calls": locust["calls"]
        <= by_code.get("OK", 0)
        <= locust["calls"] + locust["qps"] + args.users,
        "recording_rule_evaluated": recorded is not None and recorded > 0,
        "no_alert_firing": not firing,
        "server_exit_0": server_exit == 0,
    }
    summary = {
        "workdir": work.name,
        "redis": args.redis,
        "users": args.users,
        "duration_s": args.duration,
        "locust": {k: locust[k] for k in ("calls", "failures", "qps", "whole_call_ms", "first_message_ms")},
        "prometheus": {
            "query": f"sum(rate({RETRIEVE}[{window}s]))",
            "window": "5 s after the start to 3 s before the end of the locust run",
            "qps": prom_qps,
            "calls_by_code": by_code,
            "recorded_nann:retrieve_qps:rate1m": recorded,
            "alerts_firing": firing,
        },
        "prometheus_over_locust": ratio,
        "tolerance": args.tolerance,
        "checks": checks,
    }
    (out / "stack.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = run_stack(args)
    lq, pq, ratio = s["locust"]["qps"], s["prometheus"]["qps"], s["prometheus_over_locust"]
    print(
        f"locust: {s['locust']['calls']} calls, {s['locust']['failures']} failed, {lq:.1f} QPS; "
        f"Prometheus: {'none' if pq is None else f'{pq:.1f}'} QPS, ratio "
        f"{'none' if ratio is None else f'{ratio:.3f}'}"
    )
    for name, ok in s["checks"].items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    print(f"written: {Path(args.out) / 'stack.json'}")
    return 0 if all(s["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
