"""Filters inside the walk: every answer checked against brute force under the same filter."""

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import EXPORT_PARAMS

from model_export.evaluate import Evaluation
from model_export.export import ExportConfig, RetrievalModule
from nann_common import contract
from nann_common.contract import NO_FILTER, PLANS, RowFilter
from walk.replay import exact_scores, replay_user

K = EXPORT_PARAMS["k"]
EF, STEPS = EXPORT_PARAMS["ef"], (0, 5)  # the export's default T at start layer 1


@pytest.fixture(scope="module")
def workdir(served_workdir) -> Path:
    return served_workdir


@pytest.fixture(scope="module")
def evaluation(workdir) -> Evaluation:
    return Evaluation(workdir, "test", users=24)


@pytest.fixture(scope="module")
def scores(evaluation) -> np.ndarray:
    """Every item's exact score for each evaluated user [users, N]."""
    return exact_scores(evaluation, progress=False)


@pytest.fixture(scope="module")
def saved(workdir):
    return tf.saved_model.load(str(workdir / "export" / "1"))


@pytest.fixture(scope="module")
def walking(workdir, evaluation):
    """The export's module with the exact plan off (exact_below 0): every filter walks."""
    from model_export.model import load_model_files
    from nann_common.graph import load_graph

    return RetrievalModule(
        load_model_files(workdir / "model"),
        np.load(workdir / "embeddings" / "item_embeddings.npy"),
        evaluation.dataset.item_ids,
        load_graph(workdir / "index"),
        ExportConfig(**EXPORT_PARAMS, exact_below=0),
    )


def histories(evaluation) -> np.ndarray:
    h = evaluation.histories
    return np.where(h >= 0, evaluation.dataset.item_ids[np.maximum(h, 0)], -1)


def call(fn, history, filters, mode="beam_history", k=K):
    """One call of a retrieve signature; ``filters`` None for the unfiltered ones."""
    query = contract.Query(k, EF, STEPS, mode)
    inputs = contract.retrieve_inputs(history, query, filters)
    out = fn(**{name: tf.constant(value) for name, value in inputs.items()})
    return {name: t.numpy() for name, t in out.items()}


def allowed_mask(evaluation, row: int, f: RowFilter) -> np.ndarray:
    """Brute force: the items ``f`` allows for evaluated user ``row``."""
    ds = evaluation.dataset
    ok = np.ones(ds.num_items, bool)
    if f.allow_categories:
        ok &= np.isin(ds.item_category, f.allow_categories)
    ok &= ~np.isin(ds.item_category, f.exclude_categories)
    ok &= ~np.isin(ds.item_ids, f.exclude_items)
    if f.exclude_history:
        h = evaluation.histories[row]
        ok[h[h >= 0]] = False
    return ok


def random_filter(rng, evaluation) -> RowFilter:
    ds = evaluation.dataset
    kind = rng.integers(6)
    if kind == 0:
        return RowFilter(exclude_history=True)
    if kind == 1:
        return RowFilter(exclude_items=tuple(rng.choice(ds.item_ids, 200, replace=False).tolist()))
    if kind == 2:
        return RowFilter(allow_categories=(int(rng.integers(ds.num_categories)),))
    if kind == 3:
        return RowFilter(exclude_categories=(int(rng.integers(ds.num_categories)),), exclude_history=True)
    category = int(rng.integers(ds.num_categories))
    members = ds.item_ids[ds.item_category == category]
    if kind == 4:  # all but a few of one category's items: fewer allowed than k
        keep = int(rng.integers(0, K))
        return RowFilter(allow_categories=(category,), exclude_items=tuple(members[keep:].tolist()))
    # unknown ids and out-of-range categories are ignored
    return RowFilter(exclude_items=(10**15, -1 + 2**62), allow_categories=(category, ds.num_categories + 7))


def check_answers(out, evaluation, scores, filters, exact: bool):
    """No disallowed item, min(k, allowed) of them, scores right; exact: the brute-force answer."""
    ids = out["item_ids"]
    coverage = []
    for row, f in enumerate(filters):
        ok = allowed_mask(evaluation, row, f)
        got = ids[row][ids[row] >= 0]
        dense = np.searchsorted(evaluation.dataset.item_ids, got)
        assert ok[dense].all(), f"row {row} ({f}) returned a disallowed item"
        assert len(got) == min(K, ok.sum()), (row, f, len(got), ok.sum())
        assert len(np.unique(got)) == len(got)
        np.testing.assert_allclose(out["scores"][row][: len(got)], scores[row][dense], rtol=1e-4, atol=1e-4)
        allowed = np.flatnonzero(ok)
        best = allowed[np.argsort(-scores[row][allowed], kind="stable")[: len(got)]]
        coverage.append(len(np.intersect1d(best, dense)) / max(len(got), 1))
        if exact:
            assert coverage[-1] == 1.0, (row, f)
    return np.array(coverage)


def test_the_shared_export_answers_small_corpora_exactly_under_any_filter(saved, evaluation, scores):
    """The tiny corpus is smaller than the exact plan's threshold: every filter gets the exact answer."""
    rng = np.random.default_rng(0)
    rows = len(evaluation.histories)
    for _ in range(4):
        filters = [random_filter(rng, evaluation) for _ in range(rows)]
        for signature in (contract.FILTER_SIGNATURE, contract.XLA_FILTER_SIGNATURE):
            out = call(saved.signatures[signature], histories(evaluation), filters)
            check_answers(out, evaluation, scores, filters, exact=True)
            assert set(out["plan"]) == {PLANS.index("exact")}


