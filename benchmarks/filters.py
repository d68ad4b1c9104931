"""Filters inside the walk: coverage@k against exhaustive search under the same filter, cost, plan.

For one workdir W (a trained model, its graph and an export with filters):

a. ``model_export.filter_eval``'s study on ``--users`` test users at batch 1: the unfiltered
   default query, category allow-lists drawn to allow each ``--selectivity`` share of the items,
   and exclusions of the user's history and of 1k / 10k random items; coverage@k against the
   exact top k under the same filter, items scored, p50 / p99, the plan chosen, k not filled;
b. with ``--before DIR`` (an earlier SavedModel version, e.g. one written before filters existed
   or before a change to the filtered walk): the unfiltered default query of both exports on the
   same users, alternating call by call in one process (p50 at batch 1 and coverage@k): what
   filters, or the change, cost a caller who sends none;
c. what a blocklist costs every call (the server merges it into every call's exclusions): the
   unfiltered query against the same query with ``--blocklist`` sizes of random items excluded,
   on this export and, with ``--previous DIR`` (an earlier export with filters), on that one too,
   alternating call by call: p50, coverage@k against the exact top k without the blocked items,
   the plan;
d. with ``--allow-lists`` shares and ``--previous DIR``: the same random category allow-lists on
   both exports, alternating call by call: p50, items scored, coverage@k under the filter, plans.

    python -m benchmarks.filters --workdir W --name LABEL [--users 100] [--before W/export/1] \
        [--previous W/export/2] [--allow-lists 0.5,0.2,0.1]

Writes ``benchmarks/results/filters_<LABEL>.{json,md}``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from benchmarks import harness


def before_after(ev, scores, before: Path, after: Path, rounds: int) -> list[dict]:
    """The unfiltered default query of two exports, alternating per call, on the same users."""
    tf = harness.import_tensorflow()
    from nann_common import contract
    from walk.replay import exact_top_k

    original = ev.dataset.item_ids
    histories = np.where(ev.histories >= 0, original[np.maximum(ev.histories, 0)], -1)
    reference = exact_top_k(scores, 200)
    sides = []
    for label, path in (("before", before), ("after", after)):
        served = contract.load_contract(path, verify=False)
        model = tf.saved_model.load(str(path))
        name = contract.XLA_SIGNATURE if served.has_xla_signature else contract.RETRIEVE_SIGNATURE
        if served.has_xla_signature:
            model.signatures[contract.XLA_WARMUP_SIGNATURE](history=tf.constant(histories[:1]))
        sides.append((label, path, served, model.signatures[name], name))
    times = {label: [] for label, *_ in sides}
    cover = {label: [] for label, *_ in sides}
    for r in range(rounds):
        for u in range(ev.num_users):
            for label, _, served, fn, _ in sides if (u + r) % 2 else sides[::-1]:
                inputs = served.inputs(histories[u : u + 1], served.resolve())
                started = time.perf_counter()
                out = fn(**{key: tf.constant(value) for key, value in inputs.items()})
                times[label].append(1000 * (time.perf_counter() - started))
                if r == 0:
                    got = np.searchsorted(original, out["item_ids"].numpy()[0])
                    k = len(got)
                    cover[label].append(len(np.intersect1d(got, reference[u][:k])) / k)
    return [
        {
            "export": label,
            "version": path.name,
            "signature": name,
            "p50_ms": float(np.median(times[label])),
            "mean_ms": float(np.mean(times[label])),
            "calls": len(times[label]),
            **harness.coverage_stats(cover[label]),
        }
        for label, path, _, _, name in sides
    ]


def _load(path: Path, histories: np.ndarray):
    """An export's (contract, loaded SavedModel, has the XLA signatures), its XLA scorer warmed up."""
    tf = harness.import_tensorflow()
    from nann_common import contract

    served = contract.load_contract(path, verify=False)
    model = tf.saved_model.load(str(path))
    xla = served.has_xla_signature
    if xla:
        model.signatures[contract.XLA_WARMUP_SIGNATURE](history=tf.constant(histories[:1]))
    return served, model, xla


