"""Training, checkpoints, exhaustive evaluation and the command line, on a tiny synthetic corpus."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from model_export import cli, data
from model_export.evaluate import EvalConfig, ExhaustiveSearcher, evaluate, load_workdir, recall_at_k
from model_export.model import ModelConfig, build_model, load_model_files
from model_export.synthetic import synthesize
from model_export.train import TrainConfig, make_optimizer, make_train_step, train
from nann_common.errors import ArtifactError, InputError

# FGSM on, so that training, checkpoints and resume are covered with the adversarial loss too.
TINY = TrainConfig(
    arch="din", epochs=3, batch_size=64, negatives=49, checkpoint_every=40, seed=3, fgsm_eps=3e-4
)


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "interactions.csv"
    synthesize(300, 300, path, seed=1, mean_length=25, show_progress=False)
    return path


@pytest.fixture(scope="module")
def tiny_dataset(tiny_csv, tmp_path_factory) -> data.Dataset:
    directory = tmp_path_factory.mktemp("prepared") / "dataset"
    data.save_dataset(data.load_dataset_from_file(tiny_csv), directory)
    return data.load_dataset(directory)


def _workdir_with_dataset(tmp_path: Path, dataset: data.Dataset) -> Path:
    data.save_dataset(dataset, tmp_path / "dataset")
    return tmp_path


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory) -> Path:
    workdir = _workdir_with_dataset(tmp_path_factory.mktemp("work"), tiny_dataset)
    train(data.load_dataset(workdir / "dataset"), workdir, TINY)
    return workdir


def test_training_writes_versioned_artifacts_with_provenance(trained, tiny_dataset):
    for kind in ("model", "embeddings"):
        meta = json.loads((trained / kind / "meta.json").read_text())
        assert meta["kind"] == kind
        assert meta["packages"]["tensorflow"] == tf.__version__
        assert all(len(f["sha256"]) == 64 for f in meta["files"].values())
    model_meta = json.loads((trained / "model" / "meta.json").read_text())
    assert model_meta["params"]["arch"] == "din" and model_meta["params"]["fgsm_eps"] == TINY.fgsm_eps
    assert model_meta["training"]["examples_per_second"] > 0
    item_e = np.load(trained / "embeddings" / "item_embeddings.npy")
    assert item_e.shape == (tiny_dataset.num_items, 64) and np.isfinite(item_e).all()
    np.testing.assert_array_equal(np.load(trained / "embeddings" / "item_ids.npy"), tiny_dataset.item_ids)
    assert any((trained / "logs").iterdir()), "no TensorBoard event file"


def test_checkpoint_reloads_to_identical_scores(trained, tiny_dataset):
    exported = load_model_files(trained / "model")
    fresh = build_model(exported.config, tiny_dataset.item_category)
    ckpt = tf.train.Checkpoint(model=fresh)
    ckpt.restore(tf.train.latest_checkpoint(str(trained / "train" / "checkpoints"))).expect_partial()
    _, histories, _ = tiny_dataset.eval_examples("test", TINY.max_len)
    items = np.tile(np.arange(tiny_dataset.num_items, dtype=np.int32), (len(histories), 1))
    np.testing.assert_array_equal(
        fresh.score_items(histories, items).numpy(), exported.score_items(histories, items).numpy()
    )


def test_resumed_training_matches_uninterrupted_training(trained, tiny_dataset, tmp_path, caplog):
    """One epoch, stopped, then resumed to TINY's three ends where the `trained` run of three did."""
    one_epoch = TrainConfig(**{**TINY.__dict__, "epochs": 1})
    straight = trained
    resumed = _workdir_with_dataset(tmp_path / "resumed", tiny_dataset)
    train(tiny_dataset, resumed, one_epoch)
    with caplog.at_level(logging.INFO, logger="model_export.train"):
        train(tiny_dataset, resumed, TINY)
    assert "resumed from" in caplog.text
    a = np.load(straight / "embeddings" / "item_embeddings.npy")
    b = np.load(resumed / "embeddings" / "item_embeddings.npy")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_other_parameters_do_not_resume_silently(trained, tiny_dataset):
    with pytest.raises(ArtifactError, match="other parameters.*arch: 'din' -> 'dnn'"):
        train(tiny_dataset, trained, TrainConfig(**{**TINY.__dict__, "arch": "dnn"}))


