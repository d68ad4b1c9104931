"""Is the server's default the fastest path? Start-up, first calls, steady latency and QPS per config.

For one workdir W (with ``export/`` and ``features/``) and each server configuration
``--config LABEL=FLAGS`` (FLAGS: server flags separated by spaces, may be empty), one after
another on this machine:

a. starts ``python -m server`` on W/export with the embedded store and times it to SERVING
   (the in-process backend warms the XLA scorer up at every shape before it reports SERVING);
b. one caller calls Retrieve by user_id (users drawn seeded from W/features/users.npy, the same
   sequence for every config), consuming the whole stream, each call with a ``--deadline-s``
   deadline: the first ``--first`` calls after SERVING (p50, p99, max: a compilation after
   SERVING shows here) and the next ``--requests`` calls (p50, p99, mean), with the mean
   ``nann-items-scored`` trailing metadata;
c. unless ``--no-steps`` (or the label is in ``--skip-steps``): locust's step load
   (``python -m loadtest.run --step-users ... --step-s S --settle-s 5 --p99-ms 50``), each step's
   QPS / p50 / p99 and the highest QPS at p99 <= 50 ms and <= 100 ms;
d. stops the server with SIGTERM and checks that it exits 0.

The default configs: ``old-default`` (the defaults before XLA: ``--scorer stock
--intra-op-threads 0``), ``default`` (no flag), ``xla-intra0`` (``--intra-op-threads 0``),
``stock-intra1`` (``--scorer stock``), ``default-batch8`` (``--max-batch 8``). Each config's
steady p50 and QPS@p99<=50 are also given relative to the best config's (the check: the default
within 10% of the best).

    python -m benchmarks.default_path --workdir W --name LABEL [--step-s 30] [--requests 300]
        [--config LABEL=FLAGS ...] [--no-steps] [--skip-steps stock-intra1,xla-intra0]

Prints one table and writes ``benchmarks/results/default_path_<LABEL>.json`` (LABEL: ``--name``,
else W's folder name), the step loads' locust reports in ``benchmarks/results/default_path_<LABEL>/``.
Server logs stay in the system's temporary folder (they name machine paths).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import tempfile
import time
from pathlib import Path

from benchmarks import harness

DEFAULT_CONFIGS = (
    ("old-default", "--scorer stock --intra-op-threads 0"),
    ("default", ""),
    ("xla-intra0", "--intra-op-threads 0"),
    ("stock-intra1", "--scorer stock"),
    ("default-batch8", "--max-batch 8"),
)
OBJECTIVES_MS = (50.0, 100.0)
LOADED = re.compile(
    r"loaded model version (\d+) from .*? in ([\d.]+) s: signature (\S+), (\d+) warm-up requests"
    r"(?:, XLA scorer compiled at (\d+) shapes)?"
)


def parse_config(text: str) -> tuple[str, list[str]]:
    """``"LABEL=--flag value ..."`` -> ``(LABEL, ["--flag", "value", ...])``. An argparse ``type``."""
    label, sep, flags = text.partition("=")
    label = label.strip()
    if not sep or not label or not re.fullmatch(r"[A-Za-z0-9_.-]+", label):
        raise argparse.ArgumentTypeError(
            f"expected LABEL=FLAGS (LABEL of letters, digits, -_.), got {text!r}"
        )
    try:
        return label, shlex.split(flags)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def percentiles(ms: list[float], which: tuple[str, ...]) -> dict:
    import numpy as np

    if not ms:
        return {f"{w}_ms": None for w in which}
    a = np.asarray(ms, float)
    out = {}
    for w in which:
        if w == "max":
            value = a.max()
        elif w == "mean":
            value = a.mean()
        else:
            value = np.percentile(a, float(w[1:]))
        out[f"{w}_ms"] = round(float(value), 2)
    return out


def best_within(steps: list[dict], p99_ms: float) -> dict | None:
    ok = [s for s in steps if s["failures"] == 0 and s.get("p99_ms", float("inf")) <= p99_ms]
    return max(ok, key=lambda s: s["qps"]) if ok else None


def call_stream(target: str, users: list[str], deadline_s: float) -> list[dict]:
    """Calls Retrieve once per user, one call at a time on one channel: per call its whole
    time in ms (None if it failed), candidates, items scored and error."""
    import grpc

    from nann.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
    from server.service import MD_SCORED

    calls = []
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        stub = retrieval_pb2_grpc.RetrieverStub(channel)
        for user in users:
            started = time.perf_counter()
            try:
                stream = stub.Retrieve(retrieval_pb2.RetrieveRequest(user_id=user), timeout=deadline_s)
                n = sum(len(m.candidates) for m in stream)
                ms = (time.perf_counter() - started) * 1000
                scored = dict(stream.trailing_metadata() or ()).get(MD_SCORED)
                calls.append({"ms": ms, "candidates": n, "scored": None if scored is None else int(scored)})
            except grpc.RpcError as e:
                code = e.code().name if e.code() else "UNKNOWN"
                calls.append({"ms": None, "error": f"{code}: {e.details()}"[:200]})
    return calls


def summarize_calls(calls: list[dict], which: tuple[str, ...]) -> dict:
    ok = [c for c in calls if c["ms"] is not None]
    scored = [c["scored"] for c in ok if c.get("scored") is not None]
    errors = [c["error"] for c in calls if c["ms"] is None]
    out = {"calls": len(calls), "failures": len(errors), **percentiles([c["ms"] for c in ok], which)}
    out["mean_items_scored"] = round(sum(scored) / len(scored), 1) if scored else None
    out["mean_candidates"] = round(sum(c["candidates"] for c in ok) / len(ok), 1) if ok else None
    if errors:
        out["first_error"] = errors[0]
    return out


def server_load_line(log: Path) -> dict | None:
    """The server log's "loaded model version" line: its load time, signature and warm-up."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    m = LOADED.search(text)
    if not m:
        return None
    return {
        "version": int(m[1]),
        "load_s": float(m[2]),
        "signature": m[3],
        "warmup_requests": int(m[4]),
        "xla_shapes_compiled": int(m[5]) if m[5] else 0,
    }


