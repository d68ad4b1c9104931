"""The exported SavedModel: loads without project code, matches exhaustive search, rejects bad input."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import EXPORT_PARAMS

from model_export import cli
from model_export import export as export_module
from model_export.evaluate import Evaluation
from model_export.export import DEFAULT_STEPS, ExportConfig, RetrievalModule
from nann_common import contract
from nann_common.errors import ArtifactError, InputError

EXPORT = ExportConfig(**EXPORT_PARAMS)
START_LAYER = 1  # what the start-layer rule picks for the fixture's graph and ef (checked below)


@pytest.fixture(scope="module")
def workdir(served_workdir) -> Path:
    return served_workdir


@pytest.fixture(scope="module")
def evaluation(workdir) -> Evaluation:
    return Evaluation(workdir, "test")


@pytest.fixture(scope="module")
def saved(workdir):
    """The export loaded once for the module: loading it costs seconds, each call milliseconds."""
    return tf.saved_model.load(str(workdir / "export" / "1"))


def _inputs(history, k, ef, steps, mode, filters=None):
    b = len(history)
    return {
        "history": np.asarray(history, np.int64),
        "k": np.full([b], k, np.int32),
        "ef": np.array([ef] * b, np.int32),
        "steps": np.array([steps] * b, np.int32),
        "mode": np.array([mode] * b),
        **(contract.filter_inputs(filters) if filters else {}),
    }


def _module(workdir, evaluation, config):
    """The in-memory export module (before saving) of the test workdir with ``config``."""
    from model_export.model import load_model_files
    from nann_common.graph import load_graph

    return RetrievalModule(
        load_model_files(workdir / "model"),
        np.load(workdir / "embeddings" / "item_embeddings.npy"),
        evaluation.dataset.item_ids,
        load_graph(workdir / "index"),
        config,
    )


def retrieve(saved, history, k, ef, steps, mode, signature="retrieve"):
    inputs = _inputs(history, k, ef, steps, mode)
    return saved.signatures[signature](**{name: tf.constant(v) for name, v in inputs.items()})


def original_histories(evaluation, rows=slice(None)):
    h = evaluation.histories[rows]
    return np.where(h >= 0, evaluation.dataset.item_ids[np.maximum(h, 0)], -1)


@pytest.mark.e2e
def test_loads_and_answers_in_a_process_with_only_tensorflow(workdir, evaluation, tmp_path):
    """As TF Serving would: no project code on the path, only the SavedModel directory."""
    history = original_histories(evaluation, slice(0, 3))
    np.save(tmp_path / "history.npy", history)
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import tensorflow as tf
        assert "model_export" not in sys.modules
        model = tf.saved_model.load({str(workdir / "export" / "1")!r})
        out = model.signatures["serving_default"](history=tf.constant(np.load("history.npy")))
        print(json.dumps({{k: v.numpy().tolist() for k, v in out.items()}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    ids = np.array(out["item_ids"])
    assert ids.shape == (3, EXPORT.k) and np.array(out["scores"]).shape == (3, EXPORT.k)
    assert np.isin(ids, evaluation.dataset.item_ids).all(), "outputs must be original item ids"
    assert all(len(set(row)) == EXPORT.k for row in ids)
    assert (np.array(out["scored"]) < evaluation.dataset.num_items).all()


@pytest.mark.e2e
def test_saved_model_cli_lists_the_signatures(workdir):
    cli = Path(sys.executable).with_name("saved_model_cli")
    if not cli.exists():
        pytest.skip(f"saved_model_cli not found beside {sys.executable}")
    done = subprocess.run(
        [str(cli), "show", "--dir", str(workdir / "export" / "1"), "--all"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for name in (
        "signature_def['serving_default']",
        "signature_def['retrieve']",
        "signature_def['retrieve_xla']",
        "signature_def['warmup_xla']",
        "inputs['history']",
        "outputs['item_ids']",
        "outputs['scored']",
    ):
        assert name in done.stdout


@pytest.mark.parametrize("mode", ["beam", "beam_sets", "hnsw"])
def test_ef_covering_the_corpus_equals_exhaustive(evaluation, mode):
    n, k = evaluation.dataset.num_items, 10
    ids, scored = evaluation.retrieve(mode, k, ef=(n, n), steps=(n, n), progress=False)
    reference = evaluation.reference(k, progress=False)
    assert all(set(a) == set(b) for a, b in zip(ids, reference, strict=True))


def test_default_parameters_score_a_fraction_and_cover_most(evaluation):
    result = evaluation.metrics(EXPORT.mode, EXPORT.k, progress=False)
    assert result["scored_fraction"] < 0.6
    # A small, barely trained corpus; the bound only guards against a broken walk.
    assert result["coverage"] >= 0.5, result


def test_a_batch_equals_users_one_by_one(saved, evaluation):
    history = original_histories(evaluation, slice(0, 6))
    batch = retrieve(saved, history, 10, [20, 40], [1, 2], "beam")
    for i in range(len(history)):
        single = retrieve(saved, history[i : i + 1], 10, [20, 40], [1, 2], "beam")
        np.testing.assert_array_equal(single["item_ids"].numpy()[0], batch["item_ids"].numpy()[i])
        np.testing.assert_allclose(single["scores"].numpy()[0], batch["scores"].numpy()[i], rtol=1e-5)


def test_reload_gives_identical_results(workdir, saved, evaluation):
    """The in-memory module before saving and the loaded SavedModel answer the same."""
    module = _module(workdir, evaluation, EXPORT)
    history = tf.constant(original_histories(evaluation, slice(0, 8)), tf.int64)
    before = module.serve_default(history)
    after = saved.signatures["serving_default"](history=history)
    for key in ("item_ids", "scores", "scored"):
        np.testing.assert_array_equal(before[key].numpy(), after[key].numpy())


@pytest.mark.parametrize(
    "change,message",
    [
        ({"k": 0}, "k must be in 1.."),
        ({"k": 10**6}, "k must be in 1.."),
        ({"ef": [20, 5]}, "ef of layer 0 (the last ef) must be >= k"),
        ({"steps": [1, 0]}, "T of layer 0 (the last) >= 1"),
        ({"steps": [-1, 2]}, "every step count T must be >= 0"),
        ({"mode": "greedy"}, "mode must be one of"),
        ({"unknown_id": True}, "not in the corpus"),
        ({"empty_row": True}, "every user needs at least one behaviour"),
    ],
)
def test_bad_requests_get_clear_errors(saved, evaluation, change, message):
    history = original_histories(evaluation, slice(0, 2))
    if change.get("unknown_id"):
        history[0, 0] = evaluation.dataset.item_ids.max() + 12345
    if change.get("empty_row"):
        history[1, :] = -1
    args = {"k": 10, "ef": [20, 40], "steps": [1, 2], "mode": "beam"}
    args.update({k: v for k, v in change.items() if k in args})
    with pytest.raises(tf.errors.InvalidArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        retrieve(saved, history, args["k"], args["ef"], args["steps"], args["mode"])


def test_export_versions_and_provenance(workdir):
    meta = json.loads((workdir / "export" / "1" / "meta.json").read_text())
    assert meta["kind"] == "saved_model"
    assert meta["params"]["start_layer"] == START_LAYER and meta["params"]["ef"] == [20, 40]
    assert meta["params"]["mode"] == export_module.DEFAULT_MODE
    assert meta["params"]["steps"] == list(export_module.DEFAULT_STEPS[-2:])
    assert meta["params"]["score_split"] == export_module.DEFAULT_XLA_SCORE_SPLIT
    assert any(name.startswith("variables/") for name in meta["files"])
    assert set(meta["inputs"]) == {"model", "embeddings", "index"}


def test_the_export_reads_its_corpus_tables_from_the_embeddings_not_the_dataset(
    workdir, tmp_path, monkeypatch
):
    """The export's item categories, category labels and warm-up histories come from embeddings/
    (written by train): a workdir without dataset/ gives the same tables as the dataset itself
    (the fallback for embeddings written before they carried them), so a re-export needs no
    training data."""
    import shutil

    from model_export import data
    from model_export.export import corpus_tables

    item_ids = np.load(workdir / "embeddings" / "item_ids.npy")
    max_len, categories = 50, len(data.load_dataset(workdir / "dataset").category_names)
    old = tmp_path / "old"
    shutil.copytree(workdir / "dataset", old / "dataset")
    shutil.copytree(workdir / "embeddings", old / "embeddings")
    for name in ("item_category.npy", "categories.json", "sample_histories.npy"):
        (old / "embeddings" / name).unlink()
    from_dataset = corpus_tables(old, max_len, categories)
    assert from_dataset[0] is None  # the model's own table

    new = tmp_path / "new"
    shutil.copytree(workdir / "embeddings", new / "embeddings")

    def no_dataset(directory):
        raise AssertionError(f"the export read {directory}")

    monkeypatch.setattr(data, "load_dataset", no_dataset)
    cats, labels, histories = corpus_tables(new, max_len, categories)
    model_table = np.load(workdir / "model" / "item_category.npy")
    np.testing.assert_array_equal(cats, model_table)
    assert labels == from_dataset[1]
    np.testing.assert_array_equal(histories, from_dataset[2])
    assert histories.shape == (64, max_len) and np.isin(histories[histories >= 0], item_ids).all()
    with pytest.raises(ArtifactError, match="re-run train"):
        corpus_tables(new, max_len, categories + 1)


@pytest.mark.e2e
def test_sweep_writes_plot_and_numbers(workdir, tmp_path):
    from model_export import sweep

    rows = sweep.sweep(workdir, tmp_path, k=10, beam_ef0=(20, 40), beam_t0=(1, 2), hnsw_ef0=(20, 40))
    assert [r["mode"] for r in rows] == ["beam"] * 4 + ["hnsw"] * 2
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (tmp_path / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("mode,ef,steps,scored_fraction") and len(lines) == 7
    # More rounds never find less: T_0 = 2 covers at least what T_0 = 1 does at the same ef.
    beam = {(tuple(r["ef"]), tuple(r["steps"])): r["coverage"] for r in rows if r["mode"] == "beam"}
    upper = (DEFAULT_STEPS[-2],)  # the export's T above layer 0
    assert beam[((20, 40), (*upper, 2))] >= beam[((20, 40), (*upper, 1))]


def test_sweep_refuses_a_grid_with_no_valid_point(workdir, tmp_path):
    from model_export import sweep

    with pytest.raises(InputError, match="no grid point"):
        sweep.sweep(workdir, tmp_path, k=10, beam_ef0=(5,), hnsw_ef0=(5,))


@pytest.mark.e2e
def test_sweep_varies_the_upper_layers_when_asked(workdir, tmp_path):
    from model_export import sweep

    rows = sweep.sweep(
        workdir, tmp_path, k=10, beam_ef0=(20,), beam_t0=(2,), hnsw_ef0=(20,), beam_upper=((5,), (30,))
    )
    assert [tuple(r["ef"]) for r in rows if r["mode"] == "beam"] == [(5, 20), (30, 20)]
    # More seeds from the start layer score more items.
    assert rows[1]["scored_fraction"] > rows[0]["scored_fraction"]
    with pytest.raises(InputError, match="need 1 values"):
        sweep.sweep(workdir, tmp_path, k=10, beam_ef0=(20,), beam_upper=((5, 5),))
    args = cli.build_parser().parse_args(["sweep", "--workdir", "w", "--beam-upper", "100/200,400/400"])
    assert args.beam_upper == ((100, 200), (400, 400))


def test_command_line_leaves_the_query_to_the_tuning_or_the_built_in_defaults():
    """export's query flags default to None: the tuned query (DIR/tune) if any, else ExportConfig's."""
    args = cli.build_parser().parse_args(["export", "--workdir", "w"])
    assert all(getattr(args, name) is None for name in export_module.QUERY_FIELDS)
    assert args.score_split == export_module.DEFAULT_XLA_SCORE_SPLIT
    built_in = ExportConfig()
    assert (built_in.ef, built_in.steps, built_in.k) == (
        export_module.DEFAULT_EF,
        export_module.DEFAULT_STEPS,
        export_module.DEFAULT_K,
    )
    assert (built_in.mode, built_in.history_stride) == (
        export_module.DEFAULT_MODE,
        export_module.DEFAULT_HISTORY_STRIDE,
    )


@pytest.fixture(scope="module")
def exact_scores(evaluation):
    """Every item's score for every evaluated user (the replay's input)."""
    from walk import replay

    return replay.exact_scores(evaluation)


def test_numpy_walk_replay_matches_the_saved_model(workdir, evaluation, exact_scores):
    """walk.replay, used to compare graph builds, walks as the SavedModel does."""
    from nann_common.graph import load_graph
    from walk import replay

    graph = load_graph(workdir / "index")
    scores = exact_scores
    for ef, steps in (((20, 40), (1, 2)), ((10, 20), (2, 3))):
        ids, scored = evaluation.retrieve("beam", 10, ef, steps, progress=False)
        overlap = []
        for u in range(evaluation.num_users):
            top, n = replay.replay_user(graph, scores[u], list(ef), list(steps), START_LAYER, 10)
            assert n == scored[u], (u, ef, steps)
            overlap.append(len(np.intersect1d(top, ids[u])) / 10)
        # Float rounding differs between the Keras model and the SavedModel's graph: a near-tie at
        # the beam's edge may flip, nothing more.
        assert np.mean(overlap) >= 0.99, (ef, steps, np.mean(overlap))


@pytest.mark.parametrize("split", [3])
def test_xla_signature_finds_what_the_stock_one_does(workdir, saved, evaluation, split):
    """retrieve_xla compiles the scorer with XLA, each call in `split` parts (the fixture's export
    has the default, 2); the walk and its answer stay those of the stock signature."""
    module = _module(workdir, evaluation, ExportConfig(**{**EXPORT_PARAMS, "score_split": split}))
    assert module.score_split == split
    history = _short_histories(evaluation, 16)
    for mode in ("beam", "beam_history"):
        stock = retrieve(saved, history, 10, [20, 40], [1, 3], mode)
        for xla in (
            module.retrieve_xla(
                **{k: tf.constant(v) for k, v in _inputs(history, 10, [20, 40], [1, 3], mode).items()}
            ),
            retrieve(saved, history, 10, [20, 40], [1, 3], mode, signature="retrieve_xla"),
        ):
            _assert_same_answer(xla, stock, mode)


def _short_histories(evaluation, users):
    """Histories shorter than max_len (the XLA signature pads them to one shape): left-aligned rows."""
    rows = [row[row >= 0][-30:] for row in original_histories(evaluation, slice(0, users))]
    history = np.full((len(rows), max(map(len, rows))), -1, np.int64)
    for i, row in enumerate(rows):
        history[i, : len(row)] = row
    assert history.shape[1] < 50
    return history


def _assert_same_answer(xla, stock, label):
    # XLA orders float operations its own way: scores agree to 1e-4, and a near-tie at the
    # beam's edge may flip, nothing more.
    np.testing.assert_allclose(xla["scores"].numpy(), stock["scores"].numpy(), rtol=1e-4, atol=1e-4)
    same = [
        len(np.intersect1d(a, b)) / a.size
        for a, b in zip(xla["item_ids"].numpy(), stock["item_ids"].numpy(), strict=True)
    ]
    assert np.mean(same) >= 0.99, (label, same)


def _xla_functions(concrete) -> set[str]:
    """Names of the functions a signature reaches that XLA must compile (``_XlaMustCompile``)."""
    graph_def = concrete.graph.as_graph_def()
    must = set()
    for fn in graph_def.library.function:
        if fn.attr["_XlaMustCompile"].b:
            must.add(fn.signature.name)
        for node in fn.node_def:
            if node.attr["_XlaMustCompile"].b:
                must.add(node.attr["f"].func.name or node.name)
    must |= {n.name for n in graph_def.node if n.attr["_XlaMustCompile"].b}
    return must


def test_tf_serving_signatures_hold_no_xla_and_the_fast_one_does(saved):
    """Stock TF Serving runs serving_default, retrieve and retrieve_filtered (it refuses XLA
    without --xla_cpu_compilation_enabled); the *_xla ones are the in-process server's."""
    for name in ("serving_default", "retrieve", "retrieve_filtered"):
        assert not _xla_functions(saved.signatures[name]), name
    for name in ("retrieve_xla", "retrieve_filtered_xla", "warmup_xla"):
        assert _xla_functions(saved.signatures[name]), name


