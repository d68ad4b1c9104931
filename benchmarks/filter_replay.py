"""Category allow-lists replayed over exact scores: the filtered walk's rules in seconds.

The filtered walk of the export (walk.search with a Filter) is replayed in numpy over every
item's exact score for each evaluated user (cached under ``DIR/eval/scores/``, as
``benchmarks.walk_replay``), under an allow-list of whole random categories per user drawn as
``model_export evaluate --filter-selectivity`` draws them. Each variant is compared with the
exact top k among the allowed items: coverage@k (± SE, lowest user), items scored, and the share
of missed items that lie in a category the walk never scored an item of.

    python -m benchmarks.filter_replay --workdir W --users 40 --selectivity 0.5,0.2,0.1 \\
        [--variants default,previous] [--power P --t0-factor F --ef0 X] [--out FILE.json]

Variants (layer 0; the upper layers walk as the export's):

* ``default``: the export's rules: allowed items ranked first; a disallowed neighbour is passed
  through unscored to its own allowed neighbours; layer 0's ef grown as share ** -SELECTIVE_POWER
  and its T times SELECTIVE_STEPS; one entry item per allowed category when a list names at most
  ENTRY_CATEGORIES; a short answer widens;
* ``previous``: the rules before: disallowed neighbours scored (and walked when the beam has room),
  ef grown as share ** -0.6, T as the query's.

``--power``, ``--t0-factor``, ``--ef0`` and ``--entry-categories`` override a rule for every variant.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from benchmarks import harness
from benchmarks.walk_replay import cached_scores
from walk.replay import replay_walk

VARIANTS = ("default", "previous")
PREVIOUS_POWER = 0.6


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument("--workdir", required=True, type=Path, help="trained, indexed and exported workdir")
    parser.add_argument("--users", type=int, default=40, help="seeded test users (as evaluate --users)")
    parser.add_argument("--selectivity", type=harness.floats, default="0.5,0.2,0.1", help="allowed shares")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--power", type=float, help="layer 0's ef grows as share ** -power (default: the variant's)"
    )
    parser.add_argument("--t0-factor", type=int, help="layer 0's T times this (default: the variant's)")
    parser.add_argument("--ef0", type=float, default=1.0, help="layer 0's grown ef times this")
    parser.add_argument("--entry-categories", type=int, help="seed lists naming at most this many categories")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if not variants or set(variants) - set(VARIANTS):
        parser.error(f"--variants takes {', '.join(VARIANTS)}; got {args.variants!r}")
    harness.import_tensorflow()
    from model_export import export as rules
    from model_export.evaluate import Evaluation
    from model_export.filter_eval import category_allow_list
    from nann_common.graph import load_graph

    ev = Evaluation(args.workdir, "test", args.users, args.seed)
    params = ev.read_export_meta()["params"]
    scores = cached_scores(args.workdir, args.users)
    graph = load_graph(args.workdir / "index", verify=False)
    ef, steps, k = list(params["ef"]), list(params["steps"]), int(params["k"])
    stride = params["history_stride"]
    start_nodes = graph.nodes[params["start_layer"]]
    start_nodes = start_nodes[::stride] if stride else start_nodes[:1]
    cats = ev.dataset.item_category
    entries = rules.category_entries(ev.item_e, cats, int(cats.max()) + 1)
    n = graph.num_items
    entry_cap = rules.ENTRY_CATEGORIES if args.entry_categories is None else args.entry_categories
    print(
        f"{n:,} items, {int(cats.max()) + 1:,} categories, {len(scores)} users, k {k}, "
        f"default query ef {ef} T {steps}",
        flush=True,
    )
    results = []
    for share in args.selectivity:
        for variant in variants:
            power = args.power or (rules.SELECTIVE_POWER if variant == "default" else PREVIOUS_POWER)
            t0_factor = args.t0_factor or (rules.SELECTIVE_STEPS if variant == "default" else 1)
            rng = np.random.default_rng([args.seed, round(share * 1e6)])  # the same lists for every variant
            started = time.perf_counter()
            cover, cost, unreached = [], [], []
            for u in range(len(scores)):
                allow = np.array(category_allow_list(cats, share, rng))
                allowed = np.isin(cats, allow)
                ids = np.flatnonzero(allowed)
                want = min(k, len(ids))
                best = ids[np.argsort(-scores[u][ids], kind="stable")[:want]]
                grow = float(np.clip(max(len(ids) / n, 1e-12) ** -power, 1.0, rules.SELECTIVE_EF))
                e = ef[:-1] + [int(round(ef[-1] * grow * args.ef0))]
                t = steps[:-1] + [steps[-1] * t0_factor]
                seeds = ev.histories[u]
                if len(allow) <= entry_cap:
                    seeds = np.concatenate([seeds, entries[allow]])
                seeds = np.unique(seeds[seeds >= 0])
                walk = (graph, scores[u], e, t, params["start_layer"], start_nodes, seeds, allowed)
                key, _, scored, pool = replay_walk(*walk, pass_through=variant == "default")
                top = pool[allowed[pool]]
                if len(top) < want:  # widen, as the planner
                    e[-1] *= rules.WIDEN_EF
                    t[-1] *= rules.WIDEN_STEPS
                    key, _, more, pool = replay_walk(*walk, pass_through=variant == "default")
                    top = pool[allowed[pool]]
                    scored += more
                top = top[np.argsort(key[top], kind="stable")[:k]]
                missed = np.setdiff1d(best, top)
                reached = np.zeros(int(cats.max()) + 1, bool)
                reached[cats[pool]] = True
                unreached.append(float((~reached[cats[missed]]).sum()) / max(len(missed), 1))
                cover.append(len(np.intersect1d(top, best)) / max(want, 1))
                cost.append(scored)
            row = {
                "allowed_share": share,
                "variant": variant,
                "power": power,
                "t0": steps[-1] * t0_factor,
                "ef0_factor": args.ef0,
                "entry_categories": entry_cap,
                "coverage": round(float(np.mean(cover)), 4),
                "coverage_se": round(float(np.std(cover, ddof=1) / np.sqrt(len(cover))), 4),
                "coverage_min": round(float(np.min(cover)), 4),
                "scored": round(float(np.mean(cost))),
                "missed_in_unreached_categories": round(float(np.mean(unreached)), 3),
                "seconds": round(time.perf_counter() - started, 1),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        result = {**harness.result_header(__file__, argv), "items": n, "users": len(scores), "rows": results}
        harness.write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
