"""Training: tf.data input pipeline, sampled softmax + FGSM loss, checkpoints and resume.

A workdir holds one training run:
  dataset/      the prepared interactions (data.py)
  train/        run parameters and tf.train checkpoints (resume state)
  logs/         TensorBoard event files
  model/        the trained model: weights, config, item->category table
  embeddings/   e_v of every item, the input of the index builder, and the corpus tables the
                export reads (item categories, category labels, sample histories)
Each artifact directory carries meta.json with provenance and checksums.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import shutil
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from tqdm import tqdm

from model_export import losses
from model_export.data import Dataset
from model_export.model import ModelConfig, NannModel, build_model, save_model_files
from nann_common import artifacts
from nann_common.errors import ArtifactError

logger = logging.getLogger(__name__)

OPTIMIZERS = ("lazy_adam", "adam")
PROGRESS_LOG_SECONDS = 60  # without a terminal (tqdm disabled), training logs its progress this often


class LazyAdam(keras.optimizers.Adam):
    """Adam that updates only the rows of an embedding table that a batch touched.

    Dense Adam decays the moments of every row at every step. The gradient of an
    embedding lookup is sparse (``tf.IndexedSlices``), but Keras' Adam turns it dense,
    so each batch rewrites the whole id table and both of its moment tables: at 1.37M
    items that is about 0.5 GB of memory traffic per batch whatever the batch size.
    Here the moments and weights of the touched rows follow Adam's update and the
    other rows stay as they are (TensorFlow 1's LazyAdam). Dense variables (the MLPs)
    get plain Adam.
    """

    def update_step(self, gradient, variable, learning_rate):
        if not isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        rows, slot = tf.unique(gradient.indices)
        grad = tf.math.unsorted_segment_sum(tf.cast(gradient.values, dtype), slot, tf.shape(rows)[0])
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        alpha = tf.cast(learning_rate, dtype) * tf.sqrt(1 - beta_2**step) / (1 - beta_1**step)
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        m_rows = beta_1 * tf.gather(m.value, rows) + (1 - beta_1) * grad
        v_rows = beta_2 * tf.gather(v.value, rows) + (1 - beta_2) * tf.square(grad)
        self.assign(m, tf.IndexedSlices(m_rows, rows))
        self.assign(v, tf.IndexedSlices(v_rows, rows))
        self.assign_sub(variable, tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + self.epsilon), rows))


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    if name == "lazy_adam":
        return LazyAdam(learning_rate=learning_rate)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training parameters. ``epochs`` is a target, so a resumed run may raise it."""

    arch: str = "din"
    epochs: int = 2
    batch_size: int = 128
    negatives: int = 199
    fgsm_eps: float = 0.0  # off: no measurable effect on the default graph (docs/fgsm.md)
    fgsm_weight: float = 1.0  # L_all = L_NCE + fgsm_weight * L_AUX (the paper: 1)
    fgsm_direction: str = "score"  # delta's sign from grad s_u(e_v) (eq. 6) or from grad L_NCE ("loss")
    learning_rate: float = 3e-3
    max_len: int = 50
    seed: int = 0
    checkpoint_every: int = 500
    examples_per_epoch: int = 0  # 0: every training position; else a seeded sample of this many per epoch
    optimizer: str = "lazy_adam"

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.negatives >= 1, f"--negatives must be >= 1, got {self.negatives}"),
            (self.fgsm_eps >= 0, f"--fgsm-eps must be >= 0 (0 disables FGSM), got {self.fgsm_eps}"),
            (self.fgsm_weight > 0, f"--fgsm-weight must be > 0, got {self.fgsm_weight}"),
            (
                self.fgsm_direction in ("score", "loss"),
                f"--fgsm-direction must be score or loss, got {self.fgsm_direction!r}",
            ),
            (self.learning_rate > 0, f"--lr must be > 0, got {self.learning_rate}"),
            (self.max_len >= 1, f"--max-len must be >= 1, got {self.max_len}"),
            (self.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {self.checkpoint_every}"),
            (
                self.examples_per_epoch >= 0,
                f"--examples-per-epoch must be >= 0, got {self.examples_per_epoch}",
            ),
            (
                self.optimizer in OPTIMIZERS,
                f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def run_identity(self) -> dict:
        """Parameters that must match for a checkpoint to be resumed."""
        identity = {
            k: v for k, v in dataclasses.asdict(self).items() if k not in ("epochs", "checkpoint_every")
        }
        # The FGSM options arrived later: at their defaults they stay out, so earlier runs resume.
        for key, default in (("fgsm_weight", 1.0), ("fgsm_direction", "score")):
            if identity[key] == default:
                del identity[key]
        return identity


def noise_distribution(dataset: Dataset) -> np.ndarray:
    """Unigram noise: training-user behaviour counts, plus one so every item can be drawn.

    The add-one floor matters: an item never drawn as noise is never pushed
    down, and with an untrained id embedding it could float into every user's
    exhaustive top-M.
    """
    counts = dataset.item_counts(dataset.train_users).astype(np.float64) + 1.0
    return counts / counts.sum()


class BatchMaker:
    """Builds training batches with numpy; deterministic in (seed, epoch, batch index).

    Determinism per batch index is what lets a resumed run continue mid-epoch
    with exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, dataset: Dataset, config: TrainConfig, noise: np.ndarray):
        self.dataset = dataset
        self.config = config
        self.positions = dataset.train_positions()
        self.cdf = np.cumsum(noise)
        self.cdf[-1] = 1.0

    @property
    def examples_per_epoch(self) -> int:
        n = self.config.examples_per_epoch
        return min(n, len(self.positions)) if n else len(self.positions)

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.examples_per_epoch // self.config.batch_size)

    def batch(self, order: np.ndarray, epoch: int, index: int):
        """(histories [b, max_len], positives [b], shared noise labels [K]) of one batch."""
        b = self.config.batch_size
        positions = order[index * b : (index + 1) * b]
        rng = np.random.default_rng([self.config.seed, epoch, index, 1])
        negatives = np.searchsorted(self.cdf, rng.random(self.config.negatives), side="right")
        negatives = np.minimum(negatives, len(self.cdf) - 1).astype(np.int32)
        history = self.dataset.histories(positions, self.config.max_len).astype(np.int32)
        return history, self.dataset.seq_items[positions].astype(np.int32), negatives

    def tf_dataset(self, epoch: int, first_batch: int) -> tf.data.Dataset:
        """Batches ``first_batch..end`` of ``epoch``, prepared ahead of the train step."""
        permutation = np.random.default_rng([self.config.seed, epoch]).permutation(len(self.positions))
        order = self.positions[permutation[: self.examples_per_epoch]]

        def make(i):
            hist, pos, neg = tf.numpy_function(
                lambda index: self.batch(order, epoch, int(index)),
                [i],
                [tf.int32, tf.int32, tf.int32],
                stateful=False,
            )
            hist.set_shape([None, self.config.max_len])
            pos.set_shape([None])
            neg.set_shape([self.config.negatives])
            return hist, pos, neg

        ds = tf.data.Dataset.range(first_batch, self.batches_per_epoch)
        return ds.map(make, num_parallel_calls=2, deterministic=True).prefetch(4)


def make_train_step(
    model: NannModel,
    optimizer,
    log_q_table,
    fgsm_eps: float,
    max_len: int,
    negatives: int,
    fgsm_weight: float = 1.0,
    fgsm_direction: str = "score",
):
    """Returns the compiled train step (a tf.function) for one batch."""

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, max_len], tf.int32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([negatives], tf.int32),
        ]
    )
    def step(history, pos_ids, neg_ids):
        batch = tf.shape(pos_ids)[0]
        log_q = tf.concat(
            [
                tf.gather(log_q_table, pos_ids)[:, None],
                tf.tile(tf.gather(log_q_table, neg_ids)[None, :], [batch, 1]),
            ],
            axis=1,
        )
        with tf.GradientTape() as tape:
            hist_e, mask = model.behaviour_embeddings(history, training=True)
            e = model.item_embeddings(tf.concat([pos_ids, neg_ids], 0), training=True)
            e_pos, e_neg = e[:batch], e[batch:]
            cand = tf.concat([e_pos[:, None, :], tf.tile(e_neg[None], [batch, 1, 1])], axis=1)
            state = model.user_state(hist_e, mask)
            if fgsm_eps > 0:
                objective = None
                if fgsm_direction == "loss":

                    def objective(s):
                        return losses.sampled_softmax_loss(
                            losses.corrected_logits(s, log_q, pos_ids, neg_ids)
                        )

                scores, delta = losses.scores_and_fgsm_delta(
                    lambda c: model.score(state, c), cand, fgsm_eps, objective
                )
            else:
                scores = model.score(state, cand)
            logits = losses.corrected_logits(scores, log_q, pos_ids, neg_ids)
            nce = losses.sampled_softmax_loss(logits)
            if fgsm_eps > 0:
                adv = losses.corrected_logits(model.score(state, cand + delta), log_q, pos_ids, neg_ids)
                aux = losses.aux_kl_loss(logits, adv)
            else:
                aux = tf.constant(0.0)
            loss = nce + fgsm_weight * aux
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss, nce, aux

    return step


def _check_run_identity(train_dir: Path, identity: dict, restart: bool) -> None:
    path = train_dir / "run.json"
    if path.exists() and not restart:
        previous = json.loads(path.read_text())
        if previous != identity:
            diff = ", ".join(
                f"{k}: {previous.get(k)!r} -> {identity.get(k)!r}"
                for k in sorted(set(previous) | set(identity))
                if previous.get(k) != identity.get(k)
            )
            raise ArtifactError(
                f"{train_dir} holds checkpoints of a run with other parameters ({diff}); "
                "use another --workdir, or pass --restart to discard them"
            )


def train(dataset: Dataset, workdir: str | Path, config: TrainConfig, restart: bool = False) -> dict:
    """Trains (or resumes) a model in ``workdir`` and writes the model and embeddings artifacts.

    Returns:
      A summary dict: throughput, peak memory, last losses, artifact paths.
    """
    workdir = Path(workdir)
    train_dir = workdir / "train"
    identity = {**config.run_identity(), "dataset_digest": artifacts.digest(dataset.meta)}
    _check_run_identity(train_dir, identity, restart)
    if restart and train_dir.exists():
        shutil.rmtree(train_dir)
    train_dir.mkdir(parents=True, exist_ok=True)
    (train_dir / "run.json").write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")

    keras.utils.set_random_seed(config.seed)
    model_config = ModelConfig(
        num_items=dataset.num_items, num_categories=dataset.num_categories, arch=config.arch
    )
    model = build_model(model_config, dataset.item_category)
    optimizer = make_optimizer(config.optimizer, config.learning_rate)
    optimizer.build(model.trainable_variables)
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    batch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var, batch=batch_var)
    manager = tf.train.CheckpointManager(ckpt, str(train_dir / "checkpoints"), max_to_keep=2)
    if manager.latest_checkpoint:
        ckpt.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        logger.info(
            "resumed from %s (epoch %d, batch %d)",
            manager.latest_checkpoint,
            int(epoch_var.numpy()) + 1,
            int(batch_var.numpy()),
        )

    noise = noise_distribution(dataset)
    batches = BatchMaker(dataset, config, noise)
    step = make_train_step(
        model,
        optimizer,
        tf.constant(np.log(noise), tf.float32),
        config.fgsm_eps,
        config.max_len,
        config.negatives,
        config.fgsm_weight,
        config.fgsm_direction,
    )
    writer = tf.summary.create_file_writer(str(workdir / "logs"))
    logger.info(
        "training %s on %d examples/epoch (%d users, %d items), batch %d, %d noise labels, fgsm eps %g",
        config.arch,
        batches.examples_per_epoch,
        len(dataset.train_users),
        dataset.num_items,
        config.batch_size,
        config.negatives,
        config.fgsm_eps,
    )

    examples, seconds, loss = 0, 0.0, (float("nan"),) * 3
    while int(epoch_var.numpy()) < config.epochs:
        epoch = int(epoch_var.numpy())
        first = int(batch_var.numpy())
        bar = tqdm(
            total=batches.batches_per_epoch,
            initial=first,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            unit="batch",
            disable=None,
        )
        started = last_log = time.perf_counter()
        epoch_examples = 0
        for i, (hist, pos, neg) in enumerate(batches.tf_dataset(epoch, first), start=first):
            loss = [float(x) for x in step(hist, pos, neg)]
            epoch_examples += int(pos.shape[0])
            batch_var.assign(i + 1)
            global_step = epoch * batches.batches_per_epoch + i + 1
            if global_step % 20 == 0:
                with writer.as_default(step=global_step):
                    tf.summary.scalar("loss/total", loss[0])
                    tf.summary.scalar("loss/nce", loss[1])
                    tf.summary.scalar("loss/aux", loss[2])
                    tf.summary.scalar("examples_per_second", epoch_examples / (time.perf_counter() - started))
            if (i + 1) % config.checkpoint_every == 0:
                manager.save(checkpoint_number=global_step)
            bar.set_postfix(loss=f"{loss[0]:.3f}", aux=f"{loss[2]:.2e}")
            bar.update(1)
            if bar.disable and time.perf_counter() - last_log >= PROGRESS_LOG_SECONDS:
                last_log = time.perf_counter()
                logger.info(  # no terminal, no bar: a log line once a minute instead
                    "epoch %d: batch %d/%d, loss %.4f, %.0f examples/s",
                    epoch + 1,
                    i + 1,
                    batches.batches_per_epoch,
                    loss[0],
                    epoch_examples / (last_log - started),
                )
        bar.close()
        elapsed = time.perf_counter() - started
        examples += epoch_examples
        seconds += elapsed
        logger.info(
            "epoch %d: loss %.4f (nce %.4f, aux %.3g), %.0f examples/s",
            epoch + 1,
            *loss,
            epoch_examples / max(elapsed, 1e-9),
        )
        epoch_var.assign(epoch + 1)
        batch_var.assign(0)
        manager.save(checkpoint_number=(epoch + 1) * batches.batches_per_epoch)
    writer.flush()

    summary = {
        "examples_trained_this_run": examples,
        "seconds_this_run": round(seconds, 1),
        "examples_per_second": round(examples / seconds, 1) if seconds else None,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "final_loss": {"total": loss[0], "nce": loss[1], "aux": loss[2]},
        "epochs": config.epochs,
    }
    export_artifacts(model, dataset, workdir, config, summary)
    return summary


def item_embedding_matrix(model: NannModel, batch: int = 65536) -> np.ndarray:
    """e_v of every item (inference mode), computed in batches: [num_items, D] float32."""
    n = model.config.num_items
    out = np.empty((n, model.config.item_dim), np.float32)
    fn = tf.function(lambda ids: model.item_embeddings(ids, training=False), reduce_retracing=True)
    for start in range(0, n, batch):
        out[start : start + batch] = fn(tf.range(start, min(start + batch, n), dtype=tf.int32)).numpy()
    return out


# The embeddings artifact also carries the corpus tables the export needs, so that an export (and a
# re-export) reads no training data: each item's dense category, the categories' original labels, and
# SAMPLE_USERS real behaviour histories (original item ids, -1 padded) for the export's warm-up.
ITEM_CATEGORY_FILE = "item_category.npy"
CATEGORY_LABELS_FILE = "categories.json"
SAMPLE_HISTORIES_FILE = "sample_histories.npy"
SAMPLE_USERS = 64


def export_artifacts(
    model: NannModel, dataset: Dataset, workdir: Path, config: TrainConfig, summary: dict
) -> None:
    """Writes ``model/`` and ``embeddings/`` (e_v, item ids and the corpus tables) atomically,
    each with provenance."""
    dataset_sha = artifacts.digest(dataset.meta)
    params = {**dataclasses.asdict(config), "model": dataclasses.asdict(model.config)}
    with artifacts.atomic_dir(workdir / "model") as tmp:
        save_model_files(model, tmp)
        meta = artifacts.provenance("model", params, inputs={"dataset_digest": dataset_sha})
        model_meta = artifacts.write_meta(tmp, {**meta, "training": summary})
    weights_sha = model_meta["files"]["model.weights.h5"]["sha256"]
    with artifacts.atomic_dir(workdir / "embeddings") as tmp:
        np.save(tmp / "item_embeddings.npy", item_embedding_matrix(model))
        np.save(tmp / "item_ids.npy", dataset.item_ids)
        np.save(tmp / ITEM_CATEGORY_FILE, np.asarray(dataset.item_category, np.int32))
        (tmp / CATEGORY_LABELS_FILE).write_text(json.dumps([str(x) for x in dataset.category_names]) + "\n")
        np.save(tmp / SAMPLE_HISTORIES_FILE, dataset.sample_histories(SAMPLE_USERS, config.max_len))
        meta = artifacts.provenance(
            "embeddings",
            {"dim": model.config.item_dim, "num_items": model.config.num_items},
            inputs={"model_weights_sha256": weights_sha, "dataset_digest": dataset_sha},
        )
        artifacts.write_meta(tmp, meta)
    logger.info("wrote %s and %s", workdir / "model", workdir / "embeddings")
