"""Training losses: sampled softmax with log-Q correction, and the FGSM auxiliary loss.

L_all = L_NCE + L_AUX (DESIGN.md section 2, eq. 5-6). For each training
example the labels are the true next item plus K noise items drawn from the
unigram (popularity) distribution Q and shared by the batch. Logits are
s_u(e_v) - log Q(v) (log-Q correction, so popular noise items are not
over-penalised); a noise draw equal to the example's positive is masked out.
L_AUX is the KL divergence between the softmax over those 1+K labels with
clean e_v and with e_v + delta, where delta = eps * sign(grad_{e_v} s_u(e_v))
is held fixed. Training may weight L_AUX (the paper: weight 1) and take delta's sign
from the NCE loss's gradient instead of the score's (FGSM as Goodfellow et al.).
"""

from __future__ import annotations

import tensorflow as tf

_MASKED = -1e9


def corrected_logits(scores, log_q, pos_ids, neg_ids):
    """Applies log-Q correction and masks accidental hits.

    Args:
      scores: [B, 1+K] scores, column 0 the positive.
      log_q: [B, 1+K] log of the sampling probability of each label.
      pos_ids: [B] positive item ids.
      neg_ids: [K] noise item ids shared by the batch.
    Returns:
      [B, 1+K] logits for a softmax whose correct class is column 0.
    """
    logits = scores - log_q
    hit = tf.equal(pos_ids[:, None], neg_ids[None, :])
    hit = tf.concat([tf.zeros_like(hit[:, :1]), hit], axis=1)
    return tf.where(hit, tf.constant(_MASKED, logits.dtype), logits)


def sampled_softmax_loss(logits):
    """Mean cross-entropy with the positive in column 0."""
    labels = tf.zeros(tf.shape(logits)[:1], tf.int32)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def scores_and_fgsm_delta(score_fn, cand_e, eps: float, objective=None):
    """Clean scores and the FGSM perturbation of eq. 6 from one forward pass.

    delta = eps * sign(d s_u(e_v) / d e_v), held fixed (no gradient flows through it).
    With ``objective`` (scores -> scalar, e.g. the batch's NCE loss), the sign is that of the
    objective's gradient instead: Goodfellow et al.'s FGSM on the loss, which raises the noise
    labels' scores and lowers the positive's, where eq. 6 raises every label's score.

    Args:
      score_fn: maps candidates [B, N, D] to scores [B, N], each score depending
        only on its own candidate row (true of :meth:`NannModel.score`).
      cand_e: [B, N, D] candidate e_v.
      eps: max-norm of the perturbation.
      objective: None for eq. 6, else the scalar whose gradient sign makes delta.
    Returns:
      (scores [B, N], delta [B, N, D] with entries in {-eps, 0, +eps}).
    """
    with tf.GradientTape() as tape:
        tape.watch(cand_e)
        scores = score_fn(cand_e)
        target = scores if objective is None else objective(scores)
    grad = tape.gradient(target, cand_e)
    return scores, tf.stop_gradient(eps * tf.sign(grad))


def aux_kl_loss(clean_logits, adv_logits):
    """Mean over examples of KL(softmax(clean) || softmax(adv)) over the 1+K labels (eq. 5)."""
    p = tf.nn.softmax(clean_logits, axis=-1)
    kl = tf.reduce_sum(p * (tf.nn.log_softmax(clean_logits, -1) - tf.nn.log_softmax(adv_logits, -1)), -1)
    return tf.reduce_mean(kl)