def blocklist_cost(
    ev, scores, exports: list[tuple[str, Path]], sizes, rounds: int, seed: int = 0
) -> list[dict]:
    """Per export and blocklist size (0: the unfiltered signature), alternating call by call."""
    tf = harness.import_tensorflow()
    from nann_common.contract import PLANS, RowFilter

    original = ev.dataset.item_ids
    histories = np.where(ev.histories >= 0, original[np.maximum(ev.histories, 0)], -1)
    rng = np.random.default_rng(seed)
    blocked = {n: np.sort(rng.choice(len(original), n, replace=False)) for n in sizes if n}
    cases = []
    for label, path in exports:
        served, model, xla = _load(path, histories)
        for n in sizes:
            f = [RowFilter(exclude_items=tuple(original[blocked[n]].tolist()))] if n else None
            fn = model.signatures[served.signature(xla, filtered=bool(n))]
            cases.append(
                {"export": label, "version": path.name, "blocked": n, "served": served, "fn": fn, "f": f}
            )
    stats = [{"ms": [], "cover": [], "plans": []} for _ in cases]
    for r in range(rounds):
        for u in range(ev.num_users):
            order = list(range(len(cases)))
            np.random.default_rng([seed, r, u]).shuffle(order)
            for i in order:
                c = cases[i]
                inputs = c["served"].inputs(histories[u : u + 1], c["served"].resolve(), c["f"])
                started = time.perf_counter()
                out = c["fn"](**{key: tf.constant(value) for key, value in inputs.items()})
                ids = out["item_ids"].numpy()[0]
                stats[i]["ms"].append(1000 * (time.perf_counter() - started))
                if r == 0:
                    ok = np.ones(len(original), bool)
                    if c["blocked"]:
                        ok[blocked[c["blocked"]]] = False
                    allowed = np.flatnonzero(ok)
                    best = allowed[np.argsort(-scores[u][allowed], kind="stable")[: len(ids)]]
                    got = np.searchsorted(original, ids[ids >= 0])
                    stats[i]["cover"].append(len(np.intersect1d(got, best)) / len(best))
                    stats[i]["plans"].append(PLANS[int(out["plan"].numpy()[0])] if c["f"] else "unfiltered")
    return [
        {
            "export": c["export"],
            "version": c["version"],
            "blocked": c["blocked"],
            "p50_ms": float(np.median(st["ms"])),
            "mean_ms": float(np.mean(st["ms"])),
            "calls": len(st["ms"]),
            "plans": {p: st["plans"].count(p) for p in dict.fromkeys(st["plans"])},
            **harness.coverage_stats(st["cover"]),
        }
        for c, st in zip(cases, stats, strict=True)
    ]


def allow_list_cost(
    ev, scores, exports: list[tuple[str, Path]], shares, rounds: int, seed: int = 0
) -> list[dict]:
    """Per export and allow-list share, the same random category lists on every export,
    alternating call by call: p50, items scored, coverage@k under the filter, plans."""
    tf = harness.import_tensorflow()
    from model_export.filter_eval import category_allow_list
    from nann_common.contract import PLANS, RowFilter

    original, cats = ev.dataset.item_ids, ev.dataset.item_category
    histories = np.where(ev.histories >= 0, original[np.maximum(ev.histories, 0)], -1)
    sides = []
    for label, path in exports:
        served, model, xla = _load(path, histories)
        sides.append((label, path, served, model.signatures[served.signature(xla, filtered=True)]))
    rows = []
    for share in shares:
        rng = np.random.default_rng([seed, round(share * 1e6)])
        lists = [category_allow_list(cats, share, rng) for _ in range(ev.num_users)]
        stats = {label: {"ms": [], "cover": [], "scored": [], "plans": []} for label, *_ in sides}
        for r in range(rounds):
            for u in range(ev.num_users):
                f = [RowFilter(allow_categories=lists[u])]
                for label, _, served, fn in sides if (u + r) % 2 else sides[::-1]:
                    inputs = served.inputs(histories[u : u + 1], served.resolve(), f)
                    started = time.perf_counter()
                    out = fn(**{key: tf.constant(value) for key, value in inputs.items()})
                    ids = out["item_ids"].numpy()[0]
                    st = stats[label]
                    st["ms"].append(1000 * (time.perf_counter() - started))
                    if r == 0:
                        allowed = np.flatnonzero(np.isin(cats, lists[u]))
                        best = allowed[
                            np.argsort(-scores[u][allowed], kind="stable")[: min(len(allowed), 200)]
                        ]
                        got = np.searchsorted(original, ids[ids >= 0])
                        st["cover"].append(len(np.intersect1d(got, best)) / len(best))
                        st["scored"].append(int(out["scored"].numpy()[0]))
                        st["plans"].append(PLANS[int(out["plan"].numpy()[0])])
        for label, path, _, _ in sides:
            st = stats[label]
            rows.append(
                {
                    "export": label,
                    "version": path.name,
                    "allowed_share": share,
                    "p50_ms": float(np.median(st["ms"])),
                    "mean_ms": float(np.mean(st["ms"])),
                    "calls": len(st["ms"]),
                    "scored_per_user": float(np.mean(st["scored"])),
                    "plans": {p: st["plans"].count(p) for p in dict.fromkeys(st["plans"])},
                    **harness.coverage_stats(st["cover"]),
                }
            )
            print(rows[-1], flush=True)
    return rows


