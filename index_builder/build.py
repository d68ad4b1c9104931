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

from index_builder.hnsw_state import graph_from_state
from index_builder.refine import add_in_links, cover_layer, fill_layer0, sparse_items
from nann_common import artifacts
from nann_common.errors import ArtifactError
from nann_common.graph import KIND, Graph, save_graph, start_layer

logger = logging.getLogger("index_builder")

SPACE = "l2"
EMBEDDINGS_FILE = "item_embeddings.npy"
ITEM_IDS_FILE = "item_ids.npy"
DEFAULT_LAYER0_DEGREE = 16
DEFAULT_LAYER0_IN_DEGREE = 8
# cover_layer tops up the start layer (nann_common.graph.start_layer: the exporter starts the walk
# there), by default to N / COVER_SHARE nodes and at least COVER_MIN (more than any default ef of
# the start layer, so that the exporter can start there) where the layer below has four times
# that many. It samples every item but the SPARSE_SHARE farthest from their DENSITY_K-th nearest
# neighbour.
COVER_SHARE = 200
COVER_MIN = 400
DENSITY_K = 8
SPARSE_SHARE = 0.01
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
      start_nodes: the start layer (the highest with at least N / 2000 nodes) is topped up to
        this many nodes by farthest-point sampling of all items but the sparsest 1%; 0 keeps
        hnswlib's levels; None: N / 200, at least 400 where the layer below holds 1,600 or more. See
        :func:`cover_layer`.
    """

    m: int = 32
    ef_construction: int = 40
    threads: int = 1
    seed: int = 0
    layer0_degree: int | None = None
    layer0_in_degree: int | None = None
    start_nodes: int | None = None

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
        if self.start_nodes is not None and self.start_nodes < 0:
            raise ValueError(f"start_nodes must be >= 0, got {self.start_nodes}")


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
        max_elements=n, M=config.m, ef_construction=config.ef_construction, random_seed=config.seed + 1
    )  # hnswlib's level generator (std::minstd_rand0) takes seed 0 as 1: shift so every seed differs
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
    fill_seconds, added, kth = 0.0, 0, None
    layer = start_layer([len(nodes) for nodes in graph.nodes], n)
    start_nodes = config.start_nodes
    if start_nodes is None:  # a quarter of the layer below at most, so small graphs keep their shape
        start_nodes = max(round(n / COVER_SHARE), min(COVER_MIN, len(graph.nodes[max(layer - 1, 0)]) // 4))
    covering = bool(layer) and start_nodes > len(graph.nodes[layer])
    if config.layer0_degree or covering:
        started = time.perf_counter()
        graph, added, kth = fill_layer0(
            graph, index, vectors, config.layer0_degree, config.threads, density_k=DENSITY_K
        )
        fill_seconds = time.perf_counter() - started
    if config.layer0_degree:
        logger.info(
            "layer 0 (hnswlib: mean degree %.2f) topped up to %d links per node with nearest "
            "neighbours: %d links added in %.1f s",
            hnsw_stats[0]["mean_degree"],
            config.layer0_degree,
            added,
            fill_seconds,
        )
    del index  # free hnswlib's memory
    gc.collect()
    in_added, in_seconds = 0, 0.0
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
    cover = {"layer": layer, "hnswlib_nodes": len(graph.nodes[layer]), "seconds": 0.0, "radius": None}
    if not config.layer0_degree:  # the nearest-neighbour pass only measured distances for the cover
        cover["neighbour_seconds"], fill_seconds = round(fill_seconds, 2), 0.0
    if covering:
        started = time.perf_counter()
        sparse = sparse_items(kth, SPARSE_SHARE)
        graph, cover["radius"] = cover_layer(graph, vectors, layer, start_nodes, config.m, 0, ~sparse)
        cover["seconds"] = round(time.perf_counter() - started, 2)
        cover.update(sparse_items_left_out=int(sparse.sum()), density_k=DENSITY_K)
        logger.info(
            "start layer %d: %d -> %d nodes by farthest-point sampling of all items (but the %d "
            "farthest from their %dth nearest neighbour) in %.1f s; every other item now lies within "
            "%.3g (l2) of one",
            layer,
            cover["hnswlib_nodes"],
            len(graph.nodes[layer]),
            cover["sparse_items_left_out"],
            DENSITY_K,
            cover["seconds"],
            cover["radius"],
        )
    cover["nodes"] = len(graph.nodes[layer])
    del vectors
    stats = graph.layer_stats()
    log_layers(stats, config.m, filled=bool(config.layer0_degree))

    params = {
        "m": config.m,
        "ef_construction": config.ef_construction,
        "threads": config.threads,
        "seed": config.seed,
        "layer0_degree": config.layer0_degree,
        "layer0_in_degree": config.layer0_in_degree,
        "start_nodes": start_nodes,
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
            "layer0_in_links_seconds": round(in_seconds, 2),
            "start_layer_cover": cover,
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
