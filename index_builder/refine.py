"""Graph refinements after the hnswlib build, for a walk guided by the neural scorer.

hnswlib builds a graph for greedy l2 search. Beam-retrieval walks it with a
different function, the scorer s_u(e_v), which needs three things l2 search
does not: more ways out of each node (:func:`fill_layer0`), ways into the nodes
on the rim of a cluster (:func:`add_in_links`), and a start layer that has a
node in every region of e_v (:func:`cover_layer`). Each step only adds links or
nodes; hnswlib's own links keep their place at the head of every list.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from index_builder.graph import Graph

logger = logging.getLogger("index_builder")


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


def add_in_links(
    neighbors: np.ndarray, min_in: int, cap: int, nodes: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """Gives nodes with fewer than ``min_in`` in-links more, by reverse links.

    A walk reaches a node only through a link that points to it. Under l2 the nodes on
    the rim of a cluster (large ||e_v||, where a scorer's top items often lie) are
    rarely anyone's nearest neighbour, so they have few in-links. Each such node u is
    appended to the lists of its own neighbours v, in u's list order, until it has
    ``min_in`` in-links; a v that already links to u or already holds ``cap`` links is
    skipped. Existing lists keep their order; links are only appended.

    Args:
      neighbors: int32 [n, d] neighbour labels of one layer, -1 padded.
      min_in: the in-degree to reach where room allows.
      cap: most links per list (2M on layer 0, M above).
      nodes: ascending labels of the rows; None: row r is label r (layer 0).
    Returns:
      (int32 [n, d'] lists, d' <= max(cap, d), -1 padded; number of links added).
    """
    n, width = neighbors.shape
    rows_of = (lambda labels: labels) if nodes is None else (lambda labels: np.searchsorted(nodes, labels))
    label_of = (lambda rows: rows) if nodes is None else (lambda rows: nodes[rows])
    out = _pad(neighbors, max(cap, width))
    fill = (out >= 0).sum(axis=1)
    need = np.maximum(min_in - np.bincount(rows_of(out[out >= 0]), minlength=n), 0)
    added = 0
    for j in range(width):  # u's j-th neighbour gets a link back to u
        u = np.flatnonzero(need > 0)
        v = neighbors[u, j].astype(np.int64)
        keep = v >= 0
        u, v = u[keep], rows_of(v[keep])
        keep = (fill[v] < cap) & ~(out[v] == label_of(u)[:, None]).any(axis=1)
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
        out[v, slot] = label_of(u)
        fill += np.bincount(v, minlength=n)
        need[u] -= 1
        added += len(u)
    return out[:, : max(1, int(fill.max()))].astype(np.int32), added


def _sq_dist_to_nearest(x: np.ndarray, centres: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Squared l2 distance from each row of ``x`` to its nearest row of ``centres``."""
    best = np.full(len(x), np.inf, np.float32)
    xx = (x * x).sum(axis=1)
    for start in range(0, len(centres), chunk):
        c = centres[start : start + chunk]
        d = xx[:, None] - 2 * x @ c.T + (c * c).sum(axis=1)[None]
        best = np.minimum(best, np.maximum(d.min(axis=1), 0))
    return best


def cover_layer(graph: Graph, vectors: np.ndarray, layer: int, size: int, m: int) -> tuple[Graph, float]:
    """Raises nodes of layer ``layer - 1`` into ``layer`` until it holds ``size`` nodes.

    Beam-retrieval scores its start layer exhaustively and walks down from the best
    of it. A walk only moves through nodes that score well, so a group of items that
    no start node lies in, and that only low-scoring nodes link to (a category of its
    own, far from the others in e_v), is never reached, however well its items score:
    that user then loses most of the top k. hnswlib draws levels at random, so at
    1.3M items about N/1000 start nodes leave most such groups without one. This adds
    nodes by farthest-point sampling of the layer below (each new node is the one
    farthest from every node already in ``layer``), which covers every region of
    e_v before it adds a second node to any. Each new node links to its m // 2
    nearest nodes of ``layer`` and gets reverse links from them where lists have room.

    Returns:
      (the graph, the covering radius: the largest l2 distance from a node of layer
      ``layer - 1`` to its nearest node of ``layer``).
    """
    have, below = graph.nodes[layer], graph.nodes[layer - 1]
    x = np.ascontiguousarray(vectors[below], np.float32)
    dist = _sq_dist_to_nearest(x, np.ascontiguousarray(vectors[have], np.float32))
    member = np.isin(below, have)
    dist[member] = 0.0  # exactly, whatever the rounding of the expanded distance
    chosen = []
    for _ in range(max(0, size - len(have))):
        row = int(np.where(member, -1.0, dist).argmax())
        if member[row]:
            break  # every node of the layer below is in this layer now
        chosen.append(row)
        member[row] = True
        dist = np.minimum(dist, ((x - x[row]) ** 2).sum(axis=1))
        dist[row] = 0.0
    radius = float(np.sqrt(dist.max()))
    if not chosen:
        return graph, radius
    new = below[np.array(chosen)]
    levels = graph.levels.copy()
    levels[new] = layer  # nodes of the layer below that were not in this layer: level layer - 1
    nodes = np.flatnonzero(levels >= layer).astype(np.int32)
    # New rows: the m // 2 nearest nodes of the grown layer (exact; the layer is small).
    degree = max(1, min(m // 2, len(nodes) - 1))
    members = np.ascontiguousarray(vectors[nodes], np.float32)
    nm = (members * members).sum(axis=1)
    rows = np.full((len(nodes), max(degree, graph.neighbors[layer].shape[1])), -1, np.int32)
    rows[np.searchsorted(nodes, have), : graph.neighbors[layer].shape[1]] = graph.neighbors[layer]
    for start in range(0, len(new), 1024):
        part = new[start : start + 1024]
        q = np.ascontiguousarray(vectors[part], np.float32)
        d = (q * q).sum(axis=1)[:, None] - 2 * q @ members.T + nm[None]
        d[np.arange(len(part)), np.searchsorted(nodes, part)] = np.inf  # not its own neighbour
        nearest = np.argsort(d, axis=1)[:, :degree]
        rows[np.searchsorted(nodes, part)] = _pad(nodes[nearest], rows.shape[1])
    rows, _ = add_in_links(rows, degree, m, nodes)
    covered = dataclasses.replace(
        graph,
        levels=levels,
        nodes=(*graph.nodes[:layer], nodes, *graph.nodes[layer + 1 :]),
        neighbors=(*graph.neighbors[:layer], rows, *graph.neighbors[layer + 1 :]),
    )
    covered.validate()
    return covered, radius


def _pad(a: np.ndarray, width: int) -> np.ndarray:
    return np.pad(a, [(0, 0), (0, max(0, width - a.shape[1]))], constant_values=-1)[:, :width]
