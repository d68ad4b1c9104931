"""Beam-retrieval and HNSW-retrieval in TensorFlow against exhaustive scoring."""

import numpy as np
import pytest
import tensorflow as tf

from model_export.model import PAD, ModelConfig, build_model
from nann_common.graph import start_layer
from walk import search

NUM_ITEMS, DEGREE = 240, 6


def knn_graph(points: np.ndarray, nodes: np.ndarray, degree: int) -> np.ndarray:
    """Exact l2 k-nearest-neighbour lists (labels) among ``nodes``, plus a ring so the graph is connected."""
    sub = points[nodes]
    dist = ((sub[:, None, :] - sub[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1)[:, : degree - 1]
    ring = np.roll(np.arange(len(nodes)), -1)[:, None]
    return nodes[np.concatenate([order, ring], axis=1)].astype(np.int32)


@pytest.fixture(scope="module")
def setup():
    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = build_model(ModelConfig(NUM_ITEMS, 5, arch="din"), rng.integers(0, 5, NUM_ITEMS))
    item_e = model.item_embeddings(np.arange(NUM_ITEMS, dtype=np.int32)).numpy()
    layer1 = np.sort(rng.choice(NUM_ITEMS, 30, replace=False)).astype(np.int32)
    layer2 = np.sort(rng.choice(layer1, 6, replace=False)).astype(np.int32)
    nodes = [np.arange(NUM_ITEMS, dtype=np.int32), layer1, layer2]
    neighbors = [knn_graph(item_e, n, min(DEGREE, len(n) - 1)) for n in nodes]
    neighbors[1] = np.pad(neighbors[1], [[0, 0], [0, 2]], constant_values=-1)  # -1 padded rows too
    graph = search.GraphTensors(nodes, neighbors, entry_point=int(layer2[0]))
    history = rng.integers(0, NUM_ITEMS, (5, 12)).astype(np.int32)
    history[2, 4:] = PAD
    return model, tf.constant(item_e), graph, history


def scorer(model, history):
    hist_e, mask = model.behaviour_embeddings(history)
    state = model.user_state(hist_e, mask)
    return lambda cand: model.score(state, cand)


def exhaustive(model, item_e, history, k):
    scores = scorer(model, history)(tf.broadcast_to(item_e[None], [len(history), *item_e.shape])).numpy()
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("marking", search.MARKINGS)
@pytest.mark.parametrize("start_layer", [1, 2])
def test_beam_with_ef_covering_the_corpus_equals_exhaustive(setup, marking, start_layer):
    model, item_e, graph, history = setup
    k = 20
    ids, scores, scored = search.beam_retrieval(
        graph,
        scorer(model, history),
        item_e,
        len(history),
        k,
        ef=[NUM_ITEMS] * (start_layer + 1),
        steps=[NUM_ITEMS] * (start_layer + 1),
        start_layer=start_layer,
        marking=marking,
    )
    expected = exhaustive(model, item_e, history, k)
    assert all(set(a) == set(b) for a, b in zip(ids.numpy(), expected, strict=True))
    assert (scored.numpy() <= NUM_ITEMS + graph.layer_sizes[1] + graph.layer_sizes[2]).all()


@pytest.mark.parametrize("marking", search.MARKINGS)
def test_beam_with_default_like_parameters_scores_a_fraction_and_finds_most(setup, marking):
    model, item_e, graph, history = setup
    k = 10
    ids, _, scored = search.beam_retrieval(
        graph,
        scorer(model, history),
        item_e,
        len(history),
        k,
        ef=[10, 20, 40],
        steps=[1, 1, 3],
        start_layer=2,
        marking=marking,
    )
    expected = exhaustive(model, item_e, history, k)
    coverage = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids.numpy(), expected, strict=True)])
    assert scored.numpy().max() < NUM_ITEMS
    # On this tiny, well-connected graph the walk should find most of the exact top 10.
    assert coverage >= 0.6, coverage


def test_bitmap_and_set_marking_agree(setup):
    model, item_e, graph, history = setup
    out = [
        search.beam_retrieval(
            graph,
            scorer(model, history),
            item_e,
            len(history),
            10,
            ef=[10, 20, 40],
            steps=[1, 1, 3],
            start_layer=2,
            marking=m,
        )
        for m in search.MARKINGS
    ]
    np.testing.assert_array_equal(out[0][0].numpy(), out[1][0].numpy())
    np.testing.assert_array_equal(out[0][2].numpy(), out[1][2].numpy())


def test_a_batch_equals_users_one_by_one(setup):
    model, item_e, graph, history = setup

    def run(h):
        return search.beam_retrieval(
            graph, scorer(model, h), item_e, len(h), 10, ef=[10, 20, 40], steps=[1, 1, 3], start_layer=2
        )

    batch = run(history)
    for i in range(len(history)):
        single = run(history[i : i + 1])
        np.testing.assert_array_equal(single[0].numpy()[0], batch[0].numpy()[i])
        assert single[2].numpy()[0] == batch[2].numpy()[i]


