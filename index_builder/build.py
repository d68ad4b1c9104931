"""Builds the HNSW graph over a workdir's item embeddings and writes the ``index/`` artifact.

    embeddings/ (item_embeddings.npy, item_ids.npy, meta.json)
        -> hnswlib, l2, labels = dense item ids 0..N-1
        -> layers read from the pickle state (hnsw_state)
        -> index/ (graph.npz, meta.json), replaced atomically

Only files connect this stage to training: it never imports the model.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import resource
import time
from pathlib import Path

import numpy as np

from index_builder.graph import KIND, Graph, save_graph
from index_builder.hnsw_state import graph_from_state
from model_export import artifacts
from model_export.errors import ArtifactError

logger = logging.getLogger("index_builder")

SPACE = "l2"
EMBEDDINGS_FILE = "item_embeddings.npy"
ITEM_IDS_FILE = "item_ids.npy"
DEFAULT_LAYER0_DEGREE = 16
DEFAULT_LAYER0_IN_DEGREE = 8
MAX_M = 1024  # hnswlib stores a layer-0 degree (up to 2M) in 16 bits


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    """Build-time parameters of the graph (query-time ef / T live with the exporter).

    Attributes:
      m: links per node on upper layers; layer 0 allows 2 * m. The paper uses 32.
      ef_construction: beam width while inserting; larger is slower and better linked.
      threads: insertion threads; with more than one the graph is not reproducible.
      seed: seed of hnswlib's level generator.
      layer0_degree: after the build, layer-0 nodes with fewer links are topped up to this
        many with their nearest neighbours (hnswlib's own links first); 0 keeps hnswlib's
        graph as built; None: min(16, 2 * m). See :func:`fill_layer0`.
      layer0_in_degree: then layer-0 nodes with fewer in-links get reverse links from their
        own neighbours, up to this many where lists have room (2 * m); 0 adds none; None:
        min(DEFAULT_LAYER0_IN_DEGREE, 2 * m). See :func:`add_in_links`.
    """

    m: int = 32
    ef_construction: int = 40
    threads: int = 1
    seed: int = 0
    layer0_degree: int | None = None
    layer0_in_degree: int | None = None

    def __post_init__(self):
        if not 2 <= self.m <= MAX_M:
            raise ValueError(f"m must be in 2..{MAX_M}, got {self.m}")
        if self.ef_construction < 1:
            raise ValueError(f"ef_construction must be >= 1, got {self.ef_construction}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.layer0_degree is None:
            object.__setattr__(self, "layer0_degree", min(DEFAULT_LAYER0_DEGREE, 2 * self.m))
        if not 0 <= self.layer0_degree <= 2 * self.m:
            raise ValueError(f"layer0_degree must be in 0..2*m = 0..{2 * self.m}, got {self.layer0_degree}")
        if self.layer0_in_degree is None:
            object.__setattr__(self, "layer0_in_degree", min(DEFAULT_LAYER0_IN_DEGREE, 2 * self.m))
        if not 0 <= self.layer0_in_degree <= 2 * self.m:
            raise ValueError(
                f"layer0_in_degree must be in 0..2*m = 0..{2 * self.m}, got {self.layer0_in_degree}"
            )


def load_embeddings(directory: str | Path) -> tuple[np.ndarray, dict]:
    """Verifies the embeddings artifact and memory-maps e_v.

    Returns:
      (float32 [N, D] read-only memory map, the artifact's meta).

    Raises:
      ArtifactError: missing, damaged or malformed embeddings.
    """
    directory = Path(directory)
    meta = artifacts.read_meta(directory, "embeddings")
    try:
        vectors = np.load(directory / EMBEDDINGS_FILE, mmap_mode="r", allow_pickle=False)
        item_ids = np.load(directory / ITEM_IDS_FILE, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{directory} holds unreadable embeddings ({e}); re-run train") from e
    if vectors.ndim != 2 or vectors.dtype != np.float32 or len(vectors) == 0 or vectors.shape[1] == 0:
        raise ArtifactError(
            f"{directory / EMBEDDINGS_FILE} must be a non-empty float32 [N, D] array, "
            f"got {vectors.dtype} {vectors.shape}; re-run train"
        )
    if item_ids.shape != (len(vectors),):
        raise ArtifactError(
            f"{directory}: {len(item_ids)} item ids for {len(vectors)} embeddings; re-run train"
        )
    dim = meta.get("params", {}).get("dim")
    if dim is not None and dim != vectors.shape[1]:
        raise ArtifactError(
            f"{directory}: meta says dim {dim}, the array has {vectors.shape[1]}; re-run train"
        )
    if len(vectors) > np.iinfo(np.int32).max:
        raise ArtifactError(f"{len(vectors)} items exceed the int32 labels of the graph format")
    return vectors, meta


def build_hnsw(vectors: np.ndarray, config: BuildConfig, batch: int | None = None):
    """Inserts ``vectors`` (labels 0..N-1) into a new hnswlib index, logging progress.

    Insertion goes in batches only to report progress and check finiteness as the
    memory map is read; one thread gives the same graph as a single ``add_items``.

    Returns:
      The ``hnswlib.Index``.

    Raises:
      ArtifactError: an embedding is NaN or infinite.
    """
    import hnswlib

    n, dim = vectors.shape
    batch = batch or max(10_000, math.ceil(n / 50))
    index = hnswlib.Index(space=SPACE, dim=dim)
    index.init_index(
        max_elements=n, M=config.m, ef_construction=config.ef_construction, random_seed=config.seed
    )
    index.set_num_threads(config.threads)
    started = time.perf_counter()
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        chunk = np.ascontiguousarray(vectors[start:stop], np.float32)
        if not np.isfinite(chunk).all():
            row = start + int(np.flatnonzero(~np.isfinite(chunk).all(axis=1))[0])
            raise ArtifactError(f"embedding of item {row} is not finite; the model diverged, re-run train")
        index.add_items(chunk, np.arange(start, stop), num_threads=config.threads)
        elapsed = time.perf_counter() - started
        logger.info(
            "inserted %d/%d items (%.0f%%) in %.0f s, %.0f items/s, about %.0f s left",
            stop,
            n,
            100 * stop / n,
            elapsed,
            stop / elapsed,
            elapsed * (n - stop) / stop,
        )
    return index


def extract_graph(index) -> Graph:
    """Reads every layer of ``index`` (labels, not internal ids) through its pickle state."""
    # The state is a copy of hnswlib's memory (about 4 * (2M + 1) + 4 * dim + 8 bytes per
    # item for layer 0); it is dropped on return, before the caller frees the index.
    return graph_from_state(index.__getstate__()[0])


def _ordered_union(first: np.ndarray, then: np.ndarray, width: int) -> np.ndarray:
    """Per row: the labels of ``first``, then those of ``then`` not seen yet, cut to ``width``.

    Both are int [rows, *] padded with -1; the result is int32 [rows, width], -1 padded.
    """
    cand = np.concatenate([first, then], axis=1).astype(np.int64)
    key = np.where(cand < 0, np.iinfo(np.int64).max, cand)
    order = np.argsort(key, axis=1, kind="stable")  # equal labels keep their column order
    sorted_key = np.take_along_axis(key, order, axis=1)
    repeat = np.zeros_like(sorted_key, bool)
    repeat[:, 1:] = sorted_key[:, 1:] == sorted_key[:, :-1]
    drop = np.zeros_like(repeat)
    np.put_along_axis(drop, order, repeat, axis=1)
    cand[drop] = -1
    keep = np.argsort(cand < 0, axis=1, kind="stable")  # valid labels first, in their order
    return np.take_along_axis(cand, keep, axis=1)[:, :width].astype(np.int32)


def fill_layer0(graph: Graph, index, vectors: np.ndarray, degree: int, threads: int, chunk: int = 100_000):
    """Tops every layer-0 list up to ``degree`` links with the node's nearest neighbours.

    hnswlib's neighbour selection drops a candidate that lies closer to an already kept
    neighbour than to the node. On clustered e_v that leaves most nodes with a handful
    of links (mean 11 of 64 at 1.37M items), which suits greedy l2 search but starves a
    walk guided by a different function, the neural scorer: it needs more ways out of
    each node. Each node keeps hnswlib's links, in their order, followed by its nearest
    neighbours (``knn_query``, ef = max(2 * degree, 64)) that are not links yet. Upper
    layers are unchanged.

    Returns:
      (the graph with the new layer 0, number of links added).
    """
    n = graph.num_items
    k = min(degree + 1, n)
    index.set_ef(max(2 * degree, 64))
    old = graph.neighbors[0]
    width = max(degree, old.shape[1])
    rows = []
    started = time.perf_counter()
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        labels, _ = index.knn_query(
            np.ascontiguousarray(vectors[start:stop], np.float32), k=k, num_threads=threads
        )
        labels = labels.astype(np.int64)
        labels[labels == np.arange(start, stop)[:, None]] = -1  # a node is not its own neighbour
        merged = _ordered_union(old[start:stop], labels, width)
        # Nodes with at least `degree` links keep exactly hnswlib's list; the others stop at `degree`.
        have = (old[start:stop] >= 0).sum(axis=1)
        merged[:, degree:] = np.where((have >= degree)[:, None], _pad(old[start:stop], width)[:, degree:], -1)
        rows.append(merged)
        logger.info("layer-0 fill: %d/%d nodes in %.0f s", stop, n, time.perf_counter() - started)
    neighbors = np.concatenate(rows)
    added = int((neighbors >= 0).sum() - (old >= 0).sum())
    filled = dataclasses.replace(graph, neighbors=(neighbors, *graph.neighbors[1:]))
    filled.validate()
    return filled, added


def add_in_links(neighbors: np.ndarray, min_in: int, cap: int) -> tuple[np.ndarray, int]:
    """Gives layer-0 nodes with fewer than ``min_in`` in-links more, by reverse links.

    A walk reaches a node only through a link that points to it. Under l2 the nodes on
    the rim of a cluster (large ||e_v||, where a scorer's top items often lie) are
    rarely anyone's nearest neighbour, so they have few in-links. Each such node u is
    appended to the lists of its own neighbours v, in u's list order, until it has
    ``min_in`` in-links; a v that already links to u or already holds ``cap`` links is
    skipped. Existing lists keep their order; links are only appended.

    Args:
      neighbors: int32 [N, d] layer-0 lists (row = label), -1 padded.
      min_in: the in-degree to reach where room allows.
      cap: most links per list (2M, hnswlib's layer-0 limit).
    Returns:
      (int32 [N, d'] lists, d' <= cap, -1 padded; number of links added).
    """
    n, width = neighbors.shape
    out = _pad(neighbors, max(cap, width))
    fill = (out >= 0).sum(axis=1)
    need = np.maximum(min_in - np.bincount(out[out >= 0], minlength=n), 0)
    added = 0
    for j in range(width):  # u's j-th neighbour gets a link back to u
        u = np.flatnonzero(need > 0)
        v = neighbors[u, j].astype(np.int64)
        keep = v >= 0
        u, v = u[keep], v[keep]
        keep = (fill[v] < cap) & ~(out[v] == u[:, None]).any(axis=1)
        u, v = u[keep], v[keep]
        if not len(u):
            continue
        order = np.argsort(v, kind="stable")  # several u may append to one v in a pass
        u, v = u[order], v[order]
        first = np.r_[True, v[1:] != v[:-1]]
        rank = np.arange(len(v)) - np.maximum.accumulate(np.where(first, np.arange(len(v)), 0))
        slot = fill[v] + rank
        keep = slot < cap
        u, v, slot = u[keep], v[keep], slot[keep]
        out[v, slot] = u
        fill += np.bincount(v, minlength=n)
        need[u] -= 1
        added += len(u)
    return out[:, : max(1, int(fill.max()))].astype(np.int32), added


def _pad(a: np.ndarray, width: int) -> np.ndarray:
    return np.pad(a, [(0, 0), (0, max(0, width - a.shape[1]))], constant_values=-1)[:, :width]


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def log_layers(stats: list[dict], m: int, filled: bool = False) -> None:
    """Logs each layer's size and degree against its capacity (2M on layer 0, M above)."""
    for s in stats:
        capacity = 2 * m if s["layer"] == 0 else m
        logger.info(
            "layer %d: %d nodes, mean degree %.2f of %d allowed (%.0f%%), max %d, "
            "in-links median %g, %d without any",
            s["layer"],
            s["nodes"],
            s["mean_degree"],
            capacity,
            100 * s["mean_degree"] / capacity,
            s["max_degree"],
            s["median_in_degree"],
            s["no_in_links"],
        )
    if stats and stats[0]["mean_degree"] < 0.5 * 2 * m and stats[0]["nodes"] > 2 * m and not filled:
        logger.info(
            "layer 0 fills under half of its %d link slots: hnswlib's neighbour-selection heuristic "
            "drops a link when a closer neighbour already covers its direction, which dense clusters "
            "make common; each expansion of layer 0 offers that many fewer candidates (see --layer0-degree)",
            2 * m,
        )


def build_index(workdir: str | Path, config: BuildConfig) -> dict:
    """Builds ``workdir/index`` from ``workdir/embeddings``.

    The graph is built and extracted in memory first; the directory is written
    atomically afterwards, so a failure leaves any previous index untouched.

    Returns:
      The written ``meta.json`` content.

    Raises:
      ArtifactError: the embeddings are missing, damaged or not finite.
    """
    workdir = Path(workdir)
    vectors, emb_meta = load_embeddings(workdir / "embeddings")
    n, dim = vectors.shape
    logger.info(
        "building an HNSW graph over %d items of dim %d (M=%d, ef_construction=%d, %d threads, seed %d)",
        n,
        dim,
        config.m,
        config.ef_construction,
        config.threads,
        config.seed,
    )
    started = time.perf_counter()
    index = build_hnsw(vectors, config)
    build_seconds = time.perf_counter() - started

    started = time.perf_counter()
    graph = extract_graph(index)
    extract_seconds = time.perf_counter() - started
    logger.info("built in %.1f s, layers extracted in %.1f s", build_seconds, extract_seconds)
    hnsw_stats = graph.layer_stats()
    fill_seconds, added = 0.0, 0
    if config.layer0_degree:
        started = time.perf_counter()
        graph, added = fill_layer0(graph, index, vectors, config.layer0_degree, config.threads)
        fill_seconds = time.perf_counter() - started
        logger.info(
            "layer 0 (hnswlib: mean degree %.2f) topped up to %d links per node with nearest "
            "neighbours: %d links added in %.1f s",
            hnsw_stats[0]["mean_degree"],
            config.layer0_degree,
            added,
            fill_seconds,
        )
    del index, vectors  # free hnswlib's memory before writing
    gc.collect()
    in_added = 0
    if config.layer0_in_degree:
        started = time.perf_counter()
        low_before = int((graph.in_degrees(0) < config.layer0_in_degree).sum())
        layer0, in_added = add_in_links(graph.neighbors[0], config.layer0_in_degree, 2 * config.m)
        graph = dataclasses.replace(graph, neighbors=(layer0, *graph.neighbors[1:]))
        graph.validate()
        in_seconds = time.perf_counter() - started
        logger.info(
            "layer 0: %d reverse links added in %.1f s; nodes with fewer than %d in-links: %d -> %d",
            in_added,
            in_seconds,
            config.layer0_in_degree,
            low_before,
            int((graph.in_degrees(0) < config.layer0_in_degree).sum()),
        )
        fill_seconds += in_seconds
    stats = graph.layer_stats()
    log_layers(stats, config.m, filled=bool(config.layer0_degree))

    params = {
        "m": config.m,
        "ef_construction": config.ef_construction,
        "threads": config.threads,
        "seed": config.seed,
        "layer0_degree": config.layer0_degree,
        "layer0_in_degree": config.layer0_in_degree,
        "space": SPACE,
        "dim": dim,
    }
    meta = artifacts.provenance(KIND, params, inputs={"embeddings_digest": artifacts.digest(emb_meta)})
    meta.update(
        {
            "num_items": n,
            "max_level": graph.max_level,
            "entry_point": graph.entry_point,
            "layers": stats,
            "build_seconds": round(build_seconds, 2),
            "extract_seconds": round(extract_seconds, 2),
            "layer0_fill_seconds": round(fill_seconds, 2),
            "layer0_links_added": added,
            "layer0_in_links_added": in_added,
            "hnswlib_layer0_mean_degree": hnsw_stats[0]["mean_degree"],
            "peak_rss_mib": peak_rss_mib(),
            "reproducible": config.threads == 1,
        }
    )
    with artifacts.atomic_dir(workdir / KIND) as tmp:
        save_graph(graph, tmp)
        meta = artifacts.write_meta(tmp, meta)
    logger.info("wrote %s (peak RSS %.0f MiB)", workdir / KIND, meta["peak_rss_mib"])
    return meta