def scrub(folder: Path, replacements: dict[str, str]) -> None:
    """Replaces machine paths in the text files of ``folder`` (locust's reports name them)."""
    for path in folder.rglob("*"):
        if not path.is_file() or path.suffix not in (".json", ".csv", ".log", ".html"):
            continue
        text = path.read_text(errors="replace")
        new = text
        for old, repl in replacements.items():
            new = new.replace(old, repl)
        if new != text:
            path.write_text(new)


def step_load(args, label: str, target: str, features: Path, reports: Path) -> dict:
    from loadtest import run as loadrun

    out = reports / f"locust-{label}"
    load_args = loadrun.parse_args(
        ["--host", target, "--features", str(features), "--out", str(out)]
        + ["--step-users", ",".join(map(str, args.step_users)), "--step-s", str(args.step_s)]
        + ["--settle-s", str(args.settle_s), "--p99-ms", str(OBJECTIVES_MS[0])]
        + ["--deadline-s", str(args.deadline_s), "--seed", str(args.seed)]
    )
    summary = loadrun.run(load_args)
    table = (summary.get("steps") or {}).get("steps") or []
    result = {
        "report": str(out.relative_to(harness.ROOT)) if out.is_relative_to(harness.ROOT) else out.name,
        "steps": table,
        "calls": summary["calls"],
        "failures": summary["failures"],
        "failures_by_error": summary["failures_by_error"],
        "locust_exit": summary["locust_exit"],
    }
    for objective in OBJECTIVES_MS:
        best = best_within(table, objective)
        result[f"max_qps_at_p99_le_{objective:g}ms"] = (
            {k: best[k] for k in ("qps", "users", "p50_ms", "p99_ms")} if best else None
        )
    return result


def run_config(args, label: str, flags: list[str], users: list[str], reports: Path, logs: Path) -> dict:
    work = args.workdir
    log = logs / f"server-{label}.log"
    print(f"\n== {label}: python -m server {shlex.join(flags)}", flush=True)
    result: dict = {"label": label, "flags": flags}
    started = time.monotonic()
    server = harness.Server(work / "export", f"embedded:{work / 'features'}", log, flags)
    try:
        server.wait_serving(timeout=args.serving_timeout_s)
        result["serving_after_s"] = round(time.monotonic() - started, 2)
        print(f"  SERVING after {result['serving_after_s']:.1f} s", flush=True)
        calls = call_stream(server.target, users, args.deadline_s)
        first, steady = calls[: args.first], calls[args.first :]
        result["first"] = summarize_calls(first, ("p50", "p99", "max"))
        result["steady"] = summarize_calls(steady, ("p50", "p99", "mean"))
        result["first_call_ms"] = None if not calls or calls[0]["ms"] is None else round(calls[0]["ms"], 2)
        result["first_slowest_calls"] = sorted(
            ({"index": i, "ms": round(c["ms"], 2)} for i, c in enumerate(first) if c["ms"] is not None),
            key=lambda c: -c["ms"],
        )[:5]
        print(f"  first {args.first}: {json.dumps(result['first'])}", flush=True)
        print(f"  next {args.requests}: {json.dumps(result['steady'])}", flush=True)
        if args.no_steps or label in args.skip_steps:
            result["step_load"] = None
        else:
            result["step_load"] = step_load(args, label, server.target, work / "features", reports)
            for objective in OBJECTIVES_MS:
                best = result["step_load"][f"max_qps_at_p99_le_{objective:g}ms"]
                print(
                    f"  QPS at p99 <= {objective:g} ms: "
                    + (f"{best['qps']:.1f} ({best['users']} users)" if best else "no step"),
                    flush=True,
                )
    finally:
        result["exit_code"] = server.stop()
    result["exit_ok"] = result["exit_code"] == 0
    result["server_load"] = server_load_line(log)
    if not result["exit_ok"]:
        print(f"  the server exited {result['exit_code']} (log: {log})", flush=True)
    return result


