"""Cost of building and extracting the HNSW graph at corpus scale: seconds, peak memory, degrees.

Trained e_v cluster by category, and clusters are what make hnswlib's
neighbour-selection heuristic keep few links, so the embeddings here are seeded
Gaussian clusters (a few thousand centres, like the categories) rather than
uniform noise. The figures decide whether the full 4M-item corpus fits the
machine.

    python -m benchmarks.index_scale --items 1300000 --threads 2
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time

import numpy as np

from benchmarks import harness
from index_builder.build import BuildConfig, build_hnsw, extract_graph, log_layers


def rss_mib() -> float:
    """Current resident memory (the peak is in getrusage; this shows what is still held)."""
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def clustered_embeddings(items: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Cluster centres of norm about 1 with members spread at a third of that, built in chunks."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32) / np.sqrt(dim)
    sizes = rng.lognormal(0.0, 1.0, clusters)  # uneven category sizes, the largest ~20x the mean
    assign_p = sizes / sizes.sum()
    out = np.empty((items, dim), np.float32)
    for start in range(0, items, 1 << 18):
        stop = min(start + (1 << 18), items)
        members = rng.choice(clusters, stop - start, p=assign_p)
        noise = rng.standard_normal((stop - start, dim)).astype(np.float32) / (3 * np.sqrt(dim))
        out[start:stop] = centres[members] + noise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__, __file__)
    parser.add_argument("--items", type=int, default=1_300_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clusters", type=int, default=3000, help="cluster centres (default 3000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config = BuildConfig(m=args.m, ef_construction=args.ef_construction, threads=args.threads, seed=args.seed)
    baseline_mib = rss_mib()
    vectors = clustered_embeddings(args.items, args.dim, args.clusters, args.seed)
    embeddings_mib = round(vectors.nbytes / 2**20, 1)

    started = time.perf_counter()
    index = build_hnsw(vectors, config)
    build_seconds = time.perf_counter() - started
    del vectors
    gc.collect()
    index_rss_mib = rss_mib()  # hnswlib's own memory, embeddings freed
    peak_after_build = harness.peak_rss_mib()

    started = time.perf_counter()
    graph = extract_graph(index)
    extract_seconds = time.perf_counter() - started
    peak_after_extract = harness.peak_rss_mib()
    del index
    gc.collect()
    graph_bytes = sum(a.nbytes for a in (*graph.nodes, *graph.neighbors, graph.levels))
    stats = graph.layer_stats()
    log_layers(stats, args.m)

    result = {
        **harness.result_header(__file__, argv),
        "items": args.items,
        "dim": args.dim,
        "m": args.m,
        "ef_construction": args.ef_construction,
        "threads": args.threads,
        "clusters": args.clusters,
        "build_seconds": round(build_seconds, 1),
        "items_per_second": round(args.items / build_seconds),
        "extract_seconds": round(extract_seconds, 2),
        "baseline_rss_mib": baseline_mib,
        "embeddings_mib": embeddings_mib,
        "index_rss_mib": round(index_rss_mib - baseline_mib, 1),
        "graph_arrays_mib": round(graph_bytes / 2**20, 1),
        "peak_rss_after_build_mib": peak_after_build,
        "peak_rss_mib": peak_after_extract,
        "peak_bytes_per_item": round(peak_after_extract * 2**20 / args.items),
        "max_level": graph.max_level,
        "layers": stats,
    }
    print(json.dumps(result, indent=2))
    harness.write_result(harness.RESULTS / f"index_{args.items}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
