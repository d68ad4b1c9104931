"""Loading cost of a UserBehavior-format file: rows/s and peak memory of prepare.

Synthesizes a file of about USERS x MEAN_LENGTH rows (unless --csv is given),
then times ``data.load_dataset_from_file`` on it (streamed 64 MB blocks,
validation, id remapping, the split) in a fresh process so the peak RSS is the
loader's own.

    python benchmarks/load_scale.py --users 100000 --mean-length 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MEASURE = """
import json, resource, sys, time
from model_export import data
started = time.perf_counter()
ds = data.load_dataset_from_file(sys.argv[1])
seconds = time.perf_counter() - started
rows = ds.meta["counts"]["rows"]
print(json.dumps({"rows": rows, "seconds": round(seconds, 2), "rows_per_second": round(rows / seconds),
                  "users_kept": ds.num_users, "items": ds.num_items,
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", help="an existing UserBehavior-format file (default: synthesize one)")
    parser.add_argument("--items", type=int, default=400_000)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--mean-length", type=float, default=100.0)
    args = parser.parse_args()
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        csv = args.csv
        if csv is None:
            csv = str(Path(tmp) / "interactions.csv")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "model_export",
                    "synthesize",
                    "--items",
                    str(args.items),
                    "--users",
                    str(args.users),
                    "--mean-length",
                    str(args.mean_length),
                    "--out",
                    csv,
                ],
                check=True,
                env=env,
                cwd=ROOT,
                stderr=subprocess.DEVNULL,
            )
        done = subprocess.run(
            [sys.executable, "-c", MEASURE, csv],
            check=True,
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["bytes"] = Path(csv).stat().st_size
    result["command"] = "python benchmarks/load_scale.py " + " ".join(sys.argv[1:])
    result["cpus"] = os.cpu_count()
    print(json.dumps(result, indent=2))
    out = ROOT / "benchmarks" / "results" / f"load_{result['rows']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
