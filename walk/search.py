"""The walk: graph search with the neural scorer, in stock TensorFlow ops (no custom kernels).

Two searches over an extracted HNSW graph, batched over users:

* :func:`beam_retrieval`: NANN's Beam-retrieval (DESIGN.md section 2,
  Algorithms 1 + 2). The start layer is scored exhaustively and its top ef
  seed the walk; each lower layer runs a bounded for-loop of T rounds that
  expands the newest beam members, scores their unvisited neighbours and keeps
  the best ef, stopping early when no new candidate enters the beam.
* :func:`hnsw_retrieval`: the original HNSW search (the SL2G baseline): from
  the graph's entry point, greedy search (ef = 1) on the upper layers, then the
  best-first while-loop with ef_0 on layer 0.

Visited marking is a [B, N / 32] bitmap, one bit per item; ``marking="sets"``
uses TensorFlow's raw set ops instead, kept for the Table 1 comparison.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from walk.replay import FILTER_OFFSET

MARKINGS = ("bitmap", "sets")


class GraphTensors(tf.Module):
    """An HNSW graph as variables: per layer the node labels and neighbour lists.

    Args:
      nodes: per layer l, int32 ascending labels present in layer l (layer 0: all items).
      neighbors: per layer l, int32 [len(nodes[l]), max_degree_l] neighbour labels, -1 padded.
      entry_point: label of HNSW's entry point (on the top layer).
    """

    def __init__(self, nodes: list[np.ndarray], neighbors: list[np.ndarray], entry_point: int, name=None):
        super().__init__(name=name)
        num_items = len(nodes[0])
        if not np.array_equal(nodes[0], np.arange(num_items)):
            raise ValueError("layer 0 must hold every item, labels 0..N-1 in order")
        self.num_items = num_items
        self.num_layers = len(nodes)
        self.layer_sizes = [len(n) for n in nodes]
        self.nodes = [
            tf.Variable(np.asarray(n, np.int32), trainable=False, name=f"nodes_{i}")
            for i, n in enumerate(nodes)
        ]
        self.neighbors = [
            tf.Variable(np.asarray(nb, np.int32), trainable=False, name=f"neighbors_{i}")
            for i, nb in enumerate(neighbors)
        ]
        # Row of each label in an upper layer's neighbour table (-1 where absent).
        positions = []
        for i, n in enumerate(nodes[1:], start=1):
            pos = np.full(num_items, -1, np.int32)
            pos[np.asarray(n)] = np.arange(len(n), dtype=np.int32)
            positions.append(tf.Variable(pos, trainable=False, name=f"positions_{i}"))
        self.positions = positions
        self.entry_point = tf.Variable(np.int32(entry_point), trainable=False, name="entry_point")

    def neighbors_of(self, layer: int, ids):
        """Neighbour labels of ids [B, c] (-1 = none) on ``layer`` -> [B, c * degree], -1 padded."""
        valid = ids >= 0
        rows = tf.maximum(ids, 0)
        if layer > 0:
            rows = tf.gather(self.positions[layer - 1], rows)
            valid &= rows >= 0
            rows = tf.maximum(rows, 0)
        nb = tf.gather(self.neighbors[layer], rows)
        nb = tf.where(valid[..., None], nb, -1)
        return tf.reshape(nb, [tf.shape(ids)[0], -1])


def _compact(ids, sentinel):
    """Sorts each row's ids, drops duplicates and -1, and trims to the longest row; -1 padded."""
    x = tf.sort(tf.where(ids < 0, sentinel, ids), axis=1)
    dup = tf.concat([tf.zeros_like(x[:, :1], tf.bool), x[:, 1:] == x[:, :-1]], axis=1)
    x = tf.sort(tf.where(dup, sentinel, x), axis=1)
    width = tf.reduce_max(tf.reduce_sum(tf.cast(x < sentinel, tf.int32), axis=1))
    x = x[:, :width]
    return tf.where(x == sentinel, -1, x)


