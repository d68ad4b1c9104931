"""Cheaper starts for the walk, replayed over exact scores before any export changes.

The start layer is scored exhaustively (6,826 nodes at 1.37M items: 57% of the items a query
scores, 45% of its time; ``profile_walk.py``). This replays, over the exact scores of every item
for a seeded sample of test users (cached as ``walk_replay.py`` caches them), other ways to
seed the walk, and reports coverage@k (mean and lowest user) against the items scored:

- ``cover``: the current start (the whole start layer, then the layers below), the reference;
- ``cover/F``: a fixed 1/F of the start layer (every F-th node), then the same walk;
- ``behaviours``: the user's own recent behaviours scored and used as layer-0 entry points;
- ``cover/F+behaviours``: both: 1/F of the start layer walked down, the behaviours added to the
  layer-0 entry points;
- ``cover/F>0+behaviours``: as the last, but the start layer's best go straight to layer 0 (T 0
  on the layers between: the export's ``beam_history`` with ``steps`` 1,0,T0);
- ``cover/F>0``: the same without the behaviours (``beam`` with ``steps`` 1,0,T0).

Layer-0 rounds are ``--steps``' last value unless ``--t0`` lists others to try.

    python -m benchmarks.seed_replay --workdir W --users 128 --fractions 2 4 8 --t0 3 5 \\
        --out benchmarks/results/seed_replay_1365188.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import harness
from benchmarks.walk_replay import cached_scores
from walk.replay import exact_top_k, replay_user


def replay(graph, scores, history, variant: str, fraction: int, ef, steps, start_layer: int, k: int):
    """(top-k ids, items scored) of one user under one seeding variant."""
    if variant == "behaviours":
        return replay_user(graph, scores, ef[-1:], steps[-1:], 0, k, seeds=history)
    start_nodes = graph.nodes[start_layer][::fraction]
    seeds = history if variant.endswith("+behaviours") else None
    if variant.startswith("cover>0"):
        # The start layer's best ef go straight to layer 0: T 0 on the layers between, as the
        # export runs it (steps 1,0,...,T0; with the behaviours, mode beam_history).
        steps = [steps[0]] + [0] * (len(steps) - 2) + [steps[-1]]
    return replay_user(graph, scores, ef, steps, start_layer, k, start_nodes=start_nodes, seeds=seeds)


def main(argv: list[str] | None = None) -> int:
    p = harness.parser(__doc__, __file__)
    p.add_argument(
        "--workdir", required=True, type=Path, help="workdir with dataset, model, embeddings, index"
    )
    p.add_argument("--users", type=int, default=128, help="seeded test users (as evaluate --users)")
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--ef", type=harness.ints, default="100,200,400", help="top-down from the start layer")
    p.add_argument("--steps", type=harness.ints, default="1,1,3", help="top-down from the start layer")
    p.add_argument("--fractions", type=int, nargs="+", default=[2, 4, 8], help="start-layer cuts to try")
    p.add_argument("--t0", type=int, nargs="*", default=[], help="layer-0 rounds to try besides --steps'")
    p.add_argument("--out", type=Path, help="JSON file")
    args = p.parse_args(argv)
    harness.import_tensorflow()
    from model_export.evaluate import Evaluation
    from nann_common.graph import load_graph
    from nann_common.graph import start_layer as default_start_layer

    ef, base_steps = list(args.ef), list(args.steps)
    scores = cached_scores(args.workdir, args.users)
    histories = Evaluation(args.workdir, "test", args.users, 0).histories
    reference = exact_top_k(scores, args.k)
    graph = load_graph(args.workdir / "index", verify=False)
    start_layer = default_start_layer([len(x) for x in graph.nodes], graph.num_items, ef)
    if start_layer + 1 != len(ef):
        print(f"start layer {start_layer} needs {start_layer + 1} ef and steps values", file=sys.stderr)
        return 2
    variants = [("cover", 1)] + [("cover", f) for f in args.fractions if f != 1]
    variants += [("behaviours", 1)] + [("cover+behaviours", f) for f in args.fractions]
    variants += [("cover>0+behaviours", f) for f in args.fractions]
    variants += [("cover>0", f) for f in args.fractions]
    rows = []
    for t0 in sorted({base_steps[-1], *args.t0}):
        steps = base_steps[:-1] + [t0]
        for variant, fraction in variants:
            started = time.perf_counter()
            cover, cost = [], []
            for u in range(len(scores)):
                top, scored = replay(
                    graph, scores[u], histories[u], variant, fraction, ef, steps, start_layer, args.k
                )
                cover.append(len(np.intersect1d(top, reference[u])) / args.k)
                cost.append(scored)
            name = variant if fraction == 1 else variant.replace("cover", f"cover/{fraction}")
            row = {
                "variant": name,
                "ef": ef,
                "steps": steps,
                **harness.coverage_stats(cover),
                "items_scored": round(float(np.mean(cost)), 1),
                "scored_percent": round(100 * float(np.mean(cost)) / graph.num_items, 3),
                "seconds": round(time.perf_counter() - started, 1),
            }
            rows.append(row)
            print(
                f"T0 {t0}  {name:<22} coverage {row['coverage']:.4f} (lowest {row['min_coverage']:.3f}, "
                f"{row['users_below_0.9']} below 0.9)  scored {row['items_scored']:.0f} "
                f"({row['scored_percent']:.3f}%)",
                flush=True,
            )
    if args.out:
        result = {
            **harness.result_header(__file__, argv),
            "items": graph.num_items,
            "users": len(scores),
            "start_layer": start_layer,
            "start_nodes": len(graph.nodes[start_layer]),
            "rows": rows,
        }
        harness.write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