def test_hnsw_with_ef_covering_the_corpus_equals_exhaustive(setup):
    model, item_e, graph, history = setup
    k = 20
    ids, _, scored = search.hnsw_retrieval(graph, scorer(model, history), item_e, len(history), k, NUM_ITEMS)
    expected = exhaustive(model, item_e, history, k)
    assert all(set(a) == set(b) for a, b in zip(ids.numpy(), expected, strict=True))


def test_start_layer_follows_the_corpus_share():
    ef = [100, 200, 400]  # top-down, as every per-layer list
    # 1.3M items, M = 32: layer 2 holds ~1,270 nodes, about 1/1000 of the corpus.
    assert start_layer([1_300_000, 40_600, 1_270, 40], 1_300_000, ef) == 2
    # Small corpora start lower: layer 1 needs at least the ef it would start with (200).
    assert start_layer([5_000, 150, 5], 5_000, ef) == 0
    assert start_layer([20_000, 620, 20], 20_000, ef) == 1
    # Without ef (the index builder's question) only the corpus share counts.
    assert start_layer([5_000, 150, 2], 5_000) == 1
    # A list shorter than the layers gives every higher layer its first entry.
    assert start_layer([1_300_000, 40_600, 1_270, 40], 1_300_000, [2_000, 400]) == 1


@pytest.mark.parametrize("marking", search.MARKINGS)
def test_every_entry_point_is_expanded_even_beyond_ef(marking):
    # Algorithm 2 starts with C = ep: the entry points handed down from the layer above are all
    # expanded, also those that fall outside this layer's beam of ef. Item 1 (score 1) is the
    # second entry point with ef = 1; only its neighbour, item 4 (score 10), is the best item.
    scores = np.array([5.0, 1.0, 0.0, 0.0, 10.0], np.float32)
    item_e = tf.constant(scores[:, None])
    neighbors = np.array([[2], [4], [0], [0], [1]], np.int32)
    graph = search.GraphTensors([np.arange(5, dtype=np.int32)], [neighbors], entry_point=0)
    ids, top, scored = search.search_layer(
        graph,
        0,
        lambda cand: cand[..., 0],
        item_e,
        tf.constant([[0, 1]]),
        tf.constant(scores[None, :2]),
        ef=1,
        steps=1,
        marking=marking,
    )
    assert ids.numpy().tolist() == [[4]]
    assert top.numpy().tolist() == [[10.0]]
    assert scored.numpy().tolist() == [2]  # items 2 and 4: the entry points are not scored again


def test_candidates_are_scored_on_a_fixed_grid_of_widths(setup):
    widths = np.array([int(search.padded_width(m)) for m in range(1, 30_000, 7)])
    ms = np.arange(1, 30_000, 7)
    assert (widths >= ms).all() and (widths % 64 == 0).all()
    assert (widths[ms > 512] <= 1.27 * ms[ms > 512]).all()  # padding costs at most 27%
    assert len(np.unique(widths)) <= 32  # a few dozen shapes for every walk up to 30k candidates
    # Padding changes nothing a caller sees: the scores of the real candidates, -inf for -1.
    model, item_e, _, history = setup
    ids = tf.constant(np.array([[3, 7, -1, 11, 5], [0, -1, -1, 2, 9]], np.int32))
    got = search._score_ids(scorer(model, history[:2]), item_e, ids).numpy()
    want = scorer(model, history[:2])(tf.gather(item_e, tf.maximum(ids, 0))).numpy()
    np.testing.assert_allclose(got[ids.numpy() >= 0], want[ids.numpy() >= 0], rtol=1e-5, atol=1e-6)
    assert np.isneginf(got[ids.numpy() < 0]).all()


def test_visited_bitmap_marks_exactly_the_items_given():
    """Every bit position, the sign bit included, against a python set per row."""
    rng = np.random.default_rng(3)
    num_items, batch = 100, 3  # 4 words per row, the last one partly used
    marker = search._Bitmap(batch, num_items)
    first = np.full((batch, 40), -1, np.int32)
    first[:, :30] = rng.integers(0, num_items, size=(batch, 30))  # repeats: init takes each once
    first[0, :3] = [31, 63, 31]
    visited = marker.init(tf.constant(first))
    seen = [set(r[r >= 0].tolist()) for r in first]
    for _ in range(4):
        ids = rng.integers(-1, num_items, size=(batch, 50)).astype(np.int32)
        new, counts, visited = marker.visit(visited, tf.constant(ids))
        for r, s, got, n in zip(ids, seen, new.numpy(), counts.numpy(), strict=True):
            want = list(dict.fromkeys(x for x in r.tolist() if x >= 0 and x not in s))  # first seen
            assert got[got >= 0].tolist() == want and n == len(want)
            assert (got[len(want) :] == -1).all()
            s.update(want)
    everything = np.tile(np.arange(num_items, dtype=np.int32), (batch, 1))
    left, _, _ = marker.visit(visited, tf.constant(everything))
    for s, r in zip(seen, left.numpy(), strict=True):
        assert set(r[r >= 0].tolist()) == set(range(num_items)) - s
