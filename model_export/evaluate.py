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
import os
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from model_export.data import Dataset, load_dataset
from model_export.model import NannModel, load_model_files
from nann_common import artifacts, contract
from nann_common.errors import ArtifactError, InputError
from walk import search

logger = logging.getLogger(__name__)
MODES = contract.MODES


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
    ef: tuple[int, ...] | None = None  # None: the export's defaults
    steps: tuple[int, ...] | None = None


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
        ids, scores, _ = search.exhaustive_retrieval(
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


class Evaluation:
    """One workdir's evaluated users, with the exhaustive reference and the exported SavedModel.

    The exhaustive top-k of the sampled users is computed once and cached in
    ``eval/`` (it is the costly part), so a sweep over retrieval parameters
    pays for it once.
    """

    def __init__(
        self,
        workdir: str | Path,
        split: str = "test",
        users: int = 0,
        seed: int = 0,
        user_batch: int = 16,
        item_chunk: int = 8192,
    ):
        if users < 0:
            raise InputError(f"--users must be >= 0 (0 = all evaluated users), got {users}")
        if split not in ("valid", "test"):
            raise InputError(f"--split must be valid or test, got {split!r}")
        self.workdir = Path(workdir)
        self.dataset, self.model, self.item_e = load_workdir(workdir)
        self.train_meta = artifacts.read_meta(self.workdir / "model", "model", verify=False)
        self.split, self.seed, self.user_batch, self.item_chunk = split, seed, user_batch, item_chunk
        _, histories, targets = self.dataset.eval_examples(split, self.train_meta["params"]["max_len"])
        if users and users < len(targets):
            pick = np.sort(np.random.default_rng(seed).choice(len(targets), users, replace=False))
            histories, targets = histories[pick], targets[pick]
        self.histories, self.targets = histories, targets
        self._saved_model = None
        self.export_meta = None

    @property
    def num_users(self) -> int:
        return len(self.targets)

    def base_result(self, k: int, mode: str) -> dict:
        return {
            "users": self.num_users,
            "k": k,
            "items": self.dataset.num_items,
            "mode": mode,
            "split": self.split,
            "arch": self.model.config.arch,
            "fgsm_eps": self.train_meta["params"]["fgsm_eps"],
        }

    def reference(self, k: int, progress: bool = True) -> np.ndarray:
        """Exhaustive top-k dense ids [users, k], cached under eval/ by model, users and k."""
        model = artifacts.digest(self.train_meta)[:16]
        key = f"{model}-{self.split}-k{k}-users{self.num_users}-seed{self.seed}"
        path = self.workdir / "eval" / "reference" / f"{key}.npy"
        if path.is_file():
            return np.load(path)
        if not 1 <= k <= self.dataset.num_items:
            raise InputError(f"k must be in 1..{self.dataset.num_items} (the corpus size), got {k}")
        searcher = ExhaustiveSearcher(self.model, self.item_e, self.user_batch, self.item_chunk)
        ids, _ = searcher.search(self.histories, k, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}.npy")
        np.save(tmp, ids)
        os.replace(tmp, path)
        return ids

    def read_export_meta(self) -> dict:
        """The latest export's meta.json (read without loading the SavedModel)."""
        if self.export_meta is None:
            from model_export.export import latest_export

            self.export_path = latest_export(self.workdir)
            self.export_meta = artifacts.read_meta(self.export_path, "saved_model")
        return self.export_meta

    def saved_model(self):
        """The latest exported SavedModel, loaded as TF Serving would (tf.saved_model.load)."""
        if self._saved_model is None:
            self.read_export_meta()
            self._saved_model = tf.saved_model.load(str(self.export_path))
        return self._saved_model

    def retrieve(self, mode: str, k: int, ef=None, steps=None, progress: bool = True):
        """Runs the SavedModel's ``retrieve`` signature: (dense ids [users, k], items scored [users])."""
        model = self.saved_model()
        # The same checks and messages as the server's: the export's contract.
        serving = contract.ServingContract.from_meta(self.export_path, self.export_meta)
        try:
            query = serving.resolve(k, ef, steps, mode)
        except contract.InvalidRequest as e:
            raise InputError(f"{e} (this export starts at layer {serving.start_layer})") from e
        k, ef, steps = query.k, query.ef, query.steps
        fn = model.signatures["retrieve"]
        original = self.dataset.item_ids
        ids = np.empty((self.num_users, k), np.int32)
        scored = np.empty(self.num_users, np.int64)
        for start in tqdm(
            range(0, self.num_users, self.user_batch),
            desc=f"{mode} retrieval",
            unit="batch",
            disable=None if progress else True,
        ):
            h = self.histories[start : start + self.user_batch]
            inputs = serving.inputs(np.where(h >= 0, original[np.maximum(h, 0)], -1), query)
            out = fn(**{name: tf.constant(value) for name, value in inputs.items()})
            b = len(h)
            ids[start : start + b] = np.searchsorted(original, out["item_ids"].numpy())
            scored[start : start + b] = out["scored"].numpy()
        return ids, scored

    def metrics(self, mode: str, k: int, ef=None, steps=None, progress: bool = True) -> dict:
        """The paper's metrics of one search setting against the exhaustive reference."""
        reference = self.reference(k, progress)
        result = self.base_result(k, mode)
        recall_all = float(recall_at_k(reference, self.targets).mean())
        result["recall_all"] = recall_all
        if mode == "exhaustive":
            return result
        started = time.perf_counter()
        ids, scored = self.retrieve(mode, k, ef, steps, progress)
        seconds = time.perf_counter() - started
        recall = float(recall_at_k(ids, self.targets).mean())
        coverage = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(ids, reference, strict=True)])
        result.update(
            recall_retrieval=recall,
            recall_delta=(recall_all - recall) / recall_all if recall_all > 0 else 0.0,
            coverage=float(coverage),
            scored_fraction=float(scored.mean() / self.dataset.num_items),
            scored_per_user=float(scored.mean()),
            ef=list(ef or self.export_meta["params"]["ef"]),
            steps=list(steps or self.export_meta["params"]["steps"]),
            seconds=round(seconds, 2),
        )
        return result


def evaluate(workdir: str | Path, config: EvalConfig, progress: bool = True) -> dict:
    """Evaluates the workdir's model in one mode; returns the metrics dict (also written to eval/).

    Raises:
      InputError: bad parameters (k, users, split, mode, ef, steps).
    """
    if config.mode not in MODES:
        raise InputError(f"--mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    evaluation = Evaluation(
        workdir, config.split, config.users, config.seed, config.user_batch, config.item_chunk
    )
    started = time.perf_counter()
    result = evaluation.metrics(config.mode, config.k, config.ef, config.steps, progress)
    result["seconds_total"] = round(time.perf_counter() - started, 2)
    name = f"{config.mode}-{config.split}-k{config.k}-users{result['users']}"
    with artifacts.atomic_dir(Path(workdir) / "eval" / name) as tmp:
        (tmp / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        artifacts.write_meta(
            tmp,
            artifacts.provenance(
                "evaluation",
                dataclasses.asdict(config),
                inputs={"model": artifacts.digest(evaluation.train_meta)},
            ),
        )
    summary = ", ".join(
        f"{key} {result[key]:.4f}"
        for key in ("recall_all", "recall_retrieval", "recall_delta", "coverage", "scored_fraction")
        if key in result
    )
    logger.info(
        "%s@%d over %d %s users (%d items): %s",
        config.mode,
        config.k,
        result["users"],
        config.split,
        result["items"],
        summary,
    )
    return result