def _table(title: str, case: str, rows: list[tuple[str, dict]]) -> list[str]:
    """Markdown lines of a cost comparison: one row per (case label, result row)."""
    lines = [
        title,
        "",
        f"| export | version | {case} | p50 ms | mean ms | calls | items scored "
        "| coverage@k (± SE, min) | plans |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows:
        plans = ", ".join(f"{p} {n}" for p, n in r["plans"].items())
        cover = f"{r['coverage']:.4f} ± {r['coverage_sem']:.4f} ({r['min_coverage']:.2f})"
        scored = f"{r['scored_per_user']:,.0f}" if "scored_per_user" in r else ""
        lines.append(
            f"| {r['export']} | {r['version']} | {label} | {r['p50_ms']:.2f} | {r['mean_ms']:.2f} | "
            f"{r['calls']} | {scored} | {cover} | {plans} |"
        )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--name", required=True, help="corpus label in the result files")
    parser.add_argument("--users", type=int, default=100, help="seeded test users (default 100)")
    parser.add_argument(
        "--selectivity",
        type=harness.floats,
        default=(0.5, 0.1, 0.01, 0.001),
        help="allow-list shares (default 0.5,0.1,0.01,0.001)",
    )
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="an earlier export version dir (b: its unfiltered query against this one)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="before/after: passes over the users (default 3)"
    )
    parser.add_argument(
        "--blocklist",
        type=harness.ints,
        default=(100, 1000, 10000),
        help="blocklist sizes whose cost per call is measured (default 100,1000,10000; empty: skip)",
    )
    parser.add_argument(
        "--previous",
        type=Path,
        default=None,
        help="an earlier export version dir with filters, for the blocklist part",
    )
    parser.add_argument(
        "--allow-lists",
        type=harness.floats,
        default=(),
        help="d: category allow-list shares whose cost is compared with --previous, call by call "
        "(e.g. 0.5,0.2,0.1; default: skip)",
    )
    parser.add_argument("--skip-study", action="store_true", help="only parts b, c and d")
    args = parser.parse_args(argv)

    harness.import_tensorflow()
    from benchmarks.walk_replay import cached_scores
    from model_export import filter_eval
    from model_export.evaluate import Evaluation

    peak = harness.matmul_peak_gflops()
    ev = Evaluation(args.workdir, "test", args.users, 0)
    scores = cached_scores(args.workdir, args.users)  # the exact scores, cached in W/eval/scores/
    result = {**harness.result_header(__file__, argv, peak), "name": args.name}
    lines = [f"## Filters, {args.name}", "", f"Command: `{result['command']}`", ""]
    if not args.skip_study:
        study = filter_eval.filter_study(
            args.workdir, args.selectivity, users=args.users, evaluation=ev, scores=scores, progress=True
        )
        result["study"] = study
        lines.append(filter_eval.markdown(study))
    if args.before is not None:
        from model_export.export import latest_export

        rows = before_after(ev, scores, args.before, latest_export(args.workdir), args.rounds)
        result["before_after"] = rows
        lines += [
            "Unfiltered default query, the --before export against this one, alternating call by "
            "call on the same users:",
            "",
            "| export | version | signature | p50 ms | mean ms | calls | coverage@200 |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['export']} | {r['version']} | {r['signature']} | {r['p50_ms']:.2f} | "
                f"{r['mean_ms']:.2f} | {r['calls']} | {r['coverage']:.4f} |"
            )
        lines.append("")
        for r in rows:
            print(r, flush=True)
    from model_export.export import latest_export

    exports = [("this", latest_export(args.workdir))]
    exports += [("previous", args.previous)] if args.previous else []
    if args.blocklist:
        rows = blocklist_cost(ev, scores, exports, (0, *args.blocklist), args.rounds)
        result["blocklist"] = rows
        lines += _table(
            "A blocklist merged into every call (random items), against the unfiltered query, all cases "
            "alternating call by call on the same users (coverage@k against the exact top k without the "
            "blocked items):",
            "blocked items",
            [(f"{r['blocked']:,}", r) for r in rows],
        )
    if args.allow_lists:
        rows = allow_list_cost(ev, scores, exports, args.allow_lists, args.rounds)
        result["allow_lists"] = rows
        lines += _table(
            "Category allow-lists (the same random lists on every export), alternating call by call on the "
            "same users (coverage@k against the exact top k among the allowed items):",
            "allowed",
            [(f"{100 * r['allowed_share']:g}%", r) for r in rows],
        )
    stem = harness.RESULTS / f"filters_{args.name}"
    harness.write_result(stem.with_suffix(".json"), result)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