def _unique_keys(ids, keep, num_items):
    """The distinct (row, id) pairs of ids [B, w] where ``keep``, in first-seen order, as
    int64 keys row * num_items + id (rows ascending)."""
    # tf.where + gather_nd rather than tf.boolean_mask: the same values in 2 ops instead of 13.
    at = tf.where(keep)
    unique, _ = tf.unique(at[:, 0] * num_items + tf.cast(tf.gather_nd(ids, at), tf.int64))
    return unique


def _to_rows(values, row, rows):
    """values with their ascending row numbers -> ([rows, longest row] -1 padded, values per row)."""
    ragged = tf.RaggedTensor.from_value_rowids(values, row, nrows=tf.cast(rows, tf.int64), validate=False)
    return ragged.to_tensor(default_value=-1), tf.cast(ragged.row_lengths(), tf.int32)


def _from_keys(keys, rows, num_items):
    """Keys of :func:`_unique_keys` -> (ids [rows, longest row] -1 padded, ids per row, row, id)."""
    row = keys // num_items
    label = tf.cast(keys % num_items, tf.int32)
    return (*_to_rows(label, row, rows), row, label)


def _distinct(ids, num_items):
    """Each row's distinct ids >= 0, in first-seen order, -1 padded to the longest row.

    tf.unique hashes (linear time) where :func:`_compact` sorts twice; tf.sort runs as
    a full-width TopKV2 on CPU, which was the largest op of a batch-1 query. Rows are
    kept apart by offsetting each row's ids by row * num_items.
    """
    keys = _unique_keys(ids, ids >= 0, num_items)
    return _from_keys(keys, tf.shape(ids)[0], num_items)[0]


def _valid_ids(ids):
    """Each row's ids >= 0, in order, -1 padded to the longest row."""
    at = tf.where(ids >= 0)
    return _to_rows(tf.gather_nd(ids, at), at[:, 0], tf.shape(ids)[0])[0]


class Filter:
    """Which items an answer may hold, row by row.

    Args:
      item_category: int32 [N], each item's dense category.
      category_ok: bool [B, C], the categories a row allows (its allow-list minus its deny-list).
      excluded: int32 [B, E] dense ids a row never returns, ascending, padded with N (E >= 1).
    """

    def __init__(self, item_category, category_ok, excluded):
        self.item_category = item_category
        self.category_ok = category_ok
        self.excluded = excluded

    def allows(self, ids, check_excluded: bool = True):
        """ids [B, w] (-1 = none) -> bool [B, w]: True where the row may return the item (with
        ``check_excluded`` False: where the row allows the item's category)."""
        safe = tf.maximum(ids, 0)
        ok = (ids >= 0) & tf.gather(self.category_ok, tf.gather(self.item_category, safe), batch_dims=1)
        if not check_excluded:
            return ok
        at = tf.minimum(tf.searchsorted(self.excluded, safe), tf.shape(self.excluded)[1] - 1)
        return ok & (tf.gather(self.excluded, at, batch_dims=1) != safe)

    @staticmethod
    def rank(scores, ok):
        """The beam's ranking key: allowed items first, each group by score (float64, so that the
        offset keeps every float32 score apart)."""
        scores = tf.cast(scores, tf.float64)
        return tf.where(ok, scores, scores - FILTER_OFFSET)


class Found:
    """A filtered walk's answer so far: the best k allowed items among all it scored, and how
    many scored items the filter removed."""

    @staticmethod
    def start(ids, scores, ok, k):
        r_ids, r_s = _fit_width(tf.where(ok, ids, -1), tf.where(ok, scores, -np.inf), k)
        removed = tf.reduce_sum(tf.cast((ids >= 0) & ~ok, tf.int32), axis=1)
        return r_ids, r_s, removed

    @staticmethod
    def add(found, ids, scores, ok, k):
        r_ids, r_s, removed = found
        all_ids = tf.concat([r_ids, tf.where(ok, ids, -1)], axis=1)
        all_s = tf.concat([r_s, tf.where(ok, scores, tf.constant(-np.inf, scores.dtype))], axis=1)
        top_s, top = tf.math.top_k(all_s, k=k)
        removed += tf.reduce_sum(tf.cast((ids >= 0) & ~ok, tf.int32), axis=1)
        return tf.gather(all_ids, top, batch_dims=1), top_s, removed


