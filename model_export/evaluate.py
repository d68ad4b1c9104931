"""Evaluation: exhaustive top-M over the whole corpus and recall-all@M.

Exhaustive scoring is the reference every approximate search is checked
against. It runs users in small batches and items in fixed-size chunks,
keeping a running top-M per user, so memory stays bounded at any corpus size
(10,000 users x 1.3M items runs in a few hundred MB; the time is the cost).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from model_export import artifacts, retrieval
from model_export.data import Dataset, load_dataset
from model_export.errors import ArtifactError, InputError
from model_export.model import NannModel, load_model_files

logger = logging.getLogger(__name__)
MODES = ("exhaustive",)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to evaluate; ``users`` = 0 means every evaluated user of the split."""

    k: int = 200
    mode: str = "exhaustive"
    users: int = 0
    split: str = "test"
    seed: int = 0
    user_batch: int = 16
    item_chunk: int = 8192


class ExhaustiveSearcher:
    """Scores every item for each user and keeps the top k: the exact answer."""

    def __init__(self, model: NannModel, item_e: np.ndarray, user_batch: int = 16, item_chunk: int = 8192):
        self.model = model
        self.num_items = item_e.shape[0]
        self.user_batch = user_batch
        self.item_chunk = min(item_chunk, self.num_items)
        self.item_e = tf.constant(item_e)

    def is_exact(self) -> bool:
        return True

    def search(self, histories: np.ndarray, k: int, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Top-k item ids and scores for each history row: ([n, k] int32, [n, k] float32).

        Raises:
          InputError: k is outside 1..number of items.
        """
        if not 1 <= k <= self.num_items:
            raise InputError(f"k must be in 1..{self.num_items} (the corpus size), got {k}")
        n = len(histories)
        ids = np.empty((n, k), np.int32)
        scores = np.empty((n, k), np.float32)
        for start in tqdm(
            range(0, n, self.user_batch),
            desc="exhaustive top-k",
            unit="batch",
            disable=None if progress else True,
        ):
            rows = slice(start, start + self.user_batch)
            s, i = self._search_batch(tf.constant(histories[rows], tf.int32), tf.constant(k))
            ids[rows], scores[rows] = i.numpy(), s.numpy()
        return ids, scores

    @tf.function(reduce_retracing=True)
    def _search_batch(self, history, k):
        hist_e, mask = self.model.behaviour_embeddings(history)
        state = self.model.user_state(hist_e, mask)
        ids, scores, _ = retrieval.exhaustive_retrieval(
            lambda c: self.model.score(state, c), self.item_e, tf.shape(history)[0], k, self.item_chunk
        )
        return scores, ids


def recall_at_k(top_ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-user recall@k with one ground-truth item per user: 1.0 if it is in the top k."""
    return (top_ids == np.asarray(targets)[:, None]).any(axis=1).astype(np.float64)


def load_workdir(workdir: str | Path) -> tuple[Dataset, NannModel, np.ndarray]:
    """Loads and cross-checks the dataset, model and embeddings of a workdir."""
    workdir = Path(workdir)
    dataset = load_dataset(workdir / "dataset")
    model_meta = artifacts.read_meta(workdir / "model", "model")
    emb_meta = artifacts.read_meta(workdir / "embeddings", "embeddings")
    weights_sha = model_meta["files"]["model.weights.h5"]["sha256"]
    if emb_meta["inputs"].get("model_weights_sha256") != weights_sha:
        raise ArtifactError(f"{workdir / 'embeddings'} was computed from another model; re-run train")
    if model_meta["inputs"].get("dataset_digest") != artifacts.digest(dataset.meta):
        raise ArtifactError(f"{workdir / 'model'} was trained on another dataset; re-run train")
    model = load_model_files(workdir / "model")
    item_e = np.load(workdir / "embeddings" / "item_embeddings.npy")
    return dataset, model, item_e


def evaluate(workdir: str | Path, config: EvalConfig, progress: bool = True) -> dict:
    """Evaluates the trained model of ``workdir``; returns the metrics dict (also written to eval/).

    Raises:
      InputError: bad parameters (k, users, split, mode).
    """
    if config.mode not in MODES:
        raise InputError(f"--mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    if config.users < 0:
        raise InputError(f"--users must be >= 0 (0 = all evaluated users), got {config.users}")
    if config.split not in ("valid", "test"):
        raise InputError(f"--split must be valid or test, got {config.split!r}")
    dataset, model, item_e = load_workdir(workdir)
    train_meta = artifacts.read_meta(Path(workdir) / "model", "model", verify=False)
    max_len = train_meta["params"]["max_len"]
    users, histories, targets = dataset.eval_examples(config.split, max_len)
    if config.users and config.users < len(users):
        pick = np.sort(np.random.default_rng(config.seed).choice(len(users), config.users, replace=False))
        users, histories, targets = users[pick], histories[pick], targets[pick]
    searcher = ExhaustiveSearcher(model, item_e, config.user_batch, config.item_chunk)
    started = time.perf_counter()
    top_ids, _ = searcher.search(histories, config.k, progress=progress)
    seconds = time.perf_counter() - started
    result = {
        "recall_all": float(recall_at_k(top_ids, targets).mean()),
        "users": int(len(users)),
        "k": config.k,
        "items": dataset.num_items,
        "mode": config.mode,
        "split": config.split,
        "arch": model.config.arch,
        "fgsm_eps": train_meta["params"]["fgsm_eps"],
        "seconds": round(seconds, 2),
        "users_per_second": round(len(users) / seconds, 2) if seconds else None,
    }
    name = f"{config.mode}-{config.split}-k{config.k}-users{result['users']}"
    with artifacts.atomic_dir(Path(workdir) / "eval" / name) as tmp:
        (tmp / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        artifacts.write_meta(
            tmp,
            artifacts.provenance(
                "evaluation", dataclasses.asdict(config), inputs={"model": artifacts.digest(train_meta)}
            ),
        )
    logger.info(
        "recall-all@%d = %.4f over %d %s users (%d items, %s, %.1f s)",
        config.k,
        result["recall_all"],
        result["users"],
        config.split,
        result["items"],
        config.mode,
        seconds,
    )
    return result
