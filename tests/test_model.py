"""The scorer and its losses: padding, factoring, FGSM, log-Q correction."""

import numpy as np
import pytest
import tensorflow as tf

from model_export import losses
from model_export.model import ARCHS, PAD, ModelConfig, build_model, load_model_files, save_model_files

NUM_ITEMS, NUM_CATEGORIES = 300, 7


def make_model(arch: str, seed: int = 0):
    tf.keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    return build_model(
        ModelConfig(NUM_ITEMS, NUM_CATEGORIES, arch=arch), rng.integers(0, NUM_CATEGORIES, NUM_ITEMS)
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_never_changes_a_score(arch):
    model = make_model(arch)
    behaviours = [5, 17, 42, 17, 250]
    items = np.arange(0, NUM_ITEMS, 3, dtype=np.int32)[None]
    reference = model.score_items(np.array([behaviours], np.int32), items).numpy()
    variants = [
        behaviours + [PAD] * 45,  # right padding to the training length
        [PAD, PAD] + behaviours[:2] + [PAD] + behaviours[2:] + [PAD] * 7,  # padding anywhere
    ]
    for history in variants:
        scores = model.score_items(np.array([history], np.int32), items).numpy()
        np.testing.assert_allclose(scores, reference, rtol=1e-5, atol=1e-5)
    # The test can fail: a different behaviour does change the scores.
    other = model.score_items(np.array([behaviours[:-1] + [251]], np.int32), items).numpy()
    assert not np.allclose(other, reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_factored_scoring_matches_per_user_scoring(arch):
    """A batch of users scored together equals each user scored alone (no cross-talk)."""
    model = make_model(arch)
    rng = np.random.default_rng(1)
    history = rng.integers(0, NUM_ITEMS, (4, 10)).astype(np.int32)
    history[1, 6:] = PAD
    items = rng.integers(0, NUM_ITEMS, (4, 25)).astype(np.int32)
    together = model.score_items(history, items).numpy()
    alone = np.concatenate(
        [model.score_items(history[i : i + 1], items[i : i + 1]).numpy() for i in range(4)]
    )
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)


def _state_and_candidates(model, seed: int, users: int, labels: int):
    """A user state for random histories and random candidate e_v [users, labels, D]."""
    rng = np.random.default_rng(seed)
    history = rng.integers(0, NUM_ITEMS, (users, 8)).astype(np.int32)
    hist_e, mask = model.behaviour_embeddings(history)
    state = model.user_state(hist_e, mask)
    cand = tf.constant(rng.normal(size=(users, labels, model.config.item_dim)).astype(np.float32))
    return state, cand


@pytest.mark.parametrize("arch", ARCHS)
def test_fgsm_delta_has_max_norm_eps_and_the_gradient_sign(arch):
    model = make_model(arch)
    state, cand = _state_and_candidates(model, 2, 3, 5)
    eps = 3e-4
    scores, delta = losses.scores_and_fgsm_delta(lambda c: model.score(state, c), cand, eps)
    delta = delta.numpy()
    np.testing.assert_allclose(scores.numpy(), model.score(state, cand).numpy(), rtol=1e-6)
    assert np.abs(delta).max() == pytest.approx(eps)
    assert set(np.unique(np.abs(delta))) <= {0.0, np.float32(eps)}

    # Central finite differences of s_u(e_v), one coordinate at a time, as the reference gradient,
    # at two step sizes: where they disagree in sign the score is not smooth there (PReLU kinks).
    base = cand.numpy().astype(np.float64)

    def finite_difference(h):
        grad = np.zeros_like(base)
        for d in range(base.shape[-1]):
            step = np.zeros_like(base)
            step[..., d] = h
            up = model.score(state, tf.constant(base + step, tf.float32)).numpy()
            down = model.score(state, tf.constant(base - step, tf.float32)).numpy()
            grad[..., d] = (up - down) / (2 * h)
        return grad

    coarse, fine = finite_difference(1e-3), finite_difference(2.5e-4)
    clear = (np.abs(coarse) > 2e-3) & (np.sign(coarse) == np.sign(fine))
    assert clear.mean() > 0.5
    # A kink closer than the step can still fool both differences; allow 1% of coordinates.
    agree = np.sign(delta[clear]) == np.sign(coarse[clear])
    assert agree.mean() >= 0.99, f"FGSM sign disagrees with the gradient on {np.sum(~agree)} coordinates"


def test_fgsm_on_the_loss_lowers_the_positive_and_raises_the_noise_labels():
    # dL/ds is p - 1 < 0 for the positive (column 0) and p > 0 for each noise label, so the loss
    # direction's sign is eq. 6's flipped on the positive and kept on the noise labels.
    model = make_model("din")
    state, cand = _state_and_candidates(model, 4, 3, 6)
    pos, neg = tf.constant([1, 2, 3]), tf.constant([4, 5, 6, 7, 8])
    log_q = tf.zeros([3, 6])

    def loss(scores):
        return losses.sampled_softmax_loss(losses.corrected_logits(scores, log_q, pos, neg))

    _, on_score = losses.scores_and_fgsm_delta(lambda c: model.score(state, c), cand, 0.01)
    _, on_loss = losses.scores_and_fgsm_delta(lambda c: model.score(state, c), cand, 0.01, loss)
    on_score, on_loss = on_score.numpy(), on_loss.numpy()
    assert np.abs(on_loss).max() == pytest.approx(0.01)
    np.testing.assert_array_equal(on_loss[:, 0], -on_score[:, 0])
    np.testing.assert_array_equal(on_loss[:, 1:], on_score[:, 1:])


def test_aux_loss_is_zero_at_eps_zero_and_positive_otherwise():
    model = make_model("din")
    state, cand = _state_and_candidates(model, 3, 4, 6)
    for eps, expect_zero in ((0.0, True), (0.05, False)):
        scores, delta = losses.scores_and_fgsm_delta(lambda c: model.score(state, c), cand, eps)
        aux = float(losses.aux_kl_loss(scores, model.score(state, cand + delta)))
        assert (aux == 0.0) if expect_zero else (aux > 1e-8), (eps, aux)


def test_corrected_logits_subtract_log_q_and_mask_accidental_hits():
    scores = tf.constant([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    log_q = tf.math.log(tf.constant([[0.5, 0.25, 0.25], [0.1, 0.25, 0.25]]))
    pos = tf.constant([7, 9])
    neg = tf.constant([9, 3])
    logits = losses.corrected_logits(scores, log_q, pos, neg).numpy()
    np.testing.assert_allclose(logits[0], [1 - np.log(0.5), 2 - np.log(0.25), 3 - np.log(0.25)], rtol=1e-6)
    assert logits[1, 1] < -1e8  # noise item 9 is user 1's positive: not a negative
    np.testing.assert_allclose(logits[1, [0, 2]], [4 - np.log(0.1), 6 - np.log(0.25)], rtol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_model_files_reload_to_identical_scores(arch, tmp_path):
    model = make_model(arch)
    # Move the BatchNorm statistics away from their initial values so the test sees them.
    model.item_embeddings(np.arange(NUM_ITEMS, dtype=np.int32), training=True)
    history = np.array([[1, 2, 3, PAD], [4, 5, PAD, PAD]], np.int32)
    items = np.tile(np.arange(NUM_ITEMS, dtype=np.int32), (2, 1))
    save_model_files(model, tmp_path)
    reloaded = load_model_files(tmp_path)
    np.testing.assert_array_equal(
        reloaded.score_items(history, items).numpy(), model.score_items(history, items).numpy()
    )