class _Bitmap:
    """Visited marking with a [B, ceil(N / 32)] int32 bitmap: one bit per item.

    A bool mask would hold a byte per item (1.4 MB per user and walked layer at 1.37M items, 124 MB
    at batch 32 and 3.9M items), and every round's scatter copies it; the bitmap is 32x smaller.
    A bit is set by adding its value to its word, which equals OR for ids that are distinct
    within a row and not yet marked: :meth:`visit` marks only such ids.
    """

    def __init__(self, batch, num_items):
        self.num_items = num_items
        self.batch = batch
        self.words = (num_items + 31) // 32

    def init(self, ids):
        visited = tf.zeros([self.batch, self.words], tf.int32)
        return self._mark(visited, _unique_keys(ids, ids >= 0, self.num_items), tf.shape(ids)[0])[2]

    def visit(self, visited, ids):
        """ids [B, w] (-1 = none) -> (the not yet visited ones, each once, -1 padded [B, m]; their
        count per row [B]; visited with them marked). One pass: test, dedupe, mark."""
        safe = tf.maximum(ids, 0)
        rows = tf.shape(ids)[0]
        at = tf.bitwise.right_shift(safe, 5) + tf.range(rows)[:, None] * self.words
        word = tf.gather(tf.reshape(visited, [-1]), at)
        seen = tf.bitwise.bitwise_and(tf.bitwise.right_shift(word, tf.bitwise.bitwise_and(safe, 31)), 1)
        keys = _unique_keys(ids, (ids >= 0) & (seen == 0), self.num_items)
        return self._mark(visited, keys, rows)

    def _mark(self, visited, keys, rows):
        new, counts, row, label = _from_keys(keys, rows, self.num_items)
        at = row * self.words + tf.cast(tf.bitwise.right_shift(label, 5), tf.int64)
        bits = tf.bitwise.left_shift(tf.ones_like(label), tf.bitwise.bitwise_and(label, 31))
        # A segment sum and one add: tensor_scatter_nd_add's per-update path cost 3x as much.
        add = tf.math.unsorted_segment_sum(bits, at, tf.cast(rows, tf.int64) * self.words)
        return new, counts, visited + tf.reshape(add, [rows, self.words])

    def shape(self):
        return tf.TensorShape([None, None])


class _Sets:
    """Visited marking with raw set ops: a [B, V] id list and tf.sets.difference."""

    def __init__(self, batch, num_items):
        self.num_items = num_items

    def init(self, ids):
        return _compact(ids, self.num_items)

    def unvisited(self, visited, ids):
        new = tf.sets.difference(ids, visited)
        return tf.sparse.to_dense(new, default_value=-1)

    def visit(self, visited, ids):
        new = _distinct(self.unvisited(visited, ids), self.num_items)
        counts = tf.reduce_sum(tf.cast(new >= 0, tf.int32), axis=1)
        return new, counts, self.mark(visited, new)

    def mark(self, visited, ids):
        return _compact(tf.concat([visited, ids], axis=1), self.num_items)

    def shape(self):
        return tf.TensorShape([None, None])


def _marker(marking, batch, num_items):
    if marking == "bitmap":
        return _Bitmap(batch, num_items)
    if marking == "sets":
        return _Sets(batch, num_items)
    raise ValueError(f"marking must be one of {MARKINGS}, got {marking!r}")


# Multiples of 64 up to 512, then steps of 2**(1/4) rounded up to 64, up to 2**30.
WIDTH_GRID = np.unique(
    np.concatenate([np.arange(64, 513, 64), np.ceil(2.0 ** (np.arange(36, 121) / 4) / 64) * 64])
).astype(np.int32)


def padded_width(m):
    """The width m candidates are scored at: the next point of :data:`WIDTH_GRID`.

    Multiples of 64 up to 512, then steps of 2**(1/4) rounded up to 64 (at most 27% padding). A graph
    walk scores a different number of candidates every round; oneDNN, TensorFlow's
    CPU kernels for the scorer's matmuls, builds a kernel per new shape, and XLA compiles one, so
    most rounds paid for one (batch 1 at 1.37M items: 32-37 ms unpadded, 23-27 ms padded, in one
    run). On the grid a few dozen shapes cover every walk (the paper's auto-padding). One
    lookup, as the grid is a constant.
    """
    m = tf.reshape(tf.convert_to_tensor(m, tf.int32), [1])
    return tf.gather(WIDTH_GRID, tf.searchsorted(WIDTH_GRID, m, side="left"))[0]