def qps_at(r: dict, objective: float) -> float | None:
    best = (r.get("step_load") or {}).get(f"max_qps_at_p99_le_{objective:g}ms")
    return best["qps"] if best else None


def compare(results: list[dict]) -> dict:
    """Each config's steady p50 and QPS@p99<=50 against the best config's (lowest p50, highest QPS)."""
    p50s = {r["label"]: r["steady"]["p50_ms"] for r in results if r["steady"]["p50_ms"] is not None}
    qps = {r["label"]: qps_at(r, OBJECTIVES_MS[0]) for r in results}
    qps = {k: v for k, v in qps.items() if v is not None}
    best_p50 = min(p50s, key=p50s.get) if p50s else None
    best_qps = max(qps, key=qps.get) if qps else None
    rows = {}
    for r in results:
        label = r["label"]
        rows[label] = {
            "steady_p50_over_best": round(p50s[label] / p50s[best_p50], 3) if label in p50s else None,
            "qps50_over_best": round(qps[label] / qps[best_qps], 3)
            if label in qps and qps[best_qps]
            else None,
        }
        p, q = rows[label]["steady_p50_over_best"], rows[label]["qps50_over_best"]
        rows[label]["within_10pct_of_best"] = (
            None if p is None else bool(p <= 1.10 and (q is None or q >= 0.90))
        )
    return {"best_steady_p50": best_p50, "best_qps_at_p99_le_50ms": best_qps, "by_config": rows}


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[dict], first_n: int, ratios: dict) -> str:
    head = (
        f"{'config':<16} {'SERVING s':>9} | {'first-' + str(first_n) + ' p50':>12} {'p99':>7} {'max':>7} | "
        f"{'steady p50':>10} {'p99':>7} | {'QPS@p99<=50':>11} {'QPS@p99<=100':>12} | "
        f"{'p50/best':>8} {'QPS50/best':>10} | {'fail':>4} {'exit':>4}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        f, s, x = r["first"], r["steady"], ratios["by_config"][r["label"]]
        fails = f["failures"] + s["failures"] + ((r.get("step_load") or {}).get("failures") or 0)
        lines.append(
            f"{r['label']:<16} {fmt(r['serving_after_s']):>9} | {fmt(f['p50_ms']):>12} {fmt(f['p99_ms']):>7} "
            f"{fmt(f['max_ms']):>7} | {fmt(s['p50_ms']):>10} {fmt(s['p99_ms']):>7} | "
            f"{fmt(qps_at(r, 50.0)):>11} {fmt(qps_at(r, 100.0)):>12} | "
            f"{fmt(x['steady_p50_over_best'], '.3f'):>8} {fmt(x['qps50_over_best'], '.3f'):>10} | "
            f"{fails:>4} {fmt(r['exit_code'], 'd'):>4}"
        )
    return "\n".join(lines)


def warnings_of(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        f, s = r["first"], r["steady"]
        if f["failures"] or s["failures"]:
            out.append(f"{r['label']}: {f['failures'] + s['failures']} failed single-caller calls")
        if (r.get("step_load") or {}).get("failures"):
            out.append(f"{r['label']}: {r['step_load']['failures']} failed step-load calls")
        if not r["exit_ok"]:
            out.append(f"{r['label']}: the server exited {r['exit_code']}, not 0")
        if f["p99_ms"] is not None and s["p99_ms"] is not None and f["max_ms"] > 2 * s["p99_ms"] + 20:
            out.append(
                f"{r['label']}: a slow call among the first {f['calls']} after SERVING (max "
                f"{f['max_ms']:.0f} ms, p99 {f['p99_ms']:.0f} ms vs steady p99 {s['p99_ms']:.0f} ms): "
                "a compilation after SERVING?"
            )
    return out


def command_argv(argv: list[str] | None, workdir: str) -> list[str]:
    """The command line with the workdir given only by its folder name (no machine paths)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    name = Path(workdir).name
    out = []
    for a in args:
        if a == workdir:
            out.append(name)
        elif a.startswith("--workdir="):
            out.append(f"--workdir={name}")
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, __file__)
    p.add_argument("--workdir", required=True, help="workdir with export/ and features/")
    p.add_argument(
        "--name", default="", help="label of the workdir in the result's name (default: its folder name)"
    )
    p.add_argument(
        "--config",
        type=parse_config,
        action="append",
        default=[],
        metavar="LABEL=FLAGS",
        help="a server configuration: a label and its server flags separated by spaces (may be empty); "
        "repeatable; default: " + "; ".join(f"{k}={v}" for k, v in DEFAULT_CONFIGS),
    )
    p.add_argument("--first", type=int, default=100, help="calls after SERVING reported apart (default 100)")
    p.add_argument("--requests", type=int, default=300, help="steady calls after those (default 300)")
    p.add_argument("--deadline-s", type=float, default=2.0, help="deadline of every call (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the user draw (default 0)")
    p.add_argument("--no-steps", action="store_true", help="skip the step loads")
    p.add_argument(
        "--skip-steps",
        type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
        default=[],
        metavar="LABEL,...",
        help="configs measured without the step load (their latency figures are kept)",
    )
    p.add_argument("--step-users", type=harness.ints, default=(1, 2, 3, 4, 6, 8))
    p.add_argument("--step-s", type=float, default=30.0, help="seconds per step (default 30)")
    p.add_argument("--settle-s", type=float, default=5.0, help="seconds not counted per step (default 5)")
    p.add_argument("--serving-timeout-s", type=float, default=900.0)
    p.add_argument("--out-dir", type=Path, default=harness.RESULTS)
    args = p.parse_args(argv)
    workdir_arg = args.workdir
    args.workdir = Path(args.workdir).resolve()
    for sub in ("export", "features"):
        if not (args.workdir / sub).is_dir():
            p.error(f"--workdir {workdir_arg} has no {sub}/")
    configs = args.config or [(k, shlex.split(v)) for k, v in DEFAULT_CONFIGS]
    labels = [k for k, _ in configs]
    if len(set(labels)) != len(labels):
        p.error(f"--config labels repeat: {labels}")
    if args.first < 1 or args.requests < 1:
        p.error("--first and --requests must be >= 1")
    name = args.name or args.workdir.name

    import numpy as np

    # The machine's facts first, while no server runs (the matmul peak is measured in a child).
    header = harness.result_header(__file__, command_argv(argv, workdir_arg))
    meta = harness.export_meta(args.workdir)
    all_users = np.load(args.workdir / "features" / "users.npy", mmap_mode="r")
    rng = np.random.default_rng(args.seed)
    rows = rng.choice(len(all_users), args.first + args.requests, replace=False)
    users = [str(all_users[i]) for i in rows]

    out_file = args.out_dir / f"default_path_{name}.json"
    reports = out_file.with_suffix("")
    reports.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.gettempdir()) / f"default_path_{name}"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"{len(configs)} configs on {name} ({meta['serving']['num_items']} items); server logs in {logs}/")

    results = []
    for label, flags in configs:
        results.append(run_config(args, label, flags, users, reports, logs))
        scrub(reports, {str(args.workdir): args.workdir.name, str(harness.ROOT) + os.sep: ""})
        ratios = compare(results)
        record = {
            **header,
            "workdir": args.workdir.name,
            "items": meta["serving"]["num_items"],
            "query_defaults": meta["serving"]["defaults"],
            "load": {
                "single_caller": f"one caller, one channel, Retrieve by user_id, whole stream, "
                f"{args.deadline_s:g} s deadline; the first {args.first} calls after SERVING, then "
                f"{args.requests}; users seeded ({args.seed}) from features/users.npy, "
                "the same for every config",
                "step_load": None
                if args.no_steps
                else f"python -m loadtest.run --step-users {','.join(map(str, args.step_users))} "
                f"--step-s {args.step_s:g} --settle-s {args.settle_s:g} --p99-ms 50 "
                f"--deadline-s {args.deadline_s:g}",
                "skip_steps": args.skip_steps,
            },
            "configs": results,
            "relative_to_best": ratios,
            "warnings": warnings_of(results),
        }
        harness.write_result(out_file, record)  # after every config: a crash keeps what was measured

    print()
    print(table(results, args.first, ratios))
    default = ratios["by_config"].get("default")
    if default:
        print(
            f"\ndefault vs best: steady p50 x{fmt(default['steady_p50_over_best'], '.3f')} "
            f"(best {ratios['best_steady_p50']}), QPS@p99<=50 x{fmt(default['qps50_over_best'], '.3f')} "
            f"(best {ratios['best_qps_at_p99_le_50ms']}): "
            + ("within 10%" if default["within_10pct_of_best"] else "NOT within 10%")
        )
    for w in record["warnings"]:
        print("WARNING:", w)
    print(f"\nwritten: {out_file} (locust reports in {reports}/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
