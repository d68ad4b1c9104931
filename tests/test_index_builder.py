"""Index builder: the extracted layers are exactly hnswlib's graph, and the artifact round-trips."""

from __future__ import annotations

import heapq
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from index_builder import build, cli, hnsw_state, refine
from nann_common import artifacts
from nann_common.errors import ArtifactError
from nann_common.graph import GRAPH_FILE, Graph, load_graph

DIM = 16
M = 8
EF_CONSTRUCTION = 40
ROOT = Path(__file__).resolve().parents[1]


def random_points(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def clustered_points(n: int, seed: int, clusters: int = 40) -> np.ndarray:
    """Tight Gaussian clusters, the shape that makes hnswlib's heuristic drop links."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM)) * 3
    return (centres[rng.integers(0, clusters, n)] + 0.2 * rng.standard_normal((n, DIM))).astype(np.float32)


def build_and_extract(vectors: np.ndarray, threads: int = 1, seed: int = 0):
    config = build.BuildConfig(m=M, ef_construction=EF_CONSTRUCTION, threads=threads, seed=seed)
    index = build.build_hnsw(vectors, config)
    return index, build.extract_graph(index)


def hnsw_search(graph: Graph, vectors: np.ndarray, query: np.ndarray, k: int, ef: int) -> np.ndarray:
    """hnswlib's searchKnn re-done over the extracted arrays (no deletions, no filter).

    Upper layers: greedy descent from the entry point, moving to any closer
    neighbour while scanning the current node's list. Layer 0: searchBaseLayerST,
    a candidate min-heap and a result max-heap of size max(ef, k), stopping when
    the closest candidate is farther than the worst result.
    """
    vectors = vectors.astype(np.float64)
    query = query.astype(np.float64)

    def dist(labels):
        return ((vectors[labels] - query) ** 2).sum(axis=-1)

    current = graph.entry_point
    current_dist = dist(current)
    for layer in range(graph.max_level, 0, -1):
        pos = graph.positions(layer)
        changed = True
        while changed:
            changed = False
            nbrs = graph.neighbors[layer][pos[current]]
            nbrs = nbrs[nbrs >= 0]
            for label, d in zip(nbrs, dist(nbrs), strict=True):
                if d < current_dist:
                    current, current_dist, changed = label, d, True

    ef = max(ef, k)
    visited = {current}
    candidates = [(current_dist, current)]
    results = [(-current_dist, current)]
    while candidates:
        d, node = candidates[0]
        if d > -results[0][0]:
            break
        heapq.heappop(candidates)
        nbrs = graph.neighbors[0][node]  # layer 0 rows are labels
        nbrs = [v for v in nbrs[nbrs >= 0] if v not in visited]
        visited.update(nbrs)
        for label, dn in zip(nbrs, dist(np.array(nbrs, np.int64)), strict=True):
            if len(results) < ef or -results[0][0] > dn:
                heapq.heappush(candidates, (dn, label))
                heapq.heappush(results, (-dn, label))
                if len(results) > ef:
                    heapq.heappop(results)
    best = sorted((-negd, label) for negd, label in results)[:k]
    return np.array([label for _, label in best])


@pytest.fixture(scope="module", params=["random", "clustered"])
def built(request):
    make = random_points if request.param == "random" else clustered_points
    vectors = make(3000, seed=1)
    index, graph = build_and_extract(vectors)
    return vectors, index, graph


@pytest.mark.parametrize("ef", [10, 16, 50])
def test_reference_search_on_extracted_graph_matches_hnswlib(built, ef):
    vectors, index, graph = built
    queries = vectors[:150] + 0.3 * np.random.default_rng(ef).standard_normal((150, DIM)).astype(np.float32)
    queries = np.concatenate([queries, random_points(100, seed=ef)])
    index.set_ef(ef)
    expected, _ = index.knn_query(queries, k=10, num_threads=1)
    got = np.stack([hnsw_search(graph, vectors, q, k=10, ef=ef) for q in queries])
    expected = expected.astype(np.int64)
    # hnswlib sums float32 distances in SIMD order, the reference in float64: two candidates
    # within rounding of each other may swap. Any row that differs must differ only so.
    differ = np.flatnonzero((got != expected).any(axis=1))
    assert len(differ) <= 0.02 * len(queries), f"{len(differ)} of {len(queries)} queries differ"
    v = vectors.astype(np.float64)
    for row in differ:
        d_got = ((v[got[row]] - queries[row]) ** 2).sum(-1)
        d_exp = ((v[expected[row]] - queries[row]) ** 2).sum(-1)
        np.testing.assert_allclose(np.sort(d_got), np.sort(d_exp), rtol=1e-5)


def test_extracted_graph_invariants(built):
    vectors, _, graph = built
    n = len(vectors)
    graph.validate()
    assert graph.levels.dtype == np.int8 and graph.levels.shape == (n,)
    assert graph.levels[graph.entry_point] == graph.max_level == graph.levels.max()
    np.testing.assert_array_equal(graph.nodes[0], np.arange(n))
    for layer, (nodes, nbrs) in enumerate(zip(graph.nodes, graph.neighbors, strict=True)):
        capacity = 2 * M if layer == 0 else M
        assert nodes.dtype == np.int32 and nbrs.dtype == np.int32
        assert np.all(np.diff(nodes) > 0)
        assert np.all(graph.levels[nodes] >= layer)
        assert len(nodes) == np.sum(graph.levels >= layer)
        if layer > 0:
            assert np.isin(nodes, graph.nodes[layer - 1]).all()
        assert nbrs.shape[1] == max(1, graph.degrees(layer).max()) <= capacity
        if len(nodes) > 1:
            assert graph.degrees(layer).min() >= 1, "a node with no link in a layer of several"
        valid = nbrs >= 0
        assert np.all(nbrs[valid] < n)
        assert not np.any(nbrs == nodes[:, None]), "self loop"
        assert np.all(graph.levels[nbrs[valid]] >= layer), "link to a node absent from the layer"
        for row in nbrs[:200]:
            links = row[row >= 0]
            assert len(set(links.tolist())) == len(links), "duplicate link"
    # hnswlib links a new node to its M nearest (after the heuristic) in both directions,
    # so almost every node of layer 0 is reachable: nodes without in-links are rare.
    assert graph.layer_stats()[0]["no_in_links"] <= 0.01 * n


def test_layer0_links_are_near_neighbours(built):
    """Each node's first layer-0 links lie among its true nearest neighbours far more often than chance."""
    vectors, _, graph = built
    sample = np.arange(0, len(vectors), 30)
    d = ((vectors[sample, None, :] - vectors[None, :, :]) ** 2).sum(-1)
    true_nn = np.argsort(d, axis=1)[:, 1 : 2 * M + 1]
    hits = [
        np.isin(graph.neighbors[0][i][graph.neighbors[0][i] >= 0], nn).mean()
        for i, nn in zip(sample, true_nn, strict=True)
    ]
    assert np.mean(hits) > 0.5


def test_labels_added_out_of_order_are_mapped_through_the_records():
    """Internal ids follow insertion order; the extraction must translate them to labels.

    The builder inserts labels in order (so ids usually coincide with labels, except
    with several threads); inserting a permutation makes every id differ.
    """
    import hnswlib

    vectors = random_points(2000, seed=3)
    perm = np.random.default_rng(3).permutation(len(vectors))
    index = hnswlib.Index(space="l2", dim=DIM)
    index.init_index(max_elements=len(vectors), M=M, ef_construction=EF_CONSTRUCTION, random_seed=0)
    index.add_items(vectors[perm], perm, num_threads=1)
    graph = build.extract_graph(index)
    graph.validate()
    index.set_ef(20)
    queries = random_points(80, seed=4)
    expected, _ = index.knn_query(queries, k=10, num_threads=1)
    got = np.stack([hnsw_search(graph, vectors, q, k=10, ef=20) for q in queries])
    np.testing.assert_array_equal(got, expected.astype(np.int64))


def test_each_seed_draws_its_own_levels():
    # hnswlib's generator takes seeds 0 and 1 as the same; --seed 0 and --seed 1 must still differ.
    vectors = random_points(3000, seed=4)
    levels = {seed: build_and_extract(vectors, seed=seed)[1].levels for seed in (0, 1, 2)}
    assert not np.array_equal(levels[0], levels[1]) and not np.array_equal(levels[1], levels[2])
    np.testing.assert_array_equal(levels[0], build_and_extract(vectors, seed=0)[1].levels)


def test_multithreaded_build_is_a_valid_graph():
    vectors = random_points(2000, seed=5)
    index, graph = build_and_extract(vectors, threads=2)
    graph.validate()
    index.set_ef(20)
    queries = random_points(40, seed=6)
    expected, _ = index.knn_query(queries, k=10, num_threads=1)
    got = np.stack([hnsw_search(graph, vectors, q, k=10, ef=20) for q in queries])
    np.testing.assert_array_equal(got, expected.astype(np.int64))


@pytest.mark.parametrize("n", [1, 2, 17])
def test_tiny_corpora(n):
    vectors = random_points(n, seed=n)
    index, graph = build_and_extract(vectors)
    graph.validate()
    assert graph.num_items == n
    index.set_ef(10)
    k = min(n, 3)
    expected, _ = index.knn_query(vectors[:1], k=k)
    np.testing.assert_array_equal(hnsw_search(graph, vectors, vectors[0], k=k, ef=10), expected[0])


def test_unknown_state_layout_is_refused():
    index, _ = build_and_extract(random_points(50, seed=0))
    state = index.__getstate__()[0]
    with pytest.raises(hnsw_state.IndexStateError, match="version"):
        hnsw_state.graph_from_state({**state, "ser_version": 2})
    with pytest.raises(hnsw_state.IndexStateError, match="label"):
        labels = state["label_lookup_external"].copy()
        labels[[0, 1]] = labels[[1, 0]]
        hnsw_state.graph_from_state({**state, "label_lookup_external": labels})


# --- the command line and the artifact -------------------------------------------------


def write_embeddings(workdir, vectors: np.ndarray) -> dict:
    with artifacts.atomic_dir(workdir / "embeddings") as tmp:
        np.save(tmp / build.EMBEDDINGS_FILE, vectors)
        np.save(tmp / build.ITEM_IDS_FILE, np.arange(len(vectors), dtype=np.int64) * 7 + 100)
        meta = artifacts.provenance("embeddings", {"dim": vectors.shape[1], "num_items": len(vectors)})
        return artifacts.write_meta(tmp, meta)


@pytest.fixture
def workdir(tmp_path):
    emb_meta = write_embeddings(tmp_path, clustered_points(600, seed=7))
    return tmp_path, emb_meta


def run_cli(*args) -> int:
    return cli.main([*args, "--threads", "1"] if "--threads" not in args else list(args))


def test_cli_round_trip(workdir, caplog):
    caplog.set_level(logging.INFO, logger="index_builder")
    path, emb_meta = workdir
    assert run_cli("--workdir", str(path), "--m", str(M), "--seed", "3") == 0
    graph = load_graph(path / "index", embeddings_digest=artifacts.digest(emb_meta))
    assert graph.num_items == 600 and len(graph.nodes) == graph.max_level + 1
    meta = json.loads((path / "index" / "meta.json").read_text())
    assert meta["kind"] == "index"
    # Default start nodes: N / 200, or up to 400 where a quarter of the layer below allows.
    cover = meta["start_layer_cover"]
    below = len(graph.nodes[cover["layer"] - 1])
    assert meta["params"].pop("start_nodes") == max(3, min(400, below // 4))
    assert cover["nodes"] == max(cover["hnswlib_nodes"], max(3, min(400, below // 4)))
    assert cover["nodes"] > cover["hnswlib_nodes"]  # the sparsest 1% of the items were not sampled:
    assert cover["sparse_items_left_out"] == 6 and cover["density_k"] == 8
    assert meta["params"] == {
        "m": M,
        "ef_construction": 40,
        "threads": 1,
        "seed": 3,
        "layer0_degree": 2 * M,
        "layer0_in_degree": 8,
        "space": "l2",
        "dim": DIM,
    }
    assert meta["inputs"] == {"embeddings_digest": artifacts.digest(emb_meta)}
    assert [s["nodes"] for s in meta["layers"]] == [len(nodes) for nodes in graph.nodes]
    assert meta["layers"][0]["mean_degree"] > 0 and meta["peak_rss_mib"] > 0
    assert {"build_seconds", "extract_seconds", "num_items", "max_level", "entry_point"} <= meta.keys()
    # One thread and a seed make the build reproducible: a rebuild gives the same graph file.
    first = meta["files"][GRAPH_FILE]["sha256"]
    assert run_cli("--workdir", str(path), "--m", str(M), "--seed", "3") == 0
    assert load_graph(path / "index").meta["files"][GRAPH_FILE]["sha256"] == first
    assert "layer 0: 600 nodes, mean degree" in caplog.text


def test_layer0_fill_keeps_hnswlib_links_and_adds_nearest_neighbours(workdir):
    path, _ = workdir
    vectors = np.load(path / "embeddings" / build.EMBEDDINGS_FILE)
    flags = ("--workdir", str(path), "--m", str(M), "--layer0-in-degree", "0")
    assert run_cli(*flags, "--layer0-degree", "0") == 0
    plain = load_graph(path / "index")
    assert run_cli(*flags, "--layer0-degree", "12") == 0
    filled = load_graph(path / "index")
    assert filled.meta["params"]["layer0_degree"] == 12
    # Upper layers untouched; every layer-0 node has at least 12 links.
    for a, b in zip(plain.neighbors[1:], filled.neighbors[1:], strict=True):
        np.testing.assert_array_equal(a, b)
    assert filled.degrees(0).min() >= 12 and plain.degrees(0).min() < 12
    d2 = ((vectors[:, None, :] - vectors[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    for node in range(filled.num_items):
        old = plain.neighbors[0][node][plain.neighbors[0][node] >= 0]
        new = filled.neighbors[0][node][filled.neighbors[0][node] >= 0]
        # hnswlib's links first, in order; then links that are not already there ...
        np.testing.assert_array_equal(new[: len(old)], old)
        added = new[len(old) :]
        assert len(set(new.tolist())) == len(new) and node not in new
        assert len(old) >= 12 or len(new) == 12
        # ... taken from the node's nearest neighbours (exact 14-NN here, a small corpus).
        assert set(added.tolist()) <= set(np.argsort(d2[node])[:14].tolist())


def test_reverse_links_give_rim_nodes_in_links_from_their_own_neighbours(workdir):
    path, _ = workdir
    flags = ("--workdir", str(path), "--m", str(M), "--layer0-degree", "12")
    assert run_cli(*flags, "--layer0-in-degree", "0") == 0
    filled = load_graph(path / "index")
    assert run_cli(*flags, "--layer0-in-degree", "10") == 0
    linked = load_graph(path / "index")
    assert linked.meta["params"]["layer0_in_degree"] == 10 and linked.meta["layer0_in_links_added"] > 0
    for a, b in zip(filled.neighbors[1:], linked.neighbors[1:], strict=True):
        np.testing.assert_array_equal(a, b)
    assert (filled.in_degrees(0) < 10).sum() > 0
    old_in = filled.in_degrees(0)
    new_in = linked.in_degrees(0)
    assert linked.degrees(0).max() <= 2 * M
    for node in range(linked.num_items):
        old = filled.neighbors[0][node][filled.neighbors[0][node] >= 0]
        new = linked.neighbors[0][node][linked.neighbors[0][node] >= 0]
        np.testing.assert_array_equal(new[: len(old)], old)  # links are only appended
        assert len(set(new.tolist())) == len(new) and node not in new
        # A link v -> u is added only back along u -> v, and only for u that lacked in-links.
        for u in new[len(old) :]:
            assert node in filled.neighbors[0][u] and old_in[u] < 10
    # Every node reached 10 in-links, unless each of its own neighbours links to it or is full.
    for u in np.flatnonzero(new_in < 10):
        for v in filled.neighbors[0][u][filled.neighbors[0][u] >= 0]:
            assert u in linked.neighbors[0][v] or linked.degrees(0)[v] == 2 * M
    assert new_in.min() >= min(old_in.min(), 1)


def test_cover_layer_gives_every_cluster_a_start_node():
    # 60 tight, far-apart clusters; with M = 64 hnswlib's layer 1 holds about N / 64 = 23
    # random nodes, so most clusters have none and a walk from layer 1 could not enter them.
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((60, DIM)) * 10
    cluster = rng.integers(0, 60, 1500)
    vectors = (centres[cluster] + 0.1 * rng.standard_normal((1500, DIM))).astype(np.float32)
    config = build.BuildConfig(m=64, threads=1, layer0_degree=0, layer0_in_degree=0)
    graph = build.extract_graph(build.build_hnsw(vectors, config))
    assert len(np.unique(cluster[graph.nodes[1]])) < 40
    covered, radius = refine.cover_layer(graph, vectors, 1, 80, 64)
    assert len(covered.nodes[1]) == 80 and set(graph.nodes[1]) < set(covered.nodes[1])
    assert len(np.unique(cluster[covered.nodes[1]])) == 60  # the first new nodes go to empty clusters
    gaps = ((vectors[:, None] - vectors[covered.nodes[1]][None]) ** 2).sum(-1).min(1)
    assert np.sqrt(gaps.max()) == pytest.approx(radius, rel=1e-3) and radius < 1.5  # clusters are 10 apart
    # Layer 0 and the layers above keep their lists; old layer-1 lists keep hnswlib's links first.
    np.testing.assert_array_equal(covered.neighbors[0], graph.neighbors[0])
    for a, b in zip(graph.neighbors[2:], covered.neighbors[2:], strict=True):
        np.testing.assert_array_equal(a, b)
    rows = np.searchsorted(covered.nodes[1], graph.nodes[1])
    old = graph.neighbors[1]
    np.testing.assert_array_equal(np.where(old >= 0, covered.neighbors[1][rows, : old.shape[1]], -1), old)
    # A new node links to its 32 nearest layer-1 nodes and is linked back by some.
    new = np.setdiff1d(covered.nodes[1], graph.nodes[1])
    for label in new[:10]:
        links = covered.neighbors[1][np.searchsorted(covered.nodes[1], label)]
        d = ((vectors[covered.nodes[1]] - vectors[label]) ** 2).sum(-1)
        nearest = covered.nodes[1][np.argsort(d)[1:33]]
        assert set(links[links >= 0][:32].tolist()) == set(nearest.tolist())
    assert covered.in_degrees(1).min() > 0
    # More than the layer below holds: every node of layer 0 ends in layer 1, radius 0.
    everything, radius = refine.cover_layer(graph, vectors, 1, 5000, 64)
    assert len(everything.nodes[1]) == 1500 and radius == 0


@pytest.mark.parametrize("active", [16384, 100])
def test_farthest_points_is_exact_farthest_point_sampling(active):
    # The batched sampler picks what the one-at-a-time definition picks, on spread and on clustered
    # data, also when it searches only the farthest `active` rows between full updates.
    rng = np.random.default_rng(3)
    for x in (
        rng.standard_normal((3000, 8)).astype(np.float32),
        (rng.standard_normal((40, 8))[rng.integers(0, 40, 3000)] * 5 + rng.standard_normal((3000, 8))).astype(
            np.float32
        ),
    ):
        first = np.array([7, 100])
        dist = ((x[:, None] - x[first][None]) ** 2).sum(-1).min(1)
        dist[first] = 0
        naive, d = [], dist.astype(np.float64).copy()
        for _ in range(150):
            row = int(d.argmax())
            naive.append(row)
            d = np.minimum(d, ((x.astype(np.float64) - x[row]) ** 2).sum(1))
        left = dist.copy()
        batched = refine.farthest_points(x, left, 150, active=active)
        np.testing.assert_array_equal(batched, naive)
        np.testing.assert_allclose(left, d, rtol=1e-4, atol=1e-3)  # every row's distance is up to date
    # Asking for more than there are rows stops when every row is a centre.
    x = rng.standard_normal((30, 4)).astype(np.float32)
    dist = ((x - x[0]) ** 2).sum(1)
    dist[0] = 0
    assert sorted(refine.farthest_points(x, dist, 100, active=active).tolist()) == list(range(1, 30))


def test_cover_reaches_small_groups_that_have_no_node_on_the_layers_between():
    # 300 groups of 5 far-apart items: with M = 8 hnswlib's layer 1 holds about 1/8 of the items,
    # so about half the groups have no layer-1 node at all. Covering the start layer (2) from
    # layer 0 gives every group a start node, which joins layer 1 on the way with links of its own.
    rng = np.random.default_rng(11)
    centres = rng.standard_normal((300, DIM)) * 10
    group = np.repeat(np.arange(300), 5)
    vectors = (centres[group] + 0.05 * rng.standard_normal((1500, DIM))).astype(np.float32)
    config = build.BuildConfig(m=8, threads=1, layer0_degree=0, layer0_in_degree=0)
    graph = build.extract_graph(build.build_hnsw(vectors, config))
    assert graph.max_level >= 2
    without = np.setdiff1d(np.arange(300), group[graph.nodes[1]])
    assert len(without) > 50
    covered, radius = refine.cover_layer(graph, vectors, 2, 320, 8)
    assert len(np.unique(group[covered.nodes[2]])) == 300 and radius < 1.0
    new = np.setdiff1d(covered.nodes[2], graph.nodes[2])
    assert np.isin(new, covered.nodes[1]).all()  # levels stay nested
    for label in np.setdiff1d(new, graph.nodes[1])[
        :20
    ]:  # new to layer 1: its 4 nearest there, then reverse links
        links = covered.neighbors[1][np.searchsorted(covered.nodes[1], label)]
        d = ((vectors[covered.nodes[1]] - vectors[label]) ** 2).sum(-1)
        assert set(links[links >= 0][:4].tolist()) == set(covered.nodes[1][np.argsort(d)[1:5]].tolist())
    assert covered.in_degrees(1).min() > 0 and covered.in_degrees(2).min() > 0
    np.testing.assert_array_equal(covered.neighbors[0], graph.neighbors[0])
    with pytest.raises(ValueError, match="source < layer"):
        refine.cover_layer(graph, vectors, 1, 10, 8, source=1)


def test_layer0_degree_above_2m_is_one_clear_line(workdir, capsys):
    path, _ = workdir
    assert run_cli("--workdir", str(path), "--m", "4", "--layer0-degree", "9") == 2
    err = capsys.readouterr().err
    assert "error: --layer0-degree must be in 0..2*m = 0..8, got 9" in err
    assert not (path / "index").exists()
    assert run_cli("--workdir", str(path), "--m", "4", "--layer0-in-degree", "9") == 2
    assert "error: --layer0-in-degree must be in 0..2*m = 0..8, got 9" in capsys.readouterr().err
    assert not (path / "index").exists()


def test_damaged_graph_is_refused(workdir):
    path, emb_meta = workdir
    assert run_cli("--workdir", str(path), "--m", str(M)) == 0
    graph_file = path / "index" / GRAPH_FILE
    data = bytearray(graph_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph_file.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_graph(path / "index")


def test_graph_of_other_embeddings_is_refused(workdir):
    path, _ = workdir
    assert run_cli("--workdir", str(path), "--m", str(M)) == 0
    with pytest.raises(ArtifactError, match="other embeddings"):
        load_graph(path / "index", embeddings_digest="0" * 64)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--m", "1"], "argument --m: must be in 2..1024, got 1"),
        (["--ef-construction", "0"], "argument --ef-construction: must be >= 1, got 0"),
        (["--threads", "0"], "argument --threads: must be >= 1, got 0"),
        (["--m", "many"], "argument --m: expected an integer, got 'many'"),
    ],
)
def test_bad_flags_exit_2_with_one_line(workdir, capsys, flags, message):
    path, _ = workdir
    with pytest.raises(SystemExit) as exc:
        cli.main(["--workdir", str(path), *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (path / "index").exists()


def test_missing_embeddings_exit_2(tmp_path, capsys):
    assert run_cli("--workdir", str(tmp_path / "nowhere")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "no embeddings artifact" in err[-1]


def test_damaged_embeddings_exit_2(workdir, capsys):
    path, _ = workdir
    emb = path / "embeddings" / build.EMBEDDINGS_FILE
    data = bytearray(emb.read_bytes())
    data[-1] ^= 0x01
    emb.write_bytes(bytes(data))
    assert run_cli("--workdir", str(path)) == 2
    assert "damaged" in capsys.readouterr().err
    assert not (path / "index").exists()


def test_non_finite_embeddings_exit_2_and_write_nothing(tmp_path, capsys):
    vectors = random_points(100, seed=0)
    vectors[42, 3] = np.nan
    write_embeddings(tmp_path, vectors)
    assert run_cli("--workdir", str(tmp_path)) == 2
    assert "item 42 is not finite" in capsys.readouterr().err
    assert not (tmp_path / "index").exists()


def test_failure_while_writing_leaves_previous_index(workdir, monkeypatch):
    path, _ = workdir
    assert run_cli("--workdir", str(path), "--m", str(M)) == 0
    before = (path / "index" / "meta.json").read_text()

    def fail(graph, directory):
        (directory / GRAPH_FILE).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(build, "save_graph", fail)
    with pytest.raises(OSError, match="disk full"):
        run_cli("--workdir", str(path), "--m", str(M * 2))
    assert (path / "index" / "meta.json").read_text() == before
    assert sorted(p.name for p in path.iterdir()) == ["embeddings", "index"]


def test_failing_first_build_leaves_no_index(workdir, monkeypatch):
    path, _ = workdir

    def fail(index):
        raise MemoryError("out of memory while extracting")

    monkeypatch.setattr(build, "extract_graph", fail)
    with pytest.raises(MemoryError):
        run_cli("--workdir", str(path))
    assert sorted(p.name for p in path.iterdir()) == ["embeddings"]


def test_help_describes_the_stage(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--ef-construction" in out and "embeddings/" in out and "index/" in out


def test_module_entry_point_runs_without_tensorflow(workdir):
    """Stages meet through files: the builder must run where TensorFlow is never imported."""
    path, _ = workdir
    code = (
        "import sys, runpy; sys.argv = ['index_builder', '--workdir', sys.argv[1], '--threads', '1'];"
        "rc = 0\n"
        "try: runpy.run_module('index_builder', run_name='__main__')\n"
        "except SystemExit as e: rc = e.code\n"
        "assert 'tensorflow' not in sys.modules, 'index_builder imported tensorflow'\n"
        "sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stderr
    load_graph(path / "index")


def test_cover_without_layer0_fill_keeps_hnswlibs_layer0(workdir):
    # The cover still needs each item's 8th-neighbour distance; the pass that measures it must not
    # change layer 0 when the fill is off.
    path, _ = workdir
    assert (
        run_cli("--workdir", str(path), "--m", str(M), "--layer0-degree", "0", "--layer0-in-degree", "0") == 0
    )
    covered = load_graph(path / "index")
    meta = json.loads((path / "index" / "meta.json").read_text())
    assert meta["start_layer_cover"]["nodes"] > meta["start_layer_cover"]["hnswlib_nodes"]
    assert meta["layer0_fill_seconds"] == 0 and meta["start_layer_cover"]["neighbour_seconds"] >= 0
    config = build.BuildConfig(m=M, threads=1)
    vectors = np.load(path / "embeddings" / "item_embeddings.npy")
    plain = build.extract_graph(build.build_hnsw(vectors, config))
    np.testing.assert_array_equal(covered.neighbors[0], plain.neighbors[0])
