"""End-to-end Retrieve latency and throughput through gRPC, against the model call alone.

For one workdir (with ``export/`` and ``features/``): first the in-process model call alone
(the SavedModel's ``retrieve`` signature, batch 1, from C threads), then a real server
subprocess per (store, micro-batching) setting, driven by C client threads that each read
the whole candidate stream. Users are a seeded sample of the feature snapshot; every
setting sees the same users in the same order.

    python -m benchmarks.serving_grpc --workdir W [--concurrency 1 4 16] [--requests 400]
        [--stores embedded redis] [--max-batch 1 16] [--batch-window-ms 0] [--redis redis://127.0.0.1:6379/14]

Prints a table and writes ``benchmarks/results/serving_grpc_<items>.json``. Overhead is
measured two ways: end-to-end p50 minus the model-alone p50 (same machine, same run), and
from the server's own stage histograms (everything but ``model_call``).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from benchmarks import harness


def summarize(latencies: list[float], wall: float) -> dict:
    a = np.asarray(latencies) * 1000
    return {
        "requests": len(a),
        "qps": round(len(a) / wall, 1),
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p90_ms": round(float(np.percentile(a, 90)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "mean_ms": round(float(a.mean()), 3),
    }


def drive(concurrency: int, jobs: list, fn) -> dict:
    """Runs fn(job) for every job from ``concurrency`` threads; returns latency figures."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    it = iter(jobs)

    def worker():
        while True:
            with lock:
                job = next(it, None)
            if job is None:
                return
            t = time.perf_counter()
            try:
                fn(job)
            except Exception as e:  # recorded, not fatal: a benchmark reports its failures
                with lock:
                    errors.append(f"{type(e).__name__}: {e}"[:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = summarize(latencies, time.perf_counter() - started)
    out["errors"] = len(errors)
    if errors:
        out["first_error"] = errors[0]
    return out


def model_alone(
    export: Path, histories: list[np.ndarray], concurrency: list[int], requests: int, warmup: int
):
    from nann_common import contract

    c = contract.latest_contract(export)
    run = harness.function_runner(c.path)
    q = c.resolve()
    item_ids = c.item_ids()

    def one(h):
        known, _ = contract.known_history(item_ids, h, c.max_len)
        run(c.inputs(known[None, :], q))

    for h in histories[:warmup]:
        one(h)
    return {str(n): drive(n, histories[warmup : warmup + requests], one) for n in concurrency}


def scrape(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "nann_stage_seconds_sum" or s.name == "nann_stage_seconds_count":
                out[(s.name, s.labels["stage"])] = s.value
            if s.name in ("nann_batch_users_sum", "nann_batch_users_count"):
                out[(s.name, "")] = s.value
            if s.name in ("grpc_server_handling_seconds_sum", "grpc_server_handling_seconds_count"):
                out[(s.name, "")] = out.get((s.name, ""), 0) + s.value
    return out


def stage_means(before: dict, after: dict) -> dict:
    means = {}
    for (name, stage), value in after.items():
        if name == "nann_stage_seconds_sum":
            n = after[("nann_stage_seconds_count", stage)] - before.get(
                ("nann_stage_seconds_count", stage), 0
            )
            if n:
                means[stage + "_ms"] = round(1000 * (value - before.get((name, stage), 0)) / n, 3)
    n = after.get(("grpc_server_handling_seconds_count", ""), 0) - before.get(
        ("grpc_server_handling_seconds_count", ""), 0
    )
    if n:
        total = after[("grpc_server_handling_seconds_sum", "")] - before.get(
            ("grpc_server_handling_seconds_sum", ""), 0
        )
        means["server_handling_ms"] = round(1000 * total / n, 3)
        if "model_call_ms" in means:
            means["server_overhead_ms"] = round(means["server_handling_ms"] - means["model_call_ms"], 3)
    calls = after.get(("nann_batch_users_count", ""), 0) - before.get(("nann_batch_users_count", ""), 0)
    users = after.get(("nann_batch_users_sum", ""), 0) - before.get(("nann_batch_users_sum", ""), 0)
    if calls:
        means["users_per_model_call"] = round(users / calls, 2)
    return means


def serve(args, store: str, max_batch: int, users: list[str], concurrency: list[int]) -> dict:
    import grpc

    from nann.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc

    features = f"embedded:{args.workdir / 'features'}" if store == "embedded" else args.redis
    flags = ["--max-batch", str(max_batch), "--batch-window-ms", str(args.batch_window_ms)]
    flags += ["--workers", str(max(concurrency) + 2), "--log-level", "WARNING"]
    log = Path(tempfile.gettempdir()) / f"serving_grpc_{store}_batch{max_batch}.log"
    with harness.Server(args.workdir / "export", features, log, flags) as server:
        server.wait_serving(600)
        mport, target = server.metrics_port, server.target
        channels = [grpc.insecure_channel(target) for _ in range(max(concurrency))]
        stubs = [retrieval_pb2_grpc.RetrieverStub(c) for c in channels]
        local = threading.local()
        counter = iter(range(10**9))
        lock = threading.Lock()

        def one(user):
            if not hasattr(local, "stub"):
                with lock:
                    local.stub = stubs[next(counter) % len(stubs)]
            n = 0
            for m in local.stub.Retrieve(retrieval_pb2.RetrieveRequest(user_id=user), timeout=30):
                n += len(m.candidates)
            if n == 0:
                raise RuntimeError("empty answer")

        for u in users[: args.warmup]:
            one(u)
        results = {}
        for n in concurrency:
            before = scrape(mport)
            local.__dict__.clear()
            res = drive(n, users[args.warmup : args.warmup + args.requests], one)
            res.update(stage_means(before, scrape(mport)))
            results[str(n)] = res
            print(f"  {store:8s} max-batch {max_batch:3d}  c={n:3d}: {json.dumps(res)}", flush=True)
        for c in channels:
            c.close()
        return results


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=400, help="timed requests per concurrency level")
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--stores", nargs="+", default=["embedded", "redis"], choices=["embedded", "redis"])
    parser.add_argument("--max-batch", type=int, nargs="+", default=[1, 16], help="1 = no micro-batching")
    parser.add_argument("--batch-window-ms", type=float, default=0.0)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=harness.RESULTS)
    args = parser.parse_args(argv)

    users_all = np.load(args.workdir / "features" / "users.npy")
    offsets = np.load(args.workdir / "features" / "offsets.npy")
    items = np.load(args.workdir / "features" / "items.npy")
    rng = np.random.default_rng(args.seed)
    need = args.warmup + args.requests
    rows = rng.choice(len(users_all), need, replace=False)
    users = [str(users_all[i]) for i in rows]
    histories = [items[offsets[i] : offsets[i + 1]] for i in rows]

    if "redis" in args.stores:
        from server.features import load_snapshot

        t = time.monotonic()
        load_snapshot(args.workdir / "features", args.redis, rows=rows)
        print(f"loaded {len(rows)} users into {args.redis} in {time.monotonic() - t:.1f} s")

    print("model call alone (in-process SavedModel, batch 1):", flush=True)
    alone = model_alone(args.workdir / "export", histories, args.concurrency, args.requests, args.warmup)
    for n, r in alone.items():
        print(f"  c={n:>3}: {json.dumps(r)}", flush=True)
    served = {}
    for store in args.stores:
        for max_batch in args.max_batch:
            served[f"{store}/max-batch{max_batch}"] = serve(args, store, max_batch, users, args.concurrency)

    meta = harness.export_meta(args.workdir)["serving"]
    overhead = {
        key: {n: round(r[n]["p50_ms"] - alone[n]["p50_ms"], 3) for n in r if n in alone}
        for key, r in served.items()
    }
    result = {
        **harness.result_header(__file__, argv),
        "items": meta["num_items"],
        "defaults": meta["defaults"],
        "model_alone": alone,
        "served": served,
        "p50_overhead_ms_vs_model_alone": overhead,
    }
    out = harness.write_result(args.out_dir / f"serving_grpc_{meta['num_items']}.json", result)
    print("p50 overhead (end to end - model alone), ms:", json.dumps(overhead))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