@pytest.mark.parametrize("user_batch,item_chunk", [(1, 7), (5, 64), (16, 4096)])
def test_exhaustive_search_equals_brute_force(trained, user_batch, item_chunk):
    dataset, model, item_e = load_workdir(trained)
    _, histories, _ = dataset.eval_examples("test", TINY.max_len)
    k = 20
    ids, scores = ExhaustiveSearcher(model, item_e, user_batch, item_chunk).search(
        histories, k, progress=False
    )
    items = np.tile(np.arange(dataset.num_items, dtype=np.int32), (len(histories), 1))
    brute = model.score_items(histories, items).numpy()
    expected = np.argsort(-brute, axis=1, kind="stable")[:, :k]
    np.testing.assert_allclose(scores, np.take_along_axis(brute, expected, 1), rtol=1e-5, atol=1e-5)
    # Same sets; order may differ only between equal scores.
    assert all(set(a) == set(b) for a, b in zip(ids, expected, strict=True))


def test_trained_model_beats_chance(trained):
    """A model that learned nothing would score recall@k near k/N; training must clear it by far."""
    dataset, model, item_e = load_workdir(trained)
    _, histories, targets = dataset.eval_examples("valid", TINY.max_len)
    k = 40
    trained_recall = recall_at_k(
        ExhaustiveSearcher(model, item_e).search(histories, k, False)[0], targets
    ).mean()
    chance = k / dataset.num_items
    assert trained_recall > 2.5 * chance, (trained_recall, chance)


def test_evaluate_rejects_k_outside_the_corpus(trained, tiny_dataset):
    with pytest.raises(InputError, match=rf"k must be in 1..{tiny_dataset.num_items}"):
        evaluate(trained, EvalConfig(k=tiny_dataset.num_items + 1), progress=False)


def test_damaged_weights_fail_loudly(trained, tmp_path):
    import shutil

    copy = tmp_path / "work"
    shutil.copytree(trained, copy)
    weights = copy / "model" / "model.weights.h5"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="model.weights.h5 does not match its recorded sha256"):
        load_workdir(copy)


# -- command line -----------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["synthesize"], ["train"], ["evaluate"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: python -m model_export" in capsys.readouterr().out


