"""Two or more query paths of one export side by side, in one process: latency, throughput, cost,
coverage and FLOP rate.

Each ``--path LABEL=MODE/EF/T`` is a setting of the newest export's ``retrieve`` signature (of
version V with ``LABEL@V=...``, to set two exports side by side), run with
``Session.run`` as TF Serving runs it. A label ending in ``+bf16`` runs its path in a session
with grappler's oneDNN bfloat16 rewrite on (the model's matmuls in bfloat16 where the CPU has
the instructions; the SavedModel is unchanged). For every batch size the paths take turns on the same
requests (path A, path B, A, B, ... over the same users), so a busy machine slows them alike.
Per path and batch it reports:

- p50 / p90 of a request and users per second (batch x requests / time);
- items scored per user;
- the FLOP rate: items scored x ``--flop-per-item`` / request time, against a float32
  2048x2048 matmul measured in the same run (the machine's peak for the scorer's kind of work);
- coverage@k on ``--coverage-users`` seeded test users, against their exhaustive top k, with
  its standard error, the lowest user and the count below 0.9 (the exact scores are cached in
  the workdir's eval/scores/, shared with ``seed_replay.py``).

    python -m benchmarks.serving_paths --workdir W \\
        --path beam=beam/100,200,400/1,1,3 --path history=beam_history/100,200,400/1,1,5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks import harness
from benchmarks.walk_replay import cached_scores
from nann_common import contract
from walk.replay import exact_top_k


def parse_path(text: str) -> tuple[str, str, tuple[int, ...], tuple[int, ...]]:
    """LABEL=MODE/EF/T -> (label, mode, ef, steps); the label may end in @VERSION (an export version)."""
    label, _, setting = text.partition("=")
    parts = setting.split("/")
    if not label or len(parts) != 3:
        raise argparse.ArgumentTypeError(
            f"expected LABEL=MODE/EF/T, e.g. a=beam/100,200,400/1,1,3; got {text!r}"
        )
    mode, ef, steps = parts
    return label, mode, harness.ints(ef), harness.ints(steps)


BF16 = "+bf16"


def export_version(label: str) -> int | None:
    """The export version a path label names with @VERSION, else None (the newest)."""
    _, at, version = label.removesuffix(BF16).rpartition("@")
    return int(version) if at and version.isdigit() else None


def describe(label: str, version: int, query: contract.Query) -> dict:
    """The columns every row of one path starts with."""
    return {
        "path": label,
        "export_version": version,
        "bf16": label.endswith(BF16),
        "mode": query.mode,
        "ef": list(query.ef),
        "steps": list(query.steps),
    }


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, __file__)
    p.add_argument("--workdir", required=True, type=Path, help="workdir with an export")
    p.add_argument("--path", type=parse_path, action="append", required=True, help="LABEL=MODE/EF/T")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="users per request")
    p.add_argument("--queries", type=int, default=40, help="timed requests per path and batch")
    p.add_argument("--warmup", type=int, default=20, help="untimed requests per path and batch first")
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--coverage-users", type=int, default=256, help="seeded test users for coverage@k")
    p.add_argument(
        "--flop-per-item",
        type=float,
        default=82.5e3,
        help="scorer FLOP per candidate (din at the default sizes, see benchmarks.profile_walk)",
    )
    p.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="TensorFlow intra-op threads for every path, as the server's flag (0: TensorFlow's "
        "choice); one process has one intra-op pool, so compare settings in separate runs",
    )
    p.add_argument("--out", type=Path, help="JSON file written")
    args = p.parse_args(argv)
    harness.import_tensorflow()
    from model_export.evaluate import Evaluation
    from model_export.export import latest_export

    path = latest_export(args.workdir)
    base = path.parent
    queries, runners, contracts = {}, {}, {}
    for label, mode, ef, steps in args.path:
        version = export_version(label) or int(path.name)
        if version not in contracts:
            contracts[version] = contract.load_contract(base / str(version), verify=False)
        runner = (version, label.endswith(BF16))
        if runner not in runners:
            runners[runner] = harness.session_runner(
                base / str(version), bf16=runner[1], intra_op_threads=args.intra_op_threads
            )
        try:
            queries[label] = (runner, contracts[version].resolve(args.k, ef, steps, mode))
        except contract.InvalidRequest as e:
            p.error(f"--path {label}: {e}")
    serving = contracts[max(contracts)]
    evaluation = Evaluation(args.workdir, "test", args.coverage_users, 0)
    ids = evaluation.dataset.item_ids
    histories = np.where(evaluation.histories >= 0, ids[np.maximum(evaluation.histories, 0)], -1)
    # The exact scores of these users, shared with seed_replay.py and walk_replay.py (one pass).
    reference = exact_top_k(cached_scores(args.workdir, args.coverage_users), args.k)

    rows = []
    for label, (runner, query) in queries.items():
        found, cost = [], []
        for s in range(0, len(histories), 32):
            out = runners[runner](contracts[runner[0]].inputs(histories[s : s + 32], query))
            found.extend(np.searchsorted(ids, out["item_ids"]))
            cost.extend(out["scored"])
        cover = np.array([len(np.intersect1d(a, b)) / args.k for a, b in zip(found, reference, strict=True)])
        rows.append(
            {
                **describe(label, runner[0], query),
                "batch": "coverage",
                "users": len(cover),
                **harness.coverage_stats(cover),
                "scored_per_user": round(float(np.mean(cost)), 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    peak = harness.matmul_peak_gflops()
    print(f"float32 2048x2048 matmul: {peak:.1f} GFLOP/s", flush=True)
    rng = np.random.default_rng(0)
    for batch in args.batch:
        times = {label: [] for label in queries}
        scored = {label: [] for label in queries}
        for q in range(args.warmup + args.queries):
            users = histories[rng.choice(len(histories), batch)]
            for label, (runner, query) in queries.items():
                inputs = contracts[runner[0]].inputs(users, query)
                started = time.perf_counter()
                out = runners[runner](inputs)
                if q >= args.warmup:
                    times[label].append(time.perf_counter() - started)
                    scored[label].append(float(out["scored"].mean()))
        for label, (runner, query) in queries.items():
            t = np.array(times[label])
            items = float(np.mean(scored[label]))
            gflops = items * batch * args.flop_per_item / float(np.median(t)) / 1e9
            rows.append(
                {
                    **describe(label, runner[0], query),
                    "batch": batch,
                    "p50_ms": round(1000 * float(np.median(t)), 2),
                    "p90_ms": round(1000 * float(np.percentile(t, 90)), 2),
                    "users_per_s": round(batch * len(t) / float(t.sum()), 1),
                    "scored_per_user": round(items, 1),
                    "gflops": round(gflops, 1),
                    "share_of_peak": round(gflops / peak, 3),
                    "requests": len(t),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    labels = list(queries)
    for batch in args.batch:
        by = {r["path"]: r for r in rows if r["batch"] == batch}
        base = by[labels[0]]
        for label in labels[1:]:
            r = by[label]
            print(
                f"batch {batch}: {label} p50 {r['p50_ms']} ms vs {labels[0]} {base['p50_ms']} ms "
                f"({base['p50_ms'] / r['p50_ms']:.2f}x); users/s {r['users_per_s']} vs "
                f"{base['users_per_s']} ({r['users_per_s'] / base['users_per_s']:.2f}x)"
            )
    result = {
        **harness.result_header(__file__, argv, matmul_peak=peak),
        "export": str(path.relative_to(args.workdir)),
        "items": serving.num_items,
        "start_layer": serving.start_layer,
        "layer_sizes": list(serving.layer_sizes),
        "intra_op_threads": args.intra_op_threads,
        "flop_per_item": args.flop_per_item,
        "rows": rows,
    }
    if args.out:
        harness.write_result(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
