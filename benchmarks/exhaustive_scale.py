"""Cost of exhaustive top-200 at corpus scale: users/s, pairs/s and peak memory.

Exhaustive scoring is the reference that every approximate search is checked
against, so its cost decides how many users an evaluation can afford. The
figures do not depend on the weights, so the model here is untrained (random
init) with the same shape as a trained one.

    python benchmarks/exhaustive_scale.py --items 1300000 --users 32 --arch din
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402

from model_export.evaluate import ExhaustiveSearcher  # noqa: E402
from model_export.model import PAD, ModelConfig, build_model  # noqa: E402
from model_export.train import item_embedding_matrix  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_300_000)
    parser.add_argument("--categories", type=int, default=3000)
    parser.add_argument("--users", type=int, default=32, help="users timed (after one warm-up batch)")
    parser.add_argument("--arch", default="din", choices=("din", "dnn", "two_sided"))
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--user-batch", type=int, default=16)
    parser.add_argument("--item-chunk", type=int, default=8192)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    model = build_model(
        ModelConfig(args.items, args.categories, arch=args.arch), rng.integers(0, args.categories, args.items)
    )
    started = time.perf_counter()
    item_e = item_embedding_matrix(model)
    embed_seconds = time.perf_counter() - started
    histories = rng.integers(0, args.items, (args.users + args.user_batch, 50)).astype(np.int32)
    lengths = rng.integers(5, 51, len(histories))
    histories[np.arange(50)[None, :] >= lengths[:, None]] = PAD
    searcher = ExhaustiveSearcher(model, item_e, args.user_batch, args.item_chunk)
    searcher.search(histories[: args.user_batch], args.k, progress=False)  # warm-up: tracing
    started = time.perf_counter()
    searcher.search(histories[args.user_batch :], args.k)
    seconds = time.perf_counter() - started
    result = {
        "command": "python benchmarks/exhaustive_scale.py " + " ".join(sys.argv[1:]),
        "arch": args.arch,
        "items": args.items,
        "users": args.users,
        "k": args.k,
        "cpus": os.cpu_count(),
        "item_embedding_seconds": round(embed_seconds, 1),
        "seconds": round(seconds, 2),
        "users_per_second": round(args.users / seconds, 3),
        "pairs_per_second": round(args.users * args.items / seconds),
        "hours_for_10000_users": round(10_000 / (args.users / seconds) / 3600, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(result, indent=2))
    out = ROOT / "benchmarks" / "results" / f"exhaustive_{args.arch}_{args.items}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
