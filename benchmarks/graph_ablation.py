"""What each index-builder refinement buys Beam-retrieval: coverage and cost per graph variant.

For one trained workdir, builds the graph four ways with ``python -m index_builder``
(hnswlib alone; + layer-0 fill; + reverse links; + start-layer cover, the
default), exports each with ``python -m model_export export`` and evaluates
beam retrieval against the exhaustive top k with ``python -m model_export
evaluate``, at the export's default parameters and at the paper's. Each variant
lives in ``DIR/ablation/<variant>/``, which links to DIR's dataset, model,
embeddings and cached exhaustive reference; DIR itself is not touched.

    python -m benchmarks.graph_ablation --workdir runs/big/din-fgsm --users 64 --out benchmarks/results/x.json

``--seeds 1 2 --defaults-only`` instead builds the default graph with other seeds
of hnswlib's level generator: the spread between builds of one model.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import harness

# (folder under DIR/ablation, label in the report, index_builder flags)
VARIANTS = [
    ("hnswlib", "hnswlib", ["--layer0-degree", "0", "--layer0-in-degree", "0", "--start-nodes", "0"]),
    ("fill", "+ layer-0 fill", ["--layer0-in-degree", "0", "--start-nodes", "0"]),
    ("reverse", "+ reverse links", ["--start-nodes", "0"]),
    ("cover", "+ start-layer cover (default)", []),
]
SETTINGS = {"export default": None, "paper default": ("100,200,400", "1,1,3")}


def linked_workdir(workdir: Path, folder: str, seed: int) -> Path:
    target = workdir / "ablation" / f"{folder}-seed{seed}"
    target.mkdir(parents=True, exist_ok=True)
    (workdir / "eval").mkdir(exist_ok=True)
    for part in ("dataset", "model", "embeddings", "eval"):
        link = target / part
        if not link.exists():
            link.symlink_to((workdir / part).resolve(), target_is_directory=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--users", type=int, default=64, help="seeded test users evaluated")
    parser.add_argument("--threads", type=int, default=1, help="index build threads (1: reproducible)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file written with the rows")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="level-generator seeds (default 0)")
    parser.add_argument("--defaults-only", action="store_true", help="build only the default graph")
    args = parser.parse_args(argv)

    rows = []
    variants = VARIANTS[-1:] if args.defaults_only else VARIANTS
    for seed, (folder, name, flags) in ((s, v) for s in args.seeds for v in variants):
        work = linked_workdir(args.workdir, folder, seed)
        threads = ["--threads", str(args.threads), "--seed", str(seed)]
        harness.run_python(["-m", "index_builder", "--workdir", str(work), *threads, *flags])
        harness.run_python(["-m", "model_export", "export", "--workdir", str(work)])
        meta = json.loads((work / "index" / "meta.json").read_text())
        for setting, values in SETTINGS.items():
            cmd = ["-m", "model_export", "evaluate", "--workdir", str(work), "--mode", "beam"]
            cmd += ["--users", str(args.users), "--json"]
            if values:
                cmd += ["--ef", values[0], "--steps", values[1]]
            result = json.loads(harness.run_python(cmd).strip().splitlines()[-1])
            row = {
                "graph": name,
                "seed": seed,
                "index_flags": " ".join(flags) or "(defaults)",
                "setting": setting,
                "ef": result["ef"],
                "steps": result["steps"],
                "coverage": round(result["coverage"], 4),
                "scored_percent": round(100 * result["scored_fraction"], 3),
                "recall_delta": round(result["recall_delta"], 4),
                "layer0_mean_degree": meta["layers"][0]["mean_degree"],
                "start_layer_nodes": meta["start_layer_cover"]["nodes"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {**harness.result_header(__file__, argv), "users": args.users, "rows": rows}
    harness.write_result(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
