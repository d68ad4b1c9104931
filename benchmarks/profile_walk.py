"""Where a Beam-retrieval query spends its time: a traced ``Session.run`` of the ``retrieve`` signature.

TF Serving runs a signature with ``Session.run``; this script does the same with
``RunOptions(trace_level=FULL_TRACE)`` and sorts every executed op of one query by section
(the start layer, each layer's rounds, the final top k) and, inside the walk, by kind:
neighbour gather, visited marking, dedupe, scoring, top-k, control flow, other. Ops run on two
inter-op threads, so the op times of a section can add up to more than its wall time; both are
reported. Medians over ``--queries`` traced queries after ``--warmup`` untraced ones.
``--allow-share S`` runs the filtered signature under a random category allow-list of that share.

    python -m benchmarks.profile_walk --workdir W --batch 1 32 \\
        --out benchmarks/results/profile_walk_1365188.json
"""

from __future__ import annotations

import collections
import re
import time
from pathlib import Path

import numpy as np

from benchmarks import harness
from nann_common import contract as contract_lib
from server.features import EmbeddedStore

CONTROL = {
    "Enter",
    "Exit",
    "Merge",
    "Switch",
    "NextIteration",
    "LoopCond",
    "Identity",
    "NoOp",
    "Const",
    "_Retval",
}
LOOP = re.compile(r"/(while(?:_\d+)?)/")


def kind(name: str, op: str) -> str:
    """What an op inside a layer's loop does, from its type and name scope."""
    if op in CONTROL:
        return "control flow"
    if op == "TopKV2":
        return "top-k"
    # The [B, N] bool mask (TensorScatterUpdate) or the bitmap's bit tests and segment-sum marking.
    if op in ("TensorScatterUpdate", "UnsortedSegmentSum", "RightShift", "LeftShift", "BitwiseAnd"):
        return "visited marking"
    if (
        "score_" in name
        or "attention" in name
        or op in ("MatMul", "_FusedMatMul", "BatchMatMulV2", "Softmax", "Einsum")
        # An --xla export's scorer is a function call (its XLA cluster); nothing else is one.
        or op in ("StatefulPartitionedCall", "PartitionedCall")
    ):
        return "scoring"
    if (
        op in ("Unique", "UniqueV2", "Bincount", "DenseBincount")
        or "Ragged" in name
        or "boolean_mask" in name
    ):
        return "dedupe"
    if op in ("GatherV2", "ResourceGather", "GatherNd"):
        return "gather"
    return "other"


