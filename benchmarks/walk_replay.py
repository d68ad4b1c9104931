"""Replays Beam-retrieval in numpy over exact scores: per-user coverage of graph variants in seconds.

Export + evaluate through the SavedModel costs minutes per graph at 1.37M items. For graph
design it is enough to score every item once per evaluated user (the exhaustive pass,
cached under ``DIR/eval/scores/``) and replay Algorithms 1 + 2 (DESIGN.md section 2)
over those scores on each graph. The replay walks exactly as
``walk.search.beam_retrieval``: start layer scored whole, its best ef seed the
walk, T rounds per layer expanding the newest beam members, early stop when none enters.
The replay itself is ``walk.replay``; a test checks it against the SavedModel. The scores take
4 bytes per user and item (1.4 GB for 256 users at 1.37M items).

    python -m benchmarks.walk_replay --workdir runs/big/din-fgsm --users 64 \\
        --index runs/big/din-fgsm/index runs/big/din-fgsm/ablation/cover-seed2/index \\
        [--ef 100,200,400 --steps 1,1,3] [--out benchmarks/results/replay.json]

For each graph it prints the mean coverage@k, the % of the corpus scored, and the users
below ``--report-below`` with what their missed items look like (level, in-links, and the
best score among the nodes that link to them).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import harness
from walk.replay import exact_scores, exact_top_k, replay_user


def cached_scores(workdir: Path, users: int, seed: int = 0, split: str = "test") -> np.ndarray:
    """:func:`exact_scores` of ``evaluate --users``' sample, cached in DIR/eval/scores/."""
    from model_export.evaluate import Evaluation
    from nann_common import artifacts

    evaluation = Evaluation(workdir, split, users, seed)
    key = artifacts.digest(evaluation.train_meta)[:16]
    path = workdir / "eval" / "scores" / f"{key}-{split}-users{evaluation.num_users}-seed{seed}.npy"
    if path.is_file():
        return np.load(path)
    out = exact_scores(evaluation)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}.npy")
    np.save(tmp, out)
    os.replace(tmp, path)
    return out


def diagnose(graph, scores: np.ndarray, missed: np.ndarray, kth: float) -> dict:
    """What the missed items of one user look like: levels, in-links, best in-linking score."""
    nb0 = graph.neighbors[0]
    src = np.flatnonzero(np.isin(nb0, missed).any(axis=1))  # nodes linking to a missed item
    best_in = []
    for v in missed:
        linkers = src[(nb0[src] == v).any(axis=1)]
        best_in.append(float(scores[linkers].max()) if len(linkers) else -np.inf)
    return {
        "missed": len(missed),
        "missed_on_layer1": int((graph.levels[missed] >= 1).sum()),
        "missed_median_in_links": float(np.median([len(src[(nb0[src] == v).any(axis=1)]) for v in missed])),
        "missed_best_in_link_score_median": float(np.median(best_in)),
        "kth_score": kth,
    }


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument(
        "--workdir", required=True, type=Path, help="trained workdir (dataset, model, embeddings)"
    )
    parser.add_argument("--index", nargs="+", type=Path, required=True, help="index/ directories to replay")
    parser.add_argument("--users", type=int, default=64, help="seeded test users (as evaluate --users)")
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument(
        "--ef", type=harness.ints, default="100,200,400", help="top-down from the start layer"
    )
    parser.add_argument("--steps", type=harness.ints, default="1,1,3", help="top-down from the start layer")
    parser.add_argument("--report-below", type=float, default=0.9, help="diagnose users below this coverage")
    parser.add_argument("--out", type=Path, help="JSON file for the per-graph results")
    args = parser.parse_args(argv)
    harness.import_tensorflow()
    from nann_common.graph import load_graph
    from nann_common.graph import start_layer as default_start_layer

    ef, steps = list(args.ef), list(args.steps)
    scores = cached_scores(args.workdir, args.users)
    reference = exact_top_k(scores, args.k)
    results = []
    for index in args.index:
        started = time.perf_counter()
        graph = load_graph(index, verify=False)
        start_layer = default_start_layer([len(x) for x in graph.nodes], graph.num_items, ef)
        if start_layer + 1 != len(ef):
            print(f"{index}: start layer {start_layer} needs {start_layer + 1} ef values", file=sys.stderr)
            return 2
        cover, cost, weak = [], [], []
        for u in range(len(scores)):
            top, scored = replay_user(graph, scores[u], ef, steps, start_layer, args.k)
            c = len(np.intersect1d(top, reference[u])) / args.k
            cover.append(c)
            cost.append(scored)
            if c < args.report_below:
                missed = np.setdiff1d(reference[u], top)
                weak.append(
                    {
                        "user": u,
                        "coverage": c,
                        **diagnose(graph, scores[u], missed, float(scores[u, reference[u, -1]])),
                    }
                )
        row = {
            "index": str(index),
            "start_layer": start_layer,
            "start_nodes": len(graph.nodes[start_layer]),
            "ef": ef,
            "steps": steps,
            "coverage": round(float(np.mean(cover)), 4),
            "min_coverage": round(float(np.min(cover)), 4),
            "scored_percent": round(100 * float(np.mean(cost)) / graph.num_items, 3),
            "weak_users": weak,
            "seconds": round(time.perf_counter() - started, 1),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        harness.write_result(args.out, {**harness.result_header(__file__, argv), "rows": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
