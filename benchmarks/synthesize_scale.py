"""Times model_export.synthetic.synthesize at a given scale and records the figures as JSON.

Writes benchmarks/results/synthesize_<items>x<users>.json (``--results-dir``); the CSV itself is
deleted unless ``--keep``.

    python -m benchmarks.synthesize_scale --items 4000000 --users 1000000
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks import harness


@dataclass(frozen=True)
class Config:
    items: int
    users: int
    categories: int | None
    seed: int
    mean_length: float
    out_dir: Path
    results_dir: Path
    keep: bool
    progress: bool


def parse_args(argv: list[str] | None = None) -> Config:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument("--items", type=int, required=True, help="catalogue size (paper scale: 4000000)")
    parser.add_argument("--users", type=int, required=True, help="number of users (paper scale: 1000000)")
    parser.add_argument("--categories", type=int, default=None, help="default: round(items / 440)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mean-length", type=float, default=100.0, help="mean behaviours per user")
    parser.add_argument(
        "--out-dir", type=Path, default=Path(tempfile.gettempdir()), help="where the CSV is written"
    )
    parser.add_argument("--results-dir", type=Path, default=harness.RESULTS, help="where the JSON goes")
    parser.add_argument("--keep", action="store_true", help="keep the generated CSV")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a = parser.parse_args(argv)
    return Config(
        items=a.items,
        users=a.users,
        categories=a.categories,
        seed=a.seed,
        mean_length=a.mean_length,
        out_dir=a.out_dir,
        results_dir=a.results_dir,
        keep=a.keep,
        progress=not a.no_progress,
    )


def run(config: Config, argv: list[str] | None = None) -> dict:
    from model_export.synthetic import synthesize

    out = config.out_dir / f"synthesize_{config.items}x{config.users}_seed{config.seed}.csv"
    try:
        summary = synthesize(
            config.items,
            config.users,
            out,
            categories=config.categories,
            seed=config.seed,
            mean_length=config.mean_length,
            show_progress=config.progress,
        )
    finally:
        if not config.keep:
            out.unlink(missing_ok=True)
    peak = harness.peak_rss_bytes()
    return {
        **harness.result_header(__file__, argv),
        "items_requested": config.items,
        "users": config.users,
        "categories_requested": summary["categories_requested"],
        "seed": config.seed,
        "mean_length": config.mean_length,
        "rows": summary["rows"],
        "items_used": summary["items"],
        "categories_used": summary["categories"],
        "seconds": summary["seconds"],
        "rows_per_second": round(summary["rows"] / summary["seconds"]),
        "bytes": summary["bytes"],
        "peak_rss_bytes": peak,
        "peak_rss_mib": round(peak / 2**20, 1),
        "csv_kept": str(out) if config.keep else None,
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    result = run(config, argv)
    path = harness.write_result(config.results_dir / f"synthesize_{config.items}x{config.users}.json", result)
    print(json.dumps(result, indent=2))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