def test_the_xla_warmup_compiles_every_shape_a_walk_meets(workdir, evaluation, saved):
    """After warmup_xla at a batch size, no query of the default kind at that batch compiles."""
    meta = json.loads((workdir / "export" / "1" / "meta.json").read_text())
    widths = meta["params"]["xla_widths"]
    assert widths == sorted(widths) and widths[-1] == meta["params"]["xla_max_width"]
    history = _short_histories(evaluation, 1)
    out = saved.signatures["warmup_xla"](history=tf.constant(history))
    assert out["widths"].numpy().tolist() == widths
    assert int(out["finite"]) == sum(widths)  # every candidate scored, every score finite


def test_split_scorer_scores_every_candidate_once_in_order():
    """Slices of any width, fewer candidates than parts included, put back in their order."""
    from model_export.export import split_scorer

    calls = []

    def score(cand):  # 100 x the candidate's value + its position within the slice scored
        calls.append(tuple(cand.shape))
        return cand[..., 0] * 100.0 + tf.cast(tf.range(tf.shape(cand)[1]), tf.float32)[None]

    split = tf.function(split_scorer(score, 3), input_signature=[tf.TensorSpec([None, None, 1], tf.float32)])
    for width in (0, 1, 2, 3, 7, 64):
        cand = tf.reshape(tf.range(4 * width, dtype=tf.float32), [4, width, 1])
        value, position = np.divmod(split(cand).numpy().astype(np.int64), 100)
        np.testing.assert_array_equal(value, cand.numpy()[..., 0])
        cuts = [width * i // 3 for i in range(4)]  # 7 -> slices of 2, 2, 3
        within = np.concatenate([np.arange(b - a) for a, b in zip(cuts[:-1], cuts[1:], strict=True)])
        np.testing.assert_array_equal(position, np.broadcast_to(within, (4, width)))
    calls.clear()
    static = split_scorer(score, 3)(tf.ones([2, 2, 1]))  # fewer candidates than parts: one call
    assert static.shape == (2, 2) and calls == [(2, 2, 1)]
    calls.clear()
    split_scorer(score, 3)(tf.ones([2, 8, 1]))
    assert [c[1] for c in calls] == [2, 3, 3]  # cuts 0, 2, 5, 8


def test_export_rejects_a_score_split_below_one(workdir, evaluation):
    with pytest.raises(InputError, match="--score-split must be >= 1"):
        _module(workdir, evaluation, ExportConfig(**{**EXPORT_PARAMS, "score_split": 0}))


@pytest.mark.parametrize("stride", [0, 1, 3])
def test_beam_history_walks_as_the_replay(workdir, evaluation, exact_scores, stride):
    """beam_history (a thinned start layer + the behaviours as layer-0 entry points) scores and
    finds what walk.replay's replay of the same walk does, for every stride."""
    from nann_common.graph import load_graph
    from walk.replay import replay_user

    graph = load_graph(workdir / "index")
    module = _module(workdir, evaluation, ExportConfig(**{**EXPORT_PARAMS, "history_stride": stride}))
    ef, steps, k, layer = (20, 40), (1, 3), 10, START_LAYER
    rows = slice(0, 24)
    b = len(evaluation.histories[rows])
    inputs = _inputs(original_histories(evaluation, rows), k, ef, steps, "beam_history")
    out = module.retrieve(**{name: tf.constant(v) for name, v in inputs.items()})
    ids = np.searchsorted(evaluation.dataset.item_ids, out["item_ids"].numpy())
    overlap = []
    for u in range(b):
        seeds = evaluation.histories[u]
        if stride:
            start_nodes = graph.nodes[layer][::stride]
            top, n = replay_user(graph, exact_scores[u], list(ef), list(steps), layer, k, start_nodes, seeds)
        else:
            top, n = replay_user(graph, exact_scores[u], [ef[-1]], [steps[-1]], 0, k, seeds=seeds)
        assert n == out["scored"].numpy()[u], (u, stride)
        overlap.append(len(np.intersect1d(top, ids[u])) / k)
    assert np.mean(overlap) >= 0.99, (stride, np.mean(overlap))
    if stride == 0:  # the behaviours alone: fewer items than a start layer plus its walk
        assert out["scored"].numpy().max() < graph.num_items


@pytest.mark.parametrize("mode", ["beam", "beam_history"])
def test_a_layer_with_no_rounds_hands_its_entry_points_down(workdir, evaluation, exact_scores, mode):
    """T 0 on a middle layer: the start layer's best ef go straight to the layer below, as the
    replay walks it (for beam_history: with the behaviours, the replayed "cover>0+behaviours")."""
    from nann_common.graph import load_graph
    from walk.replay import replay_user

    graph = load_graph(workdir / "index")
    assert len(graph.nodes) >= 3, "the test graph needs a layer between the start layer and layer 0"
    ef, k, layer = (10, 20, 40), 10, 2
    config = ExportConfig(start_layer=layer, k=k, ef=ef, steps=(1, 1, 2), history_stride=1)
    module = _module(workdir, evaluation, config)
    rows = slice(0, 24)
    inputs = _inputs(original_histories(evaluation, rows), k, ef, (1, 0, 3), mode)
    out = module.retrieve(**{name: tf.constant(v) for name, v in inputs.items()})
    walked = module.retrieve(
        **{name: tf.constant(v) for name, v in _inputs(inputs["history"], k, ef, (1, 1, 3), mode).items()}
    )
    ids = np.searchsorted(evaluation.dataset.item_ids, out["item_ids"].numpy())
    overlap = []
    for u in range(len(ids)):
        seeds = evaluation.histories[u] if mode == "beam_history" else None
        top, n = replay_user(graph, exact_scores[u], list(ef), [1, 0, 3], layer, k, seeds=seeds)
        assert n == out["scored"].numpy()[u], (u, mode)
        overlap.append(len(np.intersect1d(top, ids[u])) / k)
        # The same query with one round on layer 1, against its own replay.
        _, n = replay_user(graph, exact_scores[u], list(ef), [1, 1, 3], layer, k, seeds=seeds)
        assert n == walked["scored"].numpy()[u], (u, mode)
    assert np.mean(overlap) >= 0.99, (mode, np.mean(overlap))
    # T 0 is not read as T 1: the two queries walk differently. (Which one scores more depends on the
    # model: entry points that skip layer 1 are worse, so layer 0 may expand more.)
    assert (out["scored"].numpy() != walked["scored"].numpy()).any()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"ef": (20,)}, "ef needs 2 values"),
        ({"k": 41}, r"k must be in 1..min\(ef of layer 0, items\) = 1..40"),
        ({"mode": "greedy"}, "mode must be one of"),
    ],
)
def test_evaluate_checks_queries_with_the_servers_contract(evaluation, kwargs, message):
    args = {"mode": "beam", "k": 10, **kwargs}
    with pytest.raises(InputError, match=message):
        evaluation.retrieve(args.pop("mode"), args.pop("k"), progress=False, **args)