def test_cli_train_then_evaluate_json(tiny_csv, tmp_path, capsys):
    workdir = tmp_path / "work"
    assert (
        cli.main(
            [
                "train",
                "--interactions",
                str(tiny_csv),
                "--workdir",
                str(workdir),
                "--arch",
                "two_sided",
                "--epochs",
                "1",
                "--negatives",
                "19",
                "--batch-size",
                "64",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cli.main(["evaluate", "--workdir", str(workdir), "--k", "50", "--users", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["users"] == 5 and result["k"] == 50 and result["mode"] == "exhaustive"
    assert result["items"] == len(np.load(workdir / "embeddings" / "item_ids.npy"))
    assert 0.0 <= result["recall_all"] <= 1.0
    assert (workdir / "eval" / "exhaustive-test-k50-users5" / "meta.json").is_file()


def test_cli_bad_input_is_one_clear_line_and_leaves_no_workdir(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3,pv,1511544070\n1,2,3,look,1511544071\n")
    workdir = tmp_path / "work"
    assert cli.main(["train", "--interactions", str(bad), "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}:2: unknown behavior_type 'look'" in err and "--skip-bad-rows" in err
    assert not workdir.exists()


def test_cli_rejects_bad_training_flags(tiny_csv, tmp_path, capsys):
    assert (
        cli.main(
            ["train", "--interactions", str(tiny_csv), "--workdir", str(tmp_path / "w"), "--fgsm-eps", "-1"]
        )
        == 2
    )
    assert "--fgsm-eps must be >= 0" in capsys.readouterr().err
    assert (
        cli.main(
            ["train", "--interactions", str(tiny_csv), "--workdir", str(tmp_path / "w"), "--fgsm-weight", "0"]
        )
        == 2
    )
    assert "--fgsm-weight must be > 0" in capsys.readouterr().err


def test_cli_refuses_a_changed_input_for_a_prepared_workdir(tiny_csv, tmp_path, capsys):
    csv = tmp_path / "interactions.csv"
    csv.write_bytes(tiny_csv.read_bytes())
    args = [
        "train",
        "--interactions",
        str(csv),
        "--workdir",
        str(tmp_path / "w"),
        "--arch",
        "two_sided",
        "--epochs",
        "1",
        "--negatives",
        "9",
        "--batch-size",
        "256",
    ]
    assert cli.main(args) == 0
    assert cli.main(args) == 0  # same input and parameters: the dataset is reused, training resumes
    with csv.open("a") as f:
        f.write("999999,1,1,pv,1511544070\n")
    capsys.readouterr()
    assert cli.main(args) == 2
    assert "was prepared from another input or with other parameters" in capsys.readouterr().err


def test_examples_per_epoch_samples_distinct_training_positions(tiny_dataset):
    from model_export.train import BatchMaker, noise_distribution

    config = TrainConfig(**{**TINY.__dict__, "examples_per_epoch": 100, "batch_size": 32})
    maker = BatchMaker(tiny_dataset, config, noise_distribution(tiny_dataset))
    assert maker.examples_per_epoch == 100 and maker.batches_per_epoch == 4
    batches = [tuple(t.numpy() for t in b) for b in maker.tf_dataset(epoch=0, first_batch=0)]
    positives = np.concatenate([pos for _, pos, _ in batches])
    assert len(positives) == 100
    again = np.concatenate([pos.numpy() for _, pos, _ in maker.tf_dataset(epoch=0, first_batch=0)])
    np.testing.assert_array_equal(positives, again)  # seeded: the same sample for the same epoch
    other = np.concatenate([pos.numpy() for _, pos, _ in maker.tf_dataset(epoch=1, first_batch=0)])
    assert not np.array_equal(positives, other)  # a fresh sample each epoch
    everything = BatchMaker(
        tiny_dataset,
        TrainConfig(**{**TINY.__dict__, "examples_per_epoch": 0}),
        noise_distribution(tiny_dataset),
    )
    assert everything.examples_per_epoch == len(tiny_dataset.train_positions())


def _two_lazy_and_dense_steps(rows_1, rows_2):
    """Applies the same two gradients to a table with LazyAdam (sparse) and Keras' Adam (densified).

    The reference gets the gradient as a dense tensor: Keras' Adam given IndexedSlices with a
    repeated row squares each slice before summing them, which is not Adam's update.
    """
    import keras

    from model_export.train import LazyAdam

    start = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
    tables = {}
    for name, optimizer in (("lazy", LazyAdam(learning_rate=0.1)), ("dense", keras.optimizers.Adam(0.1))):
        var = tf.Variable(start)
        optimizer.build([var])
        after = []
        for rows in (rows_1, rows_2):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.gather(var, rows) ** 2)
            grad = tape.gradient(loss, var)
            assert isinstance(grad, tf.IndexedSlices)
            optimizer.apply_gradients([(grad if name == "lazy" else tf.convert_to_tensor(grad), var)])
            after.append(var.numpy().copy())
        tables[name] = after
    return start, tables


def test_fgsm_weight_multiplies_the_adversarial_loss_only(tiny_dataset):
    config = ModelConfig(num_items=tiny_dataset.num_items, num_categories=tiny_dataset.num_categories)
    model = build_model(config, tiny_dataset.item_category)
    log_q = tf.fill([tiny_dataset.num_items], np.float32(-np.log(tiny_dataset.num_items)))
    rng = np.random.default_rng(0)
    history = tf.constant(rng.integers(0, tiny_dataset.num_items, (8, 12)), tf.int32)
    pos = tf.constant(rng.integers(0, tiny_dataset.num_items, 8), tf.int32)
    neg = tf.constant(rng.integers(0, tiny_dataset.num_items, 9), tf.int32)
    out = {}
    for weight in (1.0, 50.0):
        # A learning rate of 1e-12: the steps leave the weights as they were, so both see one model.
        step = make_train_step(model, make_optimizer("adam", 1e-12), log_q, 0.05, 12, 9, fgsm_weight=weight)
        out[weight] = [float(x) for x in step(history, pos, neg)]
    (total1, nce1, aux1), (total50, nce50, aux50) = out[1.0], out[50.0]
    assert 49.0 * aux1 > 1e-4 * total1, "L_AUX too small here to tell the weight apart"
    assert aux50 == pytest.approx(aux1, rel=1e-3) and nce50 == pytest.approx(nce1, rel=1e-5)
    assert total1 == pytest.approx(nce1 + aux1, rel=1e-6)
    assert total50 == pytest.approx(nce50 + 50.0 * aux50, rel=1e-6)


def test_lazy_adam_updates_only_the_touched_rows():
    # Row 1 is looked up twice in the first batch: its gradients must add up, as in Adam.
    start, tables = _two_lazy_and_dense_steps(tf.constant([1, 1, 4]), tf.constant([2, 4]))
    lazy, dense = tables["lazy"], tables["dense"]
    # First step: Adam's moments of untouched rows are zero, so both agree everywhere (to float
    # rounding; each step moves a row by about the learning rate, 0.1).
    np.testing.assert_allclose(lazy[0], dense[0], atol=1e-5)
    assert not np.allclose(lazy[0][[1, 4]], start[[1, 4]])
    # Second step: rows 2 and 4 follow Adam; row 1 (not in this batch) stays put under
    # LazyAdam while dense Adam keeps moving it on its decayed momentum.
    np.testing.assert_allclose(lazy[1][[2, 4]], dense[1][[2, 4]], atol=1e-5)
    np.testing.assert_array_equal(lazy[1][1], lazy[0][1])
    assert not np.allclose(dense[1][1], dense[0][1])
    np.testing.assert_array_equal(lazy[1][[0, 3, 5]], start[[0, 3, 5]])


def test_embedding_tables_get_sparse_gradients(tiny_dataset):
    # LazyAdam's saving depends on it: a dense gradient would make every step touch every row.
    config = ModelConfig(num_items=tiny_dataset.num_items, num_categories=tiny_dataset.num_categories)
    model = build_model(config, tiny_dataset.item_category)
    with tf.GradientTape() as tape:
        hist_e, mask = model.behaviour_embeddings(tf.constant([[0, 1, -1]]), training=True)
        e = model.item_embeddings(tf.constant([2, 3]), training=True)
        loss = tf.reduce_sum(model.score(model.user_state(hist_e, mask), e[None]))
    tables = [model.item_table.embeddings, model.category_table.embeddings]
    grads = tape.gradient(loss, tables)
    assert all(isinstance(g, tf.IndexedSlices) for g in grads)


def test_training_without_a_terminal_logs_its_progress(tiny_dataset, tmp_path, caplog, monkeypatch):
    # Under nohup or a scheduler tqdm draws nothing; the log then says how far training got.
    monkeypatch.setattr("model_export.train.PROGRESS_LOG_SECONDS", 0)
    config = TrainConfig(**{**TINY.__dict__, "epochs": 1, "examples_per_epoch": 128})
    with caplog.at_level(logging.INFO, logger="model_export.train"):
        train(tiny_dataset, _workdir_with_dataset(tmp_path, tiny_dataset), config)
    assert "epoch 1: batch 1/2, loss" in caplog.text
    assert "epoch 1: batch 2/2, loss" in caplog.text