def test_the_filtered_walk_never_returns_a_disallowed_item_and_fills_k(walking, evaluation, scores):
    rng = np.random.default_rng(1)
    rows = len(evaluation.histories)
    coverage, plans = [], set()
    for _ in range(6):
        filters = [random_filter(rng, evaluation) for _ in range(rows)]
        for mode in ("beam_history", "beam", "hnsw"):
            out = call(walking.retrieve_filtered, histories(evaluation), filters, mode)
            coverage.append(check_answers(out, evaluation, scores, filters, exact=False))
            plans |= {PLANS[p] for p in out["plan"]}
    # Walks on a 1,267-item graph at ef 40: the bound leaves room for a near-tie at the edge.
    assert np.concatenate(coverage).mean() >= 0.9
    assert plans == {"walk", "walk+widen"}  # filled by the walk, and short rows widened


def test_exhaustive_under_a_filter_is_the_exact_answer(walking, evaluation, scores):
    rng = np.random.default_rng(2)
    filters = [random_filter(rng, evaluation) for _ in range(len(evaluation.histories))]
    out = call(walking.retrieve_filtered, histories(evaluation), filters, "exhaustive")
    check_answers(out, evaluation, scores, filters, exact=True)
    assert set(out["plan"]) == {PLANS.index("exact")}


def test_the_filtered_walk_is_the_replay_with_the_same_filter(walking, workdir, evaluation, scores):
    """Mode beam, one category denied to every user: the TF walk and the numpy replay take the
    same steps, with layer 0's ef and T grown as the planner grows them, and the same pass through
    disallowed neighbours."""
    from model_export.export import SELECTIVE_EF, SELECTIVE_POWER, SELECTIVE_STEPS
    from nann_common.graph import load_graph

    graph = load_graph(workdir / "index")
    ds = evaluation.dataset
    smallest = int(np.argmin(np.bincount(ds.item_category)))
    filters = [RowFilter(exclude_categories=(smallest,))] * len(evaluation.histories)
    out = call(walking.retrieve_filtered, histories(evaluation), filters, "beam")
    share = np.float32((ds.item_category != smallest).sum()) / np.float32(ds.num_items)
    ef0 = int(np.round(EF[-1] * np.clip(share ** np.float32(-SELECTIVE_POWER), 1.0, SELECTIVE_EF)))
    assert set(out["plan"]) == {PLANS.index("walk")}
    for row, f in enumerate(filters):
        allowed = allowed_mask(evaluation, row, f)
        steps = [STEPS[0], STEPS[1] * SELECTIVE_STEPS]
        top, scored = replay_user(graph, scores[row], [EF[0], ef0], steps, 1, K, allowed=allowed)
        got = np.searchsorted(ds.item_ids, out["item_ids"][row])
        assert set(top) == set(got), row
        assert scored == out["scored"][row]


def test_exclusions_alone_filter_the_unfiltered_walks_beam(walking, workdir, evaluation, scores):
    """Item exclusions alone (the blocklist, the history): the unfiltered walk runs, scoring
    exactly what it scores unfiltered, and the answer is the best k allowed items of its layer-0
    beam, as the replay's beam filtered."""
    from nann_common.graph import load_graph

    graph = load_graph(workdir / "index")
    ds = evaluation.dataset
    best = np.argsort(-scores, axis=1)[:, :3]
    filters = [RowFilter(exclude_items=tuple(ds.item_ids[b].tolist())) for b in best]
    filters[0] = RowFilter(exclude_history=True)
    filters[1] = NO_FILTER
    out = call(walking.retrieve_filtered, histories(evaluation), filters, "beam")
    plain = call(walking.retrieve, histories(evaluation), None, "beam")
    np.testing.assert_array_equal(out["scored"], plain["scored"])
    np.testing.assert_array_equal(out["item_ids"][1], plain["item_ids"][1])
    assert set(out["plan"]) == {PLANS.index("walk")}
    for row, f in enumerate(filters):
        allowed = allowed_mask(evaluation, row, f)
        beam, scored = replay_user(graph, scores[row], list(EF), list(STEPS), 1, EF[-1])
        top = beam[allowed[beam]][:K]
        got = np.searchsorted(ds.item_ids, out["item_ids"][row])
        assert set(top) == set(got), row
        assert scored == out["scored"][row]
        assert out["removed"][row] == (~allowed[beam]).sum()


def test_exclusions_that_empty_the_beam_widen_and_still_fill_k(walking, evaluation, scores):
    """Each user's 35 best items excluded: the unfiltered beam (ef 40) holds too few allowed
    items, the row widens, and the answer is still k allowed items."""
    ds = evaluation.dataset
    best = np.argsort(-scores, axis=1)[:, :35]
    filters = [RowFilter(exclude_items=tuple(ds.item_ids[b].tolist())) for b in best]
    out = call(walking.retrieve_filtered, histories(evaluation), filters, "beam_history")
    coverage = check_answers(out, evaluation, scores, filters, exact=False)
    assert PLANS.index("walk+widen") in set(out["plan"])
    assert coverage.mean() >= 0.9