def _score_ids(score_fn, item_e, ids):
    """Scores of ids [B, m] (-1 = none -> -inf), computed at :func:`padded_width`."""
    m = tf.shape(ids)[1]
    padded = tf.pad(ids, [[0, 0], [0, padded_width(m) - m]], constant_values=-1)
    s = score_fn(tf.gather(item_e, tf.maximum(padded, 0)))[:, :m]
    return tf.where(ids >= 0, s, tf.constant(-np.inf, s.dtype))


def _fit_width(ids, scores, width):
    """Keeps the best ``width`` entries of each row, padding with (-1, -inf) if fewer."""
    have = tf.shape(ids)[1]
    pad = tf.maximum(width - have, 0)
    ids = tf.pad(ids, [[0, 0], [0, pad]], constant_values=-1)
    scores = tf.pad(scores, [[0, 0], [0, pad]], constant_values=-np.inf)
    top_s, top = tf.math.top_k(scores, k=width)
    return tf.gather(ids, top, batch_dims=1), top_s


def search_layer(
    graph,
    layer,
    score_fn,
    item_e,
    ep_ids,
    ep_scores,
    ef,
    steps,
    marking="bitmap",
    flt=None,
    found=None,
    k=None,
):
    """Algorithm 2: a bounded beam search on one layer.

    Args:
      graph: :class:`GraphTensors`.
      layer: python int, the layer searched.
      score_fn: candidates e_v [B, m, D] -> scores [B, m].
      item_e: [N, D] e_v of every item.
      ep_ids, ep_scores: [B, w] entry points and their scores (-1 / -inf padded).
      ef: beam width kept on this layer (scalar tensor or int).
      steps: T, the most rounds of neighbourhood expansion (scalar).
      flt, found, k: a filtered walk (a :class:`Filter`, :class:`Found`'s state, its k). The
        beam then ranks by :meth:`Filter.rank` keys (``ep_scores`` are such keys), and every
        allowed item scored joins ``found``. On layer 0 a disallowed neighbour is passed through
        unscored to its own neighbours, of which the allowed ones are scored.
    Returns:
      (ids [B, ef], scores (keys when filtered) [B, ef], items scored per user [B]), and
      ``found`` after the layer when filtered.
    """
    batch = tf.shape(ep_ids)[0]
    marker = _marker(marking, batch, graph.num_items)
    w_ids, w_s = _fit_width(ep_ids, ep_scores, ef)
    visited = marker.init(ep_ids)
    # Algorithm 2 expands every entry point (C = ep), also when there are more than ef of them;
    # W may be cut to ef at once, as no entry point beyond the best ef can enter the beam.
    cand = ep_ids
    scored = tf.zeros([batch], tf.int32)
    extra = [] if flt is None else [found]
    pass_through = flt is not None and layer == 0

    def cond(t, w_ids, w_s, cand, visited, scored, *extra):
        return (t < steps) & tf.reduce_any(cand >= 0)

    def body(t, w_ids, w_s, cand, visited, scored, *extra):
        # Only the beam's newest members are expanded: drop the -1 slots before the gather, so
        # a round's neighbour lists are as wide as the most new members of a row, not ef.
        cand = _valid_ids(cand)
        new, count, visited = marker.visit(visited, graph.neighbors_of(layer, cand))
        if pass_through:
            # A disallowed neighbour is not scored: it is passed through, once, to its own allowed
            # neighbours (ACORN's two-hop expansion), so the walk crosses a disallowed category
            # without spending scores or beam slots on it. The filter is checked on the distinct
            # new neighbours only, not on the padded lists.
            ok = flt.allows(new)
            second = _valid_ids(graph.neighbors_of(layer, _valid_ids(tf.where(ok, -1, new))))
            more, _, visited = marker.visit(visited, tf.where(flt.allows(second), second, -1))
            new = _valid_ids(tf.concat([tf.where(ok, new, -1), more], axis=1))
            count = tf.reduce_sum(tf.cast(new >= 0, tf.int32), axis=1)
        s_new = _score_ids(score_fn, item_e, new)
        scored += count
        if flt is not None:
            # Passed through, the disallowed neighbours were never scored: every new item is allowed.
            ok_new = new >= 0 if pass_through else flt.allows(new)
            extra = [Found.add(extra[0], new, s_new, ok_new, k)]
            s_new = Filter.rank(s_new, ok_new)
        all_ids = tf.concat([w_ids, new], axis=1)
        all_s = tf.concat([w_s, s_new], axis=1)
        top_s, top = tf.math.top_k(all_s, k=ef)
        w_ids = tf.gather(all_ids, top, batch_dims=1)
        # C = W intersect N: the beam members that entered in this round.
        cand = tf.where((top >= ef) & (w_ids >= 0), w_ids, -1)
        return (t + 1, w_ids, top_s, cand, visited, scored, *extra)

    found_shape = (tf.TensorShape([None, None]), tf.TensorShape([None, None]), tf.TensorShape([None]))
    _, w_ids, w_s, _, _, scored, *extra = tf.while_loop(
        cond,
        body,
        [tf.constant(0), w_ids, w_s, cand, visited, scored, *extra],
        shape_invariants=[
            tf.TensorShape([]),
            w_ids.shape,
            w_s.shape,
            tf.TensorShape([None, None]),
            marker.shape(),
            tf.TensorShape([None]),
            *([found_shape] if extra else []),
        ],
    )
    return (w_ids, w_s, scored, *extra)


