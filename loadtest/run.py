"""``python -m loadtest.run``: a bounded headless locust run against a running Retrieve server.

Fixed load (``--users N --duration S``) or a step load (``--step-users 1,2,4,8 --step-s 30``)
that finds the highest sustained QPS at p99 <= ``--p99-ms``. Writes locust's CSV files
(``locust_stats.csv``, ``locust_failures.csv``, ...), its HTML report and ``summary.json`` into
``--out``, prints a summary, and exits 1 if any call failed.

    python -m loadtest.run --host 127.0.0.1:50051 --features W/features --users 4 --duration 30 \
        --out runs/load
    python -m loadtest.run --host 127.0.0.1:50051 --features W/features --step-users 1,2,4,8 \
        --out runs/steps
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
ROOT = LOCUSTFILE.parents[1]
WHOLE = "Retrieve"
FIRST = "Retrieve first message"


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.run",
        description="Bounded headless locust run against a Retrieve server; CSV + HTML reports.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--host", required=True, help="the server's HOST:PORT")
    p.add_argument("--features", required=True, help="DIR/features snapshot the users are drawn from")
    p.add_argument("--out", required=True, help="directory for the CSV and HTML reports")
    p.add_argument("--users", type=int, default=4, help="concurrent callers (fixed load)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds (fixed load)")
    p.add_argument("--step-users", type=_csv_ints, help="step load: user counts, one step each")
    p.add_argument("--step-s", type=float, default=30.0, help="step load: seconds per step")
    p.add_argument("--settle-s", type=float, default=5.0, help="step load: seconds not counted per step")
    p.add_argument("--p99-ms", type=float, default=50.0, help="step load: the p99 objective")
    p.add_argument("--k", type=int, default=0, help="candidates per call (0 = the model's default)")
    p.add_argument("--deadline-s", type=float, default=2.0, help="deadline of every call")
    p.add_argument("--inline", type=float, default=0.0, help="fraction of calls sending the history inline")
    p.add_argument("--ef", default="", help="per-layer ef, comma-separated (default: the model's)")
    p.add_argument("--steps", default="", help="per-layer T, comma-separated (default: the model's)")
    p.add_argument("--mode", default="", help="search mode, e.g. beam or beam_history (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the user draw")
    args = p.parse_args(argv)
    if args.users < 1 or args.duration <= 0:
        p.error("--users must be >= 1 and --duration > 0")
    if not 0 <= args.inline <= 1:
        p.error("--inline is a fraction in [0, 1]")
    if args.step_users and not 0 <= args.settle_s < args.step_s:
        p.error("--settle-s must lie in [0, --step-s)")
    if not Path(args.features, "meta.json").is_file():
        p.error(
            f"--features {args.features}: no meta.json there; write one with python -m model_export features"
        )
    return args


def read_stats(path: Path) -> dict[str, dict[str, str]]:
    """locust_stats.csv -> {entry name: row}."""
    with open(path, newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def read_failures(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(
        NANN_LOADTEST_FEATURES=str(args.features),
        NANN_LOADTEST_K=str(args.k),
        NANN_LOADTEST_DEADLINE_S=str(args.deadline_s),
        NANN_LOADTEST_INLINE=str(args.inline),
        NANN_LOADTEST_EF=args.ef,
        NANN_LOADTEST_STEPS=args.steps,
        NANN_LOADTEST_MODE=args.mode,
        NANN_LOADTEST_SEED=str(args.seed),
    )
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", args.host]
    cmd += ["--csv", str(out / "locust"), "--html", str(out / "report.html"), "--only-summary"]
    cmd += ["--stop-timeout", str(int(args.deadline_s) + 2), "--loglevel", "WARNING"]
    if args.step_users:
        env.update(
            NANN_LOADTEST_STEP_USERS=",".join(map(str, args.step_users)),
            NANN_LOADTEST_STEP_S=str(args.step_s),
            NANN_LOADTEST_SETTLE_S=str(args.settle_s),
            NANN_LOADTEST_P99_MS=str(args.p99_ms),
            NANN_LOADTEST_REPORT=str(out / "steps.json"),
        )
        bound = len(args.step_users) * args.step_s
    else:
        env.pop("NANN_LOADTEST_STEP_USERS", None)
        cmd += [
            "--users",
            str(args.users),
            "--spawn-rate",
            str(args.users),
            "--run-time",
            f"{args.duration:g}s",
        ]
        bound = args.duration
    started = time.time()
    print(
        f"locust: {'step load' if args.step_users else f'{args.users} users'}, about {bound:.0f} s",
        flush=True,
    )
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=bound + 120, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"locust did not finish within {bound + 120:.0f} s; see {out}") from None
    (out / "locust.log").write_text(proc.stdout + proc.stderr)
    stats_path = out / "locust_stats.csv"
    if not stats_path.exists():
        raise SystemExit(f"locust wrote no statistics (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    stats = read_stats(stats_path)
    whole = stats.get(WHOLE)
    if whole is None:
        raise SystemExit(f"locust made no Retrieve call (exit {proc.returncode}); see {out / 'locust.log'}")
    first = stats.get(FIRST, {})
    summary = {
        "host": args.host,
        "features": str(args.features),
        "started_unix": started,
        "finished_unix": time.time(),
        "mode": "step" if args.step_users else "fixed",
        "users": args.step_users or args.users,
        "k": args.k,
        "deadline_s": args.deadline_s,
        "inline_fraction": args.inline,
        "calls": int(whole["Request Count"]),
        "failures": int(whole["Failure Count"]),
        "qps": float(whole["Requests/s"]),
        "whole_call_ms": {q: float(whole[q]) for q in ("50%", "90%", "99%", "Max Response Time")},
        "first_message_ms": {q: float(first[q]) for q in ("50%", "90%", "99%")} if first else None,
        "failures_by_error": {
            f["Error"]: int(f["Occurrences"]) for f in read_failures(out / "locust_failures.csv")
        },
        "locust_exit": proc.returncode,
    }
    if args.step_users:
        steps_path = out / "steps.json"
        summary["steps"] = json.loads(steps_path.read_text()) if steps_path.exists() else None
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = run(args)
    w, f = s["whole_call_ms"], s["first_message_ms"] or {}
    print(
        f"{s['calls']} calls, {s['failures']} failed, {s['qps']:.1f} QPS; whole call p50 {w['50%']:.0f} ms, "
        f"p90 {w['90%']:.0f} ms, p99 {w['99%']:.0f} ms; first message p50 {f.get('50%', float('nan')):.0f} ms"
    )
    for error, n in s["failures_by_error"].items():
        print(f"  {n} x {error}")
    if s.get("steps"):
        from loadtest.steps import StepRecorder

        print(StepRecorder.format(s["steps"]))
    print(f"reports: {Path(args.out) / 'report.html'}, {Path(args.out) / 'locust_stats.csv'}, summary.json")
    return 1 if s["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