def histories(store: EmbeddedStore, item_ids: np.ndarray, max_len: int, batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = []
    while len(rows) < batch:
        user = int(store.users[rng.integers(len(store.users))])
        kept, _ = contract_lib.known_history(item_ids, store.history(str(user)), max_len)
        if len(kept):
            rows.append(kept)
    out = np.full((batch, max_len), contract_lib.PAD_ID, np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def profile_one(run_metadata) -> dict:
    """One traced query -> per section: wall ms, op ms by kind, rounds.

    Sections: each layer's loop (its wall time runs from its first to its last op); "start
    layer" (ops before the first loop: the user state, scoring the start layer, its top ef);
    "final top k" (after the last loop); "between layers" (the hand-off from one loop to the
    next, op time only).
    """
    nodes = [n for dev in run_metadata.step_stats.dev_stats for n in dev.node_stats]

    def end_of(n):
        return n.all_start_micros + n.all_end_rel_micros

    loops = sorted({m.group(1) for n in nodes if (m := LOOP.search(n.node_name))}, key=lambda s: (len(s), s))
    spans = {}
    for n in nodes:
        if m := LOOP.search(n.node_name):
            lo, hi = spans.get(m.group(1), (n.all_start_micros, end_of(n)))
            spans[m.group(1)] = (min(lo, n.all_start_micros), max(hi, end_of(n)))
    t0, t1 = min(n.all_start_micros for n in nodes), max(end_of(n) for n in nodes)
    first = min((lo for lo, _ in spans.values()), default=t1)
    last = max((hi for _, hi in spans.values()), default=t1)
    walls = {"start layer": first - t0, "final top k": t1 - last}
    walls.update({f"loop {loops.index(name)}": hi - lo for name, (lo, hi) in spans.items()})
    ops = collections.defaultdict(collections.Counter)
    rounds = collections.Counter()
    for n in nodes:
        op = n.timeline_label.split(" = ", 1)[1].split("(", 1)[0] if " = " in n.timeline_label else "?"
        if m := LOOP.search(n.node_name):
            section = f"loop {loops.index(m.group(1))}"
            rounds[section] += op == "TopKV2"
        elif n.all_start_micros < first:
            section = "start layer"
        elif n.all_start_micros >= last:
            section = "final top k"
        else:
            section = "between layers"
        ops[section][kind(n.node_name, op)] += n.all_end_rel_micros / 1000
    out = {}
    for section in [
        "start layer",
        *[f"loop {i}" for i in range(len(loops))],
        "between layers",
        "final top k",
    ]:
        if section in ops or section in walls:
            out[section] = {"wall_ms": walls.get(section, 0) / 1000, "op_ms": dict(ops[section])}
            if section.startswith("loop "):
                out[section]["rounds"] = rounds[section]
    out["total"] = {"wall_ms": (t1 - t0) / 1000, "op_ms": dict(sum(ops.values(), collections.Counter()))}
    return out


def median_profile(profiles: list[dict]) -> dict:
    names = list(dict.fromkeys(k for p in profiles for k in p))
    out = {}
    for name in names:
        got = [p[name] for p in profiles if name in p]
        row = {"wall_ms": float(np.median([g["wall_ms"] for g in got]))}
        kinds = sorted({k for g in got for k in g.get("op_ms", {})})
        if kinds:
            row["op_ms"] = {k: float(np.median([g["op_ms"].get(k, 0.0) for g in got])) for k in kinds}
        if "rounds" in got[0]:
            row["rounds"] = float(np.median([g["rounds"] for g in got]))
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, __file__)
    p.add_argument("--workdir", required=True, help="workdir with export/ and features/")
    p.add_argument("--version", type=int, help="export version (default: the newest)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--queries", type=int, default=10, help="traced queries per batch size")
    p.add_argument("--warmup", type=int, default=20, help="untraced queries first, per batch size")
    p.add_argument("--ef", type=harness.ints, default=(), help="per-layer ef (default: the export's)")
    p.add_argument("--steps", type=harness.ints, default=(), help="per-layer T (default: the export's)")
    p.add_argument("--mode", default="", help="search mode, e.g. beam_history (default: the export's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="the session's intra-op pool, as the server's flag (0: TensorFlow's choice)",
    )
    p.add_argument(
        "--flop-per-item",
        type=float,
        default=82.5e3,
        help="scorer FLOP per candidate (din at the default sizes: item matrix 64x128, attention over "
        "50 behaviours, the 128x128 projection, 128-64-32-1)",
    )
    p.add_argument(
        "--signature",
        default=None,
        help="the signature run (default: retrieve; with --allow-share: retrieve_filtered)",
    )
    p.add_argument(
        "--allow-share",
        type=float,
        default=0.0,
        help="run a filtered signature with a random category allow-list holding this share of the items",
    )
    p.add_argument("--out", required=True, help="JSON file")
    args = p.parse_args(argv)
    tf = harness.import_tensorflow()
    work = Path(args.workdir)
    base = work / "export"
    version = args.version or max(contract_lib.versions(base))
    contract = contract_lib.load_contract(base / str(version), verify=False)
    query = contract.resolve(0, list(args.ef), list(args.steps), args.mode)
    store = EmbeddedStore(work / "features")
    item_ids = contract.item_ids()
    signature = args.signature or contract.signature(False, filtered=bool(args.allow_share))
    sess, feeds, fetches = harness.load_session(
        base / str(version), args.intra_op_threads, signature=signature
    )
    filters = None
    if args.allow_share:
        from model_export.data import load_dataset
        from model_export.filter_eval import category_allow_list

        cats = load_dataset(work / "dataset").item_category
        allow = category_allow_list(cats, args.allow_share, np.random.default_rng(args.seed))
        filters = [contract_lib.RowFilter(allow_categories=allow)]
    options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
    results = {}
    for batch in args.batch:
        hist = histories(store, item_ids, contract.max_len, batch, args.seed + batch)
        feed = {feeds[n]: v for n, v in contract.inputs(hist, query, filters and filters * batch).items()}
        for _ in range(args.warmup):
            sess.run(fetches, feed)
        untraced = []
        for _ in range(args.queries):
            t0 = time.perf_counter()
            out = sess.run(fetches, feed)
            untraced.append((time.perf_counter() - t0) * 1000)
        profiles = []
        for _ in range(args.queries):
            md = tf.compat.v1.RunMetadata()
            sess.run(fetches, feed, options=options, run_metadata=md)
            profiles.append(profile_one(md))
        sections = median_profile(profiles)
        scored = float(np.mean(out["scored"]))
        scoring_ms = sections["total"]["op_ms"].get("scoring", 0.0)
        results[f"batch_{batch}"] = {
            "untraced_p50_ms": float(np.median(untraced)),
            "items_scored_per_user": scored,
            "scorer_gflops": scored * batch * args.flop_per_item / (scoring_ms / 1000) / 1e9,
            "query_gflops": scored * batch * args.flop_per_item / (np.median(untraced) / 1000) / 1e9,
            "sections": sections,
        }
        print_batch(batch, results[f"batch_{batch}"], contract.start_layer)
    peak = harness.matmul_peak_gflops()
    for r in results.values():
        r["scorer_share_of_peak"] = r["scorer_gflops"] / peak
        r["query_share_of_peak"] = r["query_gflops"] / peak
        scorer = f"{r['scorer_gflops']:.1f} GFLOP/s ({100 * r['scorer_share_of_peak']:.0f}% of peak)"
        whole = f"{r['query_gflops']:.1f} GFLOP/s ({100 * r['query_share_of_peak']:.0f}%)"
        print(f"{r['items_scored_per_user']:.0f} items/user: scorer {scorer}, whole query {whole}")
    print(f"float32 2048x2048 matmul peak: {peak:.1f} GFLOP/s")
    record = {
        **harness.result_header(__file__, argv, matmul_peak=peak),
        "flop_per_item": args.flop_per_item,
        "intra_op_threads": args.intra_op_threads,
        "items": contract.num_items,
        "start_layer": contract.start_layer,
        "query": {"k": query.k, "ef": list(query.ef), "steps": list(query.steps), "mode": query.mode},
        "signature": signature,
        "allow_share": args.allow_share,
        "note": "loop i is the i-th layer walked top-down: loop 0 = layer start_layer - 1, last = layer 0",
        "results": results,
    }
    harness.write_result(args.out, record)
    print(f"written: {args.out}")
    return 0


def print_batch(batch: int, r: dict, start_layer: int) -> None:
    print(
        f"\nbatch {batch}: {r['untraced_p50_ms']:.1f} ms untraced p50, "
        f"{r['items_scored_per_user']:.0f} items scored per user"
    )
    kinds = ["gather", "visited marking", "dedupe", "scoring", "top-k", "control flow", "other"]
    print("wall ms: the section's elapsed time; the other columns: op time summed over both threads")
    print("(other: elementwise ops, slicing, concatenation, variable reads)")
    print(f"{'section':<22} {'wall ms':>8} {'rounds':>6} " + " ".join(f"{k[:10]:>10}" for k in kinds))
    for name, s in r["sections"].items():
        label = name
        if name.startswith("loop "):
            label = f"layer {start_layer - 1 - int(name.split()[1])} rounds"
        ops = s.get("op_ms", {})
        cells = " ".join(f"{ops.get(k, 0.0):>10.2f}" for k in kinds) if ops else ""
        rounds = f"{s['rounds']:>6.0f}" if "rounds" in s else " " * 6
        print(f"{label:<22} {s['wall_ms']:>8.2f} {rounds} {cells}")


if __name__ == "__main__":
    raise SystemExit(main())
