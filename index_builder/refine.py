"""Graph refinements after the hnswlib build, for a walk guided by the neural scorer.

hnswlib builds a graph for greedy l2 search. Beam-retrieval walks it with a
different function, the scorer s_u(e_v), which needs three things l2 search
does not: more ways out of each node (:func:`fill_layer0`), ways into the nodes
on the rim of a cluster (:func:`add_in_links`), and a start layer that has a
node near every item (:func:`cover_layer`). Each step only adds links or
nodes; hnswlib's own links keep their place at the head of every list.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np

from nann_common.graph import Graph

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


def fill_layer0(
    graph: Graph,
    index,
    vectors: np.ndarray,
    degree: int,
    threads: int,
    chunk: int = 100_000,
    density_k: int = 8,
):
    """Tops every layer-0 list up to ``degree`` links with the node's nearest neighbours.

    hnswlib's neighbour selection drops a candidate that lies closer to an already kept
    neighbour than to the node. On clustered e_v that leaves most nodes with a handful
    of links (mean 11 of 64 at 1.37M items), which suits greedy l2 search but starves a
    walk guided by a different function, the neural scorer: it needs more ways out of
    each node. Each node keeps hnswlib's links, in their order, followed by its nearest
    neighbours (``knn_query``, ef = max(2 * degree, 64)) that are not links yet. Upper
    layers are unchanged. ``degree`` 0 changes no list and only measures the distances.

    Returns:
      (the graph with the new layer 0, number of links added, float32 [N] l2 distance
      from each item to its ``density_k``-th nearest neighbour: see :func:`sparse_items`).
    """
    n = graph.num_items
    k = min(max(degree, density_k) + 1, n)
    index.set_ef(max(2 * k, 64))
    old = graph.neighbors[0]
    width = max(degree, old.shape[1])
    rows, kth = [], np.zeros(n, np.float32)
    started = time.perf_counter()
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        labels, dist = index.knn_query(
            np.ascontiguousarray(vectors[start:stop], np.float32), k=k, num_threads=threads
        )
        kth[start:stop] = np.sqrt(np.maximum(dist[:, min(density_k, k - 1)], 0))  # column 0 is the item
        if degree:
            labels = labels[:, : degree + 1].astype(np.int64)
            labels[labels == np.arange(start, stop)[:, None]] = -1  # a node is not its own neighbour
            merged = _ordered_union(old[start:stop], labels, width)
            # Nodes with at least `degree` links keep exactly hnswlib's list; the others stop at `degree`.
            have = (old[start:stop] >= 0).sum(axis=1)
            merged[:, degree:] = np.where(
                (have >= degree)[:, None], _pad(old[start:stop], width)[:, degree:], -1
            )
            rows.append(merged)
        logger.info(
            "%s: %d/%d nodes in %.0f s",
            "layer-0 fill" if degree else "nearest neighbours",
            stop,
            n,
            time.perf_counter() - started,
        )
    if not degree:
        return graph, 0, kth
    neighbors = np.concatenate(rows)
    added = int((neighbors >= 0).sum() - (old >= 0).sum())
    filled = dataclasses.replace(graph, neighbors=(neighbors, *graph.neighbors[1:]))
    filled.validate()
    return filled, added, kth


def sparse_items(kth: np.ndarray, share: float) -> np.ndarray:
    """bool [N]: the ``share`` of items farthest from their k-th nearest neighbour.

    The start-layer cover (:func:`cover_layer`) should put start nodes in groups of
    items, not on stray ones: farthest-point sampling otherwise spends its first picks
    on outliers, which the scorer may rate high for many users and which lead nowhere,
    so they crowd a user's true region out of the start beam.
    """
    if share <= 0 or not len(kth):
        return np.zeros(len(kth), bool)
    return kth > np.quantile(kth, 1.0 - share)


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


def _sq_dist_to_nearest(
    x: np.ndarray, centres: np.ndarray, rows: int = 65536, cols: int = 1024, xx: np.ndarray | None = None
) -> np.ndarray:
    """Squared l2 distance from each row of ``x`` to its nearest row of ``centres`` (blocked).

    ``xx``: the rows' squared norms, if already known.
    """
    best = np.full(len(x), np.inf, np.float32)
    cc = (centres * centres).sum(axis=1)
    for r in range(0, len(x), rows):
        xr = x[r : r + rows]
        nr = (xr * xr).sum(axis=1) if xx is None else xx[r : r + rows]
        for c in range(0, len(centres), cols):
            d = nr[:, None] - 2 * xr @ centres[c : c + cols].T + cc[None, c : c + cols]
            best[r : r + rows] = np.minimum(best[r : r + rows], np.maximum(d.min(axis=1), 0))
    return best


def farthest_points(
    x: np.ndarray, dist: np.ndarray, count: int, batch: int = 64, active: int = 16384
) -> np.ndarray:
    """Farthest-point sampling: ``count`` rows of ``x``, each the farthest from all before it.

    ``dist`` holds each row's squared distance to the centres chosen so far (0 for
    centres); it is updated in place. Exact, yet cheap at millions of rows, for two reasons:

    - Only the ``active`` farthest rows are searched and updated, until the farthest of
      them falls below the nearest row left out (the others can only be nearer). Then
      the new centres are applied to every row in one matrix product and the active
      rows are drawn again.
    - Candidates are taken in batches in order of distance: the j-th is the next
      farthest point as long as it lies at least its own distance from each candidate
      taken before it in the batch. The first that does not ends the batch.

    Returns:
      int64 row numbers, in the order chosen (fewer than ``count`` if every row is a centre).
    """
    chosen: list[int] = []
    applied = 0  # chosen[:applied] are reflected in every row of dist
    xx = (x * x).sum(axis=1)
    while len(chosen) < count:
        if applied < len(chosen):
            np.minimum(dist, _sq_dist_to_nearest(x, x[chosen[applied:]], xx=xx), out=dist)
            dist[chosen[applied:]] = 0.0  # exactly, whatever the rounding
            applied = len(chosen)
        size = min(active, len(dist))
        rows = np.argpartition(-dist, size - 1)[:size]
        floor = float(dist[rows].min()) if size < len(dist) else 0.0  # no row left out is farther
        d, xa = dist[rows], x[rows]
        before = len(chosen)
        while len(chosen) < count:
            top = min(batch, size)
            cand = np.argpartition(-d, top - 1)[:top]
            cand = cand[np.argsort(-d[cand], kind="stable")]
            c = xa[cand]
            pair = (c * c).sum(axis=1)[:, None] - 2 * c @ c.T + (c * c).sum(axis=1)[None]
            taken: list[int] = []
            for j in range(top):
                if len(chosen) + len(taken) == count or d[cand[j]] <= 0 or d[cand[j]] < floor:
                    break
                if taken and pair[j, taken].min() < d[cand[j]]:
                    break
                taken.append(j)
            if not taken:
                break
            new = cand[taken]
            chosen.extend(rows[new].tolist())
            d[new] = 0.0
            np.minimum(d, _sq_dist_to_nearest(xa, xa[new], xx=xx[rows]), out=d)
            d[new] = 0.0
        if len(chosen) == before:
            break  # right after a full update nothing was taken: every row is a centre
    if applied < len(chosen):
        np.minimum(dist, _sq_dist_to_nearest(x, x[chosen[applied:]], xx=xx), out=dist)
        dist[chosen[applied:]] = 0.0
    return np.asarray(chosen, np.int64)


def cover_layer(
    graph: Graph,
    vectors: np.ndarray,
    layer: int,
    size: int,
    m: int,
    source: int = 0,
    eligible: np.ndarray | None = None,
) -> tuple[Graph, float]:
    """Raises nodes of layer ``source`` into ``layer`` until it holds ``size`` nodes.

    Beam-retrieval scores its start layer exhaustively and walks down from the best
    of it. A walk only moves through nodes that score well, so a group of items that
    no start node lies in, and that only low-scoring nodes link to (a category of its
    own, far from the others in e_v), is never reached, however well its items score:
    that user then loses most of the top k. hnswlib draws levels at random, so at
    1.3M items a category of 50 items has no layer-1 node one time in five, and about
    N/1000 start nodes leave most such groups without one. This adds nodes by
    farthest-point sampling of layer ``source`` (by default every item: each new node
    is the item farthest from every node already in ``layer``), which covers every
    region of e_v before it adds a second node to any. A new node joins every layer
    from ``source + 1`` up to ``layer``; on each it links to its m // 2 nearest nodes
    of that layer, and every node of a layer that grew, old or new, with fewer than
    m // 2 in-links gets reverse links (:func:`add_in_links`) where lists have room.

    ``eligible`` (bool [N], None: every item) limits the sampling to some items: the
    others are neither promoted nor counted as uncovered.

    Returns:
      (the graph, the covering radius: the largest l2 distance from an eligible node of
      layer ``source`` to its nearest node of ``layer``).
    """
    if not 0 <= source < layer <= graph.max_level:
        raise ValueError(f"need 0 <= source < layer <= {graph.max_level}, got source {source}, layer {layer}")
    have, pool = graph.nodes[layer], graph.nodes[source]
    if eligible is not None:
        pool = pool[eligible[pool]]
    x = np.ascontiguousarray(vectors[pool], np.float32)
    dist = _sq_dist_to_nearest(x, np.ascontiguousarray(vectors[have], np.float32))
    dist[np.isin(pool, have)] = 0.0  # exactly, whatever the rounding of the expanded distance
    chosen = farthest_points(x, dist, max(0, size - len(have)))
    radius = float(np.sqrt(dist.max()))
    del x
    if not len(chosen):
        return graph, radius
    new = pool[chosen]
    levels = graph.levels.copy()
    levels[new] = layer
    nodes, neighbors = list(graph.nodes), list(graph.neighbors)
    for lay in range(source + 1, layer + 1):
        old = graph.nodes[lay]
        grown = np.flatnonzero(levels >= lay).astype(np.int32)
        added = np.setdiff1d(grown, old)
        if not len(added):
            continue
        # New rows: the m // 2 nearest nodes of the grown layer (exact; upper layers are small).
        degree = max(1, min(m // 2, len(grown) - 1))
        members = np.ascontiguousarray(vectors[grown], np.float32)
        nm = (members * members).sum(axis=1)
        rows = np.full((len(grown), max(degree, neighbors[lay].shape[1])), -1, np.int32)
        rows[np.searchsorted(grown, old), : neighbors[lay].shape[1]] = neighbors[lay]
        for start in range(0, len(added), 1024):
            part = added[start : start + 1024]
            q = np.ascontiguousarray(vectors[part], np.float32)
            d = (q * q).sum(axis=1)[:, None] - 2 * q @ members.T + nm[None]
            d[np.arange(len(part)), np.searchsorted(grown, part)] = np.inf  # not its own neighbour
            nearest = np.argpartition(d, degree - 1, axis=1)[:, :degree]  # degree < len(grown)
            nearest = np.take_along_axis(nearest, np.argsort(np.take_along_axis(d, nearest, 1), 1), 1)
            rows[np.searchsorted(grown, part)] = _pad(grown[nearest], rows.shape[1])
        rows, _ = add_in_links(rows, degree, m, grown)
        nodes[lay], neighbors[lay] = grown, rows
    covered = dataclasses.replace(graph, levels=levels, nodes=tuple(nodes), neighbors=tuple(neighbors))
    covered.validate()
    return covered, radius


def _pad(a: np.ndarray, width: int) -> np.ndarray:
    return np.pad(a, [(0, 0), (0, max(0, width - a.shape[1]))], constant_values=-1)[:, :width]
