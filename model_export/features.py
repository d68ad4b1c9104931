"""The feature snapshot: every user's most recent behaviours, as original item ids, for the server's stores.

``python -m model_export features --workdir DIR`` writes ``DIR/features/``:

- ``users.npy``   int64 [U]: original user ids, ascending (every user of the interactions file,
  also those the training split dropped for having fewer than ``min_behaviours``);
- ``offsets.npy`` int64 [U+1]: user ``users[i]`` owns ``items[offsets[i]:offsets[i+1]]``;
- ``items.npy``   int64 [T]: original item ids, oldest first within each user, at most
  ``max_behaviours`` per user (the most recent ones).

The schema is restated in ``meta.json`` (``schema``) so a reader needs no code from here;
the server's embedded store maps these files, and ``python -m server.features load``
copies them into Redis.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from model_export import data
from nann_common import artifacts
from nann_common.errors import ArtifactError, InputError

logger = logging.getLogger(__name__)

KIND = "features"
FEATURES_DIR = "features"
SCHEMA = {
    "users.npy": "int64 [U] original user ids, ascending",
    "offsets.npy": "int64 [U+1] user users[i] owns items[offsets[i]:offsets[i+1]]",
    "items.npy": "int64 [T] original item ids, oldest first within a user; the most recent "
    "max_behaviours behaviours of each user",
}


def write_features(workdir: str | Path, max_behaviours: int | None = None) -> Path:
    """Builds ``DIR/features/`` from the interactions file the workdir's dataset was made from.

    Args:
      workdir: a trained workdir (``dataset/`` and ``model/`` present).
      max_behaviours: behaviours kept per user; None = the model's ``max_len``.

    Returns:
      The features directory.

    Raises:
      ArtifactError: the dataset is missing, or the interactions file changed since training.
      InputError: max_behaviours below 1.
    """
    workdir = Path(workdir)
    ds_meta = artifacts.read_meta(workdir / "dataset", "dataset", verify=False)
    model_meta = artifacts.read_meta(workdir / "model", "model", verify=False)
    if max_behaviours is None:
        max_behaviours = int(model_meta["params"]["max_len"])
    if max_behaviours < 1:
        raise InputError(f"--max-behaviours must be >= 1, got {max_behaviours}")
    source = Path(ds_meta["inputs"]["file"])
    params = ds_meta["params"]
    if not source.is_file():
        raise ArtifactError(
            f"{source}, the interactions file this workdir was trained on, is gone; "
            "the snapshot is built from it (every user, also those training dropped)"
        )
    # Every user counts here, so the split filter is off (min_behaviours 1).
    full = data.load_dataset_from_file(
        source, params["format"], min_behaviours=1, seed=params["seed"], skip_bad_rows=params["skip_bad_rows"]
    )
    if full.meta["inputs"]["sha256"] != ds_meta["inputs"]["sha256"]:
        raise ArtifactError(
            f"{source} changed since the workdir was trained (sha256 differs); retrain or restore the file"
        )
    lengths = np.diff(full.offsets)
    keep = np.minimum(lengths, max_behaviours)
    starts = full.offsets[1:] - keep
    offsets = np.concatenate([[0], np.cumsum(keep)]).astype(np.int64)
    index = np.repeat(starts - offsets[:-1], keep) + np.arange(offsets[-1])
    items = full.item_ids[full.seq_items[index]].astype(np.int64)

    out = workdir / FEATURES_DIR
    with artifacts.atomic_dir(out) as tmp:
        np.save(tmp / "users.npy", full.user_ids.astype(np.int64))
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "items.npy", items)
        meta = artifacts.provenance(
            KIND,
            {"max_behaviours": max_behaviours},
            inputs={"interactions_sha256": ds_meta["inputs"]["sha256"], "dataset": artifacts.digest(ds_meta)},
        )
        meta["schema"] = SCHEMA
        meta["counts"] = {
            "users": int(full.num_users),
            "behaviours": int(offsets[-1]),
            "items": int(full.num_items),
        }
        artifacts.write_meta(tmp, meta)
    logger.info(
        "wrote %s: %d users, %d behaviours (at most %d each)",
        out,
        full.num_users,
        offsets[-1],
        max_behaviours,
    )
    return out
