"""Table-3-style benchmark: recall-all@200 per architecture, with and without FGSM.

Trains two_sided, dnn and din, each with --fgsm-eps 0 and the default, on a
synthetic UserBehavior-format corpus and/or MovieLens-small, evaluates each
by exhaustive top-200 over the whole corpus, and writes the table (Markdown
and JSON, with the command that produced it) to benchmarks/results/.
Every training run is its own process (`python -m model_export train`), so
its throughput and peak memory are its own. A popularity baseline (the 200
items most frequent among training users) is reported beside the models.

    python -m benchmarks.table3 --dataset synthetic --items 100000 --users 20000
    python -m benchmarks.table3 --dataset movielens --epochs 3
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks import harness

ROOT = harness.ROOT
ARCHS = ("two_sided", "dnn", "din")


def popularity_recall(workdir: Path, k: int, users: int, seed: int) -> float:
    """recall@k of the k items most frequent among training users, on the same evaluated users."""
    from model_export.data import load_dataset

    ds = load_dataset(workdir / "dataset")
    top = np.argsort(-ds.item_counts(ds.train_users), kind="stable")[:k]
    eval_users, _, targets = ds.eval_examples("test", 50)
    if users and users < len(eval_users):
        pick = np.sort(np.random.default_rng(seed).choice(len(eval_users), users, replace=False))
        targets = targets[pick]
    return float(np.isin(targets, top).mean())


def bench(name: str, interactions: str, fmt: str, args) -> dict:
    rows = []
    base = ROOT / "runs" / "table3" / name
    for arch in ARCHS:
        for eps in (0.0, args.fgsm_eps):
            workdir = base / f"{arch}-eps{eps:g}"
            harness.run_python(
                [
                    "-m",
                    "model_export",
                    "train",
                    "--interactions",
                    interactions,
                    "--format",
                    fmt,
                    "--workdir",
                    str(workdir),
                    "--arch",
                    arch,
                    "--fgsm-eps",
                    str(eps),
                    "--epochs",
                    str(args.epochs),
                    "--seed",
                    str(args.seed),
                    "--restart",
                ]
            )
            out = harness.run_python(
                [
                    "-m",
                    "model_export",
                    "evaluate",
                    "--workdir",
                    str(workdir),
                    "--k",
                    "200",
                    "--users",
                    str(args.eval_users),
                    "--json",
                ]
            )
            result = json.loads(out.strip().splitlines()[-1])
            meta = json.loads((workdir / "model" / "meta.json").read_text())
            result["training"] = meta["training"]
            rows.append(result)
            print(json.dumps(result), flush=True)
    pop = popularity_recall(base / f"{ARCHS[0]}-eps0", 200, args.eval_users, 0)
    return {
        "dataset": name,
        "interactions": interactions,
        "rows": rows,
        "popularity_recall": pop,
        "dataset_counts": json.loads((base / f"{ARCHS[0]}-eps0" / "dataset" / "meta.json").read_text())[
            "counts"
        ],
    }


def markdown(result: dict, command: str) -> str:
    rows = {(r["arch"], r["fgsm_eps"] > 0): r for r in result["rows"]}
    c = result["dataset_counts"]
    users = result["rows"][0]["users"]
    lines = [
        f"### {result['dataset']}: recall-all@200 (%), exhaustive, {users} test users",
        "",
        f"Corpus: {c.get('items')} items, {c.get('users_kept')} users kept, {c.get('rows')} rows. "
        f"Popularity baseline (top-200 training items): {100 * result['popularity_recall']:.1f}%.",
        "",
        "| model | no FGSM | FGSM | train ex/s (no FGSM / FGSM) | peak RSS MiB (no FGSM / FGSM) |",
        "|---|---|---|---|---|",
    ]
    for arch in ARCHS:
        a, b = rows[(arch, False)], rows[(arch, True)]
        lines.append(
            f"| {arch} | {100 * a['recall_all']:.1f} | {100 * b['recall_all']:.1f} | "
            f"{a['training']['examples_per_second']:.0f} / {b['training']['examples_per_second']:.0f} | "
            f"{a['training']['peak_rss_mib']:.0f} / {b['training']['peak_rss_mib']:.0f} |"
        )
    lines += ["", f"Command: `{command}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument("--dataset", choices=("synthetic", "movielens"), required=True)
    parser.add_argument("--items", type=int, default=100_000, help="synthetic corpus size")
    parser.add_argument("--users", type=int, default=20_000, help="synthetic users")
    parser.add_argument("--mean-length", type=float, default=30.0, help="synthetic behaviours per user")
    parser.add_argument("--movielens", default=str(ROOT.parent / "shared" / "data" / "movielens-small"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--fgsm-eps", type=float, default=3e-4)
    parser.add_argument("--eval-users", type=int, default=1000, help="seeded sample of test users (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.dataset == "synthetic":
        csv = ROOT / "runs" / "table3" / f"synthetic-{args.items}x{args.users}.csv"
        if not csv.exists():
            harness.run_python(
                [
                    "-m",
                    "model_export",
                    "synthesize",
                    "--items",
                    str(args.items),
                    "--users",
                    str(args.users),
                    "--mean-length",
                    str(args.mean_length),
                    "--seed",
                    str(args.seed),
                    "--out",
                    str(csv),
                ]
            )
        result = bench(f"synthetic-{args.items}x{args.users}", str(csv), "userbehavior", args)
    else:
        result = bench("movielens-small", args.movielens, "movielens", args)
    result = {**harness.result_header(__file__, argv), **result, "epochs": args.epochs}
    stem = harness.RESULTS / f"table3_{result['dataset']}"
    harness.write_result(stem.with_suffix(".json"), result)
    stem.with_suffix(".md").write_text(markdown(result, result["command"]))
    print(markdown(result, result["command"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