def _new_seeds(score_fn, item_e, ids, seeds, num_items):
    """The seeds [B, L] (dense ids, -1 padded, repeats allowed) not among entry points ids [B, w],
    each once, scored: (ids [B, L'] -1 padded, scores, items scored per user [B])."""
    seeds = _distinct(seeds, num_items)
    known = tf.reduce_any(seeds[:, :, None] == ids[:, None, :], axis=2)
    new = tf.where(known, -1, seeds)
    scored = tf.reduce_sum(tf.cast(new >= 0, tf.int32), axis=1)
    return new, _score_ids(score_fn, item_e, new), scored


def beam_retrieval(
    graph,
    score_fn,
    item_e,
    batch,
    k,
    ef,
    steps,
    start_layer,
    marking="bitmap",
    start_nodes=None,
    seeds=None,
    start_e=None,
    flt=None,
):
    """Algorithm 1 with the start layer scored exhaustively.

    Args:
      ef, steps: per layer, top-down: entry 0 is the start layer, entry ``start_layer`` is
        layer 0 (python lists or 1-D tensors of length start_layer + 1).
      start_layer: python int; with 0 and ``seeds`` the walk starts from the seeds alone.
      start_nodes: the nodes scored on the start layer (default: all of it).
      seeds: optional [B, L] dense ids (-1 padded), for example the user's own behaviours:
        extra entry points of layer 0, scored and expanded with the beam that reaches it.
      start_e: optional e_v of the start nodes, [n, D] (default: gathered from item_e per call;
        a copy held apart reads 1.7 MB in order instead of 6,826 random rows at 1.37M items).
      flt: optional :class:`Filter`. Every item may still be walked through, but each beam
        ranks the allowed items first, and the answer is the best k allowed items of all the
        walk scored (-1 / -inf padded where it met fewer).
    Returns:
      (ids [B, k] dense item ids, scores [B, k], items scored per user [B]), and with a filter
      also the scored items it removed per user [B].
    """
    seeded_start = start_layer == 0 and seeds is not None
    found = None
    if seeded_start:  # no start layer: the seeds are the only entry points
        ids = tf.zeros([batch, 0], tf.int32)
        scores = tf.zeros([batch, 0], item_e.dtype)
        scored = tf.zeros([batch], tf.int32)
    else:
        nodes = graph.nodes[start_layer] if start_nodes is None else start_nodes
        e = tf.gather(item_e, nodes) if start_e is None else tf.convert_to_tensor(start_e)
        scores = score_fn(tf.broadcast_to(e[None], [batch, tf.shape(nodes)[0], tf.shape(item_e)[1]]))
        ids = tf.broadcast_to(nodes[None], tf.shape(scores))
        scored = tf.fill([batch], tf.shape(nodes)[0])
    if flt is not None:
        ok = flt.allows(ids)
        found = Found.start(ids, scores, ok, k)
        scores = Filter.rank(scores, ok)
    if not seeded_start:
        ids, scores = _fit_width(ids, scores, ef[0])
    for layer in range(0 if seeded_start else start_layer - 1, -1, -1):
        if layer == 0 and seeds is not None:
            new, s_new, n = _new_seeds(score_fn, item_e, ids, seeds, graph.num_items)
            if flt is not None:
                ok = flt.allows(new)
                found = Found.add(found, new, s_new, ok, k)
                s_new = Filter.rank(s_new, ok)
            ids, scores = tf.concat([ids, new], axis=1), tf.concat([scores, s_new], axis=1)
            scored += n
        top_down = start_layer - layer
        out = search_layer(
            graph,
            layer,
            score_fn,
            item_e,
            ids,
            scores,
            ef[top_down],
            steps[top_down],
            marking,
            flt=flt,
            found=found,
            k=k,
        )
        ids, scores, n = out[:3]
        if flt is not None:
            found = out[3]
        scored += n
    if flt is not None:
        return found[0], found[1], scored, found[2]
    top_s, top = tf.math.top_k(scores, k=k)
    return tf.gather(ids, top, batch_dims=1), top_s, scored


