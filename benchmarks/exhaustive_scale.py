"""Cost of exhaustive top-200 at corpus scale: users/s, pairs/s and peak memory.

Exhaustive scoring is the reference that every approximate search is checked
against, so its cost decides how many users an evaluation can afford. The
figures do not depend on the weights, so the model here is untrained (random
init) with the same shape as a trained one.

    python -m benchmarks.exhaustive_scale --items 1300000 --users 32 --arch din
"""

from __future__ import annotations

import json
import time

import numpy as np

from benchmarks import harness


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument("--items", type=int, default=1_300_000)
    parser.add_argument("--categories", type=int, default=3000)
    parser.add_argument("--users", type=int, default=32, help="users timed (after one warm-up batch)")
    parser.add_argument("--arch", default="din", choices=("din", "dnn", "two_sided"))
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--user-batch", type=int, default=16)
    parser.add_argument("--item-chunk", type=int, default=8192)
    args = parser.parse_args(argv)
    harness.import_tensorflow()
    from model_export.evaluate import ExhaustiveSearcher
    from model_export.model import PAD, ModelConfig, build_model
    from model_export.train import item_embedding_matrix

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
    peak_rss = harness.peak_rss_mib()
    result = {
        **harness.result_header(__file__, argv),
        "arch": args.arch,
        "items": args.items,
        "users": args.users,
        "k": args.k,
        "item_embedding_seconds": round(embed_seconds, 1),
        "seconds": round(seconds, 2),
        "users_per_second": round(args.users / seconds, 3),
        "pairs_per_second": round(args.users * args.items / seconds),
        "hours_for_10000_users": round(10_000 / (args.users / seconds) / 3600, 1),
        "peak_rss_mib": peak_rss,
    }
    print(json.dumps(result, indent=2))
    harness.write_result(harness.RESULTS / f"exhaustive_{args.arch}_{args.items}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
