"""A numpy replay of Beam-retrieval (Algorithms 1 + 2) over exact scores, for graph design.

It walks exactly as :func:`walk.search.beam_retrieval` does (start layer scored
whole, its best ef seed the walk, T rounds per layer expanding the newest beam members, early
stop when none enters); a test checks it against the SavedModel. ``benchmarks/walk_replay.py``
uses it to compare graph builds in seconds instead of an export per graph.
"""

from __future__ import annotations

import sys

import numpy as np

# A disallowed item ranks below every allowed one in a filtered beam: its score minus this, in
# float64 (every float32 score stays apart). The scorer's logits are far smaller. walk.search
# uses the same constant.
FILTER_OFFSET = 1e4


def replay_user(
    graph,
    scores: np.ndarray,
    ef: list[int],
    steps: list[int],
    start_layer: int,
    k: int,
    start_nodes: np.ndarray | None = None,
    seeds: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
):
    """Algorithm 1 + 2 for one user over exact ``scores`` [N]: (top-k dense ids, items scored).

    ``ef`` and ``steps`` run top-down from ``start_layer`` to layer 0, as the export's.
    ``start_nodes`` replaces the start layer's nodes; ``seeds`` (dense ids, -1 ignored) join the
    entry points of layer 0, and with ``start_layer`` 0 are its only ones, as
    :func:`walk.search.beam_retrieval`'s arguments of the same names.

    ``allowed`` (bool [N]) is a filter, as the export's: every item may still be walked through,
    but each beam ranks allowed items before the others (by score within each), and the answer
    is the best ``k`` allowed items among all the walk scored: fewer when it met fewer.
    """
    key, beam, scored, met = replay_walk(graph, scores, ef, steps, start_layer, start_nodes, seeds, allowed)
    if allowed is None:
        return beam[np.argsort(key[beam], kind="stable")[:k]], scored
    pool = met[allowed[met]]
    return pool[np.argsort(key[pool], kind="stable")[:k]], scored


def replay_walk(
    graph,
    scores: np.ndarray,
    ef: list[int],
    steps: list[int],
    start_layer: int,
    start_nodes: np.ndarray | None = None,
    seeds: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
    pass_through: bool = True,
):
    """The walk of :func:`replay_user` -> (the beams' sort keys [N], layer 0's beam, items scored,
    every item scored, unique). ``pass_through`` False walks a filter as before pass-through: a
    disallowed neighbour is scored (and walked when the beam has room)."""
    key = _ranking(scores, allowed)
    seeds = None if seeds is None else np.unique(seeds[seeds >= 0])
    if start_layer == 0 and seeds is not None:
        beam, scored, layers = seeds, len(seeds), [0]
        met = [seeds]
    else:
        start = graph.nodes[start_layer] if start_nodes is None else start_nodes
        scored, layers = len(start), range(start_layer - 1, -1, -1)
        beam = start[np.argsort(key[start], kind="stable")[: ef[0]]]
        met = [start]
    for layer in layers:
        if layer == 0 and seeds is not None and start_layer:
            new = np.setdiff1d(seeds, beam)
            beam, scored = np.concatenate([beam, new]), scored + len(new)
            met.append(new)
        top_down = start_layer - layer
        through = allowed if layer == 0 and pass_through else None
        beam, walked, new = walk_layer(graph, layer, key, beam, ef[top_down], steps[top_down], through)
        scored += walked
        met.append(new)
    return key, beam, scored, np.unique(np.concatenate(met))


def _ranking(scores: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """Sort keys (ascending = better): -score, and with a filter :func:`walk.search.Filter.rank`'s
    key (every allowed item first), in float64 as the SavedModel computes it."""
    if allowed is None:
        return -scores.astype(np.float32)
    scores = scores.astype(np.float32).astype(np.float64)
    return -np.where(allowed, scores, scores - FILTER_OFFSET)


def walk_layer(graph, layer: int, key, entry, width: int, rounds: int, allowed: np.ndarray | None = None):
    """Algorithm 2 on one layer from ``entry`` (already scored; every one is expanded first):
    at most ``rounds`` expansions of the newest beam members, ranked by ``key`` (ascending) ->
    (beam, items scored in the walk, those items).

    With ``allowed`` (bool [N], a filter's items) a disallowed neighbour is passed through, not
    scored: its own allowed neighbours are (each disallowed item once per walk), as
    :func:`walk.search.search_layer` does on a filtered layer 0.
    """
    visited = np.zeros(len(key), bool)
    visited[entry] = True
    cand = entry
    rows = graph.positions(layer) if layer else None
    table = graph.neighbors[layer]
    beam = entry[np.argsort(key[entry], kind="stable")[:width]]
    scored, met = 0, []
    for _ in range(rounds):
        nb = table[cand if rows is None else rows[cand]].ravel()
        nb = nb[nb >= 0]
        if rows is not None:
            nb = nb[rows[nb] >= 0]
        if allowed is not None:
            through = np.unique(nb[~allowed[nb] & ~visited[nb]])
            visited[through] = True
            second = table[through].ravel()
            second = second[second >= 0]
            nb = np.concatenate([nb[allowed[nb]], second[allowed[second]]])
        new = np.unique(nb[~visited[nb]])
        if not len(new):
            break
        visited[new] = True
        scored += len(new)
        met.append(new)
        pool = np.concatenate([beam, new])
        keep = pool[np.argsort(key[pool], kind="stable")[:width]]
        cand = np.intersect1d(keep, new)
        beam = keep
        if not len(cand):
            break
    return beam, scored, np.concatenate(met) if met else entry[:0]


def exact_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Each row's k best item ids [users, k], ties by id: the exhaustive answer over ``scores``.

    Sorted row by row: one argsort of [users, N] would hold users x N int64 (4 GB for 128 users
    at 3.9M items).
    """
    return np.stack([np.argsort(-row, kind="stable")[:k] for row in scores])


def exact_scores(evaluation, chunk: int = 65536, progress: bool = True) -> np.ndarray:
    """float32 [users, N]: every item's score for an :class:`Evaluation`'s users."""
    import tensorflow as tf

    model, item_e = evaluation.model, tf.constant(evaluation.item_e)
    out = np.empty((evaluation.num_users, len(evaluation.item_e)), np.float32)
    for u in range(evaluation.num_users):
        hist_e, mask = model.behaviour_embeddings(tf.constant(evaluation.histories[u : u + 1], tf.int32))
        state = model.user_state(hist_e, mask)
        for s in range(0, out.shape[1], chunk):
            out[u, s : s + chunk] = model.score(state, item_e[None, s : s + chunk]).numpy()[0]
        every = max(1, evaluation.num_users // 10)
        if progress and evaluation.num_users > 1 and ((u + 1) % every == 0 or u + 1 == evaluation.num_users):
            print(f"scored user {u + 1}/{evaluation.num_users}", file=sys.stderr, flush=True)
    return out