EXHAUSTIVE_CHUNK = 8192


def exhaustive_retrieval(score_fn, item_e, batch, k, chunk: int = EXHAUSTIVE_CHUNK, flt=None):
    """Scores every item in chunks of ``chunk`` and keeps a running top k: the exact answer.

    With a :class:`Filter`, the exact answer among the allowed items (-1 / -inf padded where a
    row allows fewer than k). Returns (ids [B, k], scores [B, k], items scored per user [B]).
    """
    # One dense read for the whole loop instead of one per chunk: slicing the variable in every
    # chunk made a batch-1 query at 1.37M items take 71 s after beam queries, 4.4 s with this read.
    item_e = tf.convert_to_tensor(item_e)
    num_items = tf.shape(item_e)[0]

    def chunk_scores(c):
        start = c * chunk
        e = item_e[start : start + chunk]
        s = score_fn(tf.broadcast_to(e[None], [batch, tf.shape(e)[0], tf.shape(e)[1]]))
        ids = tf.broadcast_to((start + tf.range(tf.shape(e)[0]))[None], tf.shape(s))
        if flt is not None:
            ok = flt.allows(ids)
            ids, s = tf.where(ok, ids, -1), tf.where(ok, s, tf.constant(-np.inf, s.dtype))
        return ids, s

    best_i, best_s = _running_top_k(chunk_scores, (num_items + chunk - 1) // chunk, batch, k, item_e.dtype)
    return best_i, best_s, tf.fill([batch], num_items)


def exact_retrieval(score_fn, item_e, candidates, k, chunk: int = EXHAUSTIVE_CHUNK):
    """The best k of each row's candidates [B, M] (dense ids, -1 padded), scored in chunks:
    (ids [B, k], scores [B, k], items scored per user [B]), -1 / -inf padded past a row's count."""

    def chunk_scores(c):
        ids = candidates[:, c * chunk : (c + 1) * chunk]
        return ids, _score_ids(score_fn, item_e, ids)

    num_chunks = (tf.shape(candidates)[1] + chunk - 1) // chunk
    best_i, best_s = _running_top_k(chunk_scores, num_chunks, tf.shape(candidates)[0], k, item_e.dtype)
    best_i = tf.where(tf.math.is_finite(best_s), best_i, -1)
    return best_i, best_s, tf.reduce_sum(tf.cast(candidates >= 0, tf.int32), axis=1)


def _running_top_k(chunk_scores, num_chunks, batch, k, dtype):
    """The best k (ids, scores) [B, k] over ``chunk_scores(c)`` -> (ids, scores) for c < num_chunks."""

    def body(c, best_i, best_s):
        ids, s = chunk_scores(c)
        all_s = tf.concat([best_s, s], axis=1)
        all_i = tf.concat([best_i, ids], axis=1)
        best_s, top = tf.math.top_k(all_s, k=k)
        return c + 1, tf.gather(all_i, top, batch_dims=1), best_s

    best_i = tf.fill([batch, k], -1)
    best_s = tf.fill([batch, k], tf.constant(-np.inf, dtype))
    _, best_i, best_s = tf.while_loop(lambda c, *_: c < num_chunks, body, [tf.constant(0), best_i, best_s])
    return best_i, best_s


def best_first_layer(graph, layer, score_fn, item_e, ep_ids, ep_scores, ef):
    """HNSW's SEARCH-LAYER: best-first while-loop with a result set of size ef.

    Each iteration expands, per user, the best not-yet-expanded member of the
    result set, until that member scores below the worst of a full set (the
    standard stop rule; candidates worse than the result set are never expanded).
    Returns (ids [B, ef], scores [B, ef], items scored per user [B]).
    """
    batch = tf.shape(ep_ids)[0]
    marker = _Bitmap(batch, graph.num_items)
    w_ids, w_s = _fit_width(ep_ids, ep_scores, ef)
    expanded = tf.zeros_like(w_ids, tf.bool)
    visited = marker.init(ep_ids)
    scored = tf.zeros([batch], tf.int32)

    def pick(w_ids, w_s, expanded):
        open_s = tf.where(expanded | (w_ids < 0), tf.constant(-np.inf, w_s.dtype), w_s)
        best = tf.argmax(open_s, axis=1, output_type=tf.int32)
        live = tf.reduce_max(open_s, axis=1) > -np.inf
        return best, live

    def cond(w_ids, w_s, expanded, visited, scored):
        return tf.reduce_any(pick(w_ids, w_s, expanded)[1])

    def body(w_ids, w_s, expanded, visited, scored):
        best, live = pick(w_ids, w_s, expanded)
        node = tf.where(live, tf.gather(w_ids, best, batch_dims=1), -1)
        expanded = expanded | (tf.one_hot(best, ef, on_value=True, off_value=False) & live[:, None])
        nb, count, visited = marker.visit(visited, graph.neighbors_of(layer, node[:, None]))
        s_new = _score_ids(score_fn, item_e, nb)
        scored += count
        all_ids = tf.concat([w_ids, nb], axis=1)
        all_s = tf.concat([w_s, s_new], axis=1)
        all_x = tf.concat([expanded, tf.zeros_like(nb, tf.bool)], axis=1)
        top_s, top = tf.math.top_k(all_s, k=ef)
        w_ids = tf.gather(all_ids, top, batch_dims=1)
        expanded = tf.gather(all_x, top, batch_dims=1)
        # A full result set whose open members all score below its worst: nothing left to expand.
        return w_ids, top_s, expanded, visited, scored

    w_ids, w_s, _, _, scored = tf.while_loop(
        cond,
        body,
        [w_ids, w_s, expanded, visited, scored],
        shape_invariants=[w_ids.shape, w_s.shape, expanded.shape, marker.shape(), tf.TensorShape([None])],
    )
    return w_ids, w_s, scored


def hnsw_retrieval(graph, score_fn, item_e, batch, k, ef0):
    """The original HNSW search with the neural scorer (SL2G): ef = 1 above layer 0."""
    ep = tf.fill([batch, 1], graph.entry_point)
    ep_s = _score_ids(score_fn, item_e, ep)
    scored = tf.ones([batch], tf.int32)
    ids, scores = ep, ep_s
    for layer in range(graph.num_layers - 1, 0, -1):
        ids, scores, n = best_first_layer(graph, layer, score_fn, item_e, ids, scores, 1)
        scored += n
    ids, scores, n = best_first_layer(graph, 0, score_fn, item_e, ids, scores, ef0)
    top_s, top = tf.math.top_k(scores, k=k)
    return tf.gather(ids, top, batch_dims=1), top_s, scored + n
