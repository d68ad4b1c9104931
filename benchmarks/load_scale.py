"""Loading cost of a UserBehavior-format file: rows/s and peak memory of prepare.

Synthesizes a file of about USERS x MEAN_LENGTH rows (unless --csv is given),
then times ``data.load_dataset_from_file`` on it (streamed 64 MB blocks,
validation, id remapping, the split) in a fresh process so the peak RSS is the
loader's own.

    python -m benchmarks.load_scale --users 100000 --mean-length 100
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from benchmarks import harness

MEASURE = """
import json, sys, time
from benchmarks.harness import peak_rss_mib
from model_export import data
started = time.perf_counter()
ds = data.load_dataset_from_file(sys.argv[1])
seconds = time.perf_counter() - started
rows = ds.meta["counts"]["rows"]
print(json.dumps({"rows": rows, "seconds": round(seconds, 2), "rows_per_second": round(rows / seconds),
                  "users_kept": ds.num_users, "items": ds.num_items,
                  "peak_rss_mib": peak_rss_mib()}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument("--csv", help="an existing UserBehavior-format file (default: synthesize one)")
    parser.add_argument("--items", type=int, default=400_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--mean-length", type=float, default=100.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        csv = args.csv
        if csv is None:
            csv = str(Path(tmp) / "interactions.csv")
            synthesize = ["-m", "model_export", "synthesize", "--items", str(args.items)]
            synthesize += ["--users", str(args.users), "--mean-length", str(args.mean_length), "--out", csv]
            harness.run_python(synthesize, quiet=True)
        measured = json.loads(harness.run_python(["-c", MEASURE, csv], echo=False).strip().splitlines()[-1])
        measured["bytes"] = Path(csv).stat().st_size
    result = {**harness.result_header(__file__, argv), **measured}
    print(json.dumps(result, indent=2))
    harness.write_result(harness.RESULTS / f"load_{result['rows']}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
