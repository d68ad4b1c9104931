"""The serving contract of an exported SavedModel, written once by the exporter and read by every caller.

The exporter puts a ``serving`` block into the export's ``meta.json``: the signature
and tensor names, the corpus size, the start layer and layer sizes, the default query
parameters, ``max_len``, the modes and the bounds the signature enforces. Callers (the
evaluation command line, the server, the load test) read it with :func:`load_contract`
and check a request with :meth:`ServingContract.resolve` before TensorFlow sees it, so
every caller rejects the same requests with the same message.

Versions follow TF Serving's layout: ``BASE/<positive integer>/`` holds one SavedModel.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from nann_common import artifacts
from nann_common.errors import ArtifactError, NannError

KIND = "saved_model"
SERVING_KEY = "serving"
CONTRACT_VERSION = 1
MODES = ("beam", "beam_history", "beam_sets", "hnsw", "exhaustive")
DEFAULT_MODE = "beam"  # of exports that name none
DEFAULT_SIGNATURE = "serving_default"
RETRIEVE_SIGNATURE = "retrieve"
# The same inputs and outputs as retrieve, with the scorer compiled by XLA: the in-process
# server's choice; stock TF Serving runs retrieve (it would need --xla_cpu_compilation_enabled).
XLA_SIGNATURE = "retrieve_xla"
# history [B, L] -> compiles the XLA scorer at every shape retrieve_xla meets at batch B.
XLA_WARMUP_SIGNATURE = "warmup_xla"
RETRIEVE_INPUTS = ("history", "k", "ef", "steps", "mode")
RETRIEVE_OUTPUTS = ("item_ids", "scores", "scored")
# Filtered calls run their own signatures (the unfiltered ones stay exactly as they were: a filter
# branch inside them cost an unfiltered call 10% at batch 1): retrieve_filtered (stock ops, TF
# Serving) and retrieve_filtered_xla take RETRIEVE_INPUTS + FILTER_INPUTS, one row per user:
# exclude_items int64 [B, E] original ids never returned (-1 padded; unknown ids are ignored),
# exclude_history bool [B] (the row's history is never returned either), allow_categories and
# exclude_categories int32 [B, A] / [B, X] dense category indices (positions in CATEGORIES_FILE,
# -1 padded; a row with no allow-list allows every category).
FILTER_INPUTS = ("exclude_items", "exclude_history", "allow_categories", "exclude_categories")
# plan int32 [B]: PLANS[plan] ran for the row; removed int32 [B]: scored items the filter removed.
FILTER_OUTPUTS = ("plan", "removed")
FILTER_SIGNATURE = "retrieve_filtered"
XLA_FILTER_SIGNATURE = "retrieve_filtered_xla"
PLANS = ("walk", "exact", "walk+widen")
PAD_ID = -1
ITEM_IDS_FILE = "assets.extra/item_ids.npy"
CATEGORIES_FILE = "assets.extra/categories.json"
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"


class InvalidRequest(NannError):
    """A query's parameters or history are unusable; the message says how to fix them."""


@dataclasses.dataclass(frozen=True)
class Query:
    """One resolved query: every parameter present and checked."""

    k: int
    ef: tuple[int, ...]
    steps: tuple[int, ...]
    mode: str


@dataclasses.dataclass(frozen=True)
class ServingContract:
    """What a caller needs to know of one exported SavedModel version."""

    version: int
    path: Path
    num_items: int
    start_layer: int
    layer_sizes: tuple[int, ...]
    max_len: int
    default_k: int
    default_ef: tuple[int, ...]
    default_steps: tuple[int, ...]
    modes: tuple[str, ...]
    digest: str
    default_mode: str = DEFAULT_MODE
    xla_scorer: bool = False  # retrieve itself compiles with XLA (exports older than retrieve_xla)
    xla_batches: tuple[int, ...] = ()  # batch sizes retrieve_xla compiles for; () = no retrieve_xla
    num_categories: int = 0  # > 0: the export has the filtered signatures (before filters: 0)
    exact_below: int = 0  # the planner scores a filter's allowed items exactly up to this many

    @property
    def has_filters(self) -> bool:
        return self.num_categories > 0

    def signature(self, xla: bool, filtered: bool = False) -> str:
        """The signature a call runs: stock or XLA scorer, unfiltered or filtered."""
        if filtered:
            return XLA_FILTER_SIGNATURE if xla else FILTER_SIGNATURE
        return XLA_SIGNATURE if xla else RETRIEVE_SIGNATURE

    @property
    def has_xla_signature(self) -> bool:
        return bool(self.xla_batches)

    @property
    def depth(self) -> int:
        """Number of ef / steps values a query gives: the start layer down to layer 0."""
        return self.start_layer + 1

    @classmethod
    def from_meta(cls, path: Path, meta: dict, version: int = 0) -> ServingContract:
        serving = meta.get(SERVING_KEY)
        if not isinstance(serving, dict) or serving.get("contract_version") != CONTRACT_VERSION:
            raise ArtifactError(
                f"{path} carries no serving contract of version {CONTRACT_VERSION} in its meta.json; "
                "re-export it with `python -m model_export export`"
            )
        try:
            return cls(
                version=version,
                path=path,
                num_items=int(serving["num_items"]),
                start_layer=int(serving["start_layer"]),
                layer_sizes=tuple(int(x) for x in serving["layer_sizes"]),
                max_len=int(serving["max_len"]),
                default_k=int(serving["defaults"]["k"]),
                default_ef=tuple(int(x) for x in serving["defaults"]["ef"]),
                default_steps=tuple(int(x) for x in serving["defaults"]["steps"]),
                modes=tuple(serving["modes"]),
                digest=artifacts.digest(meta),
                default_mode=str(serving["defaults"].get("mode", DEFAULT_MODE)),
                xla_scorer=bool(serving.get("xla_scorer", False)),
                xla_batches=tuple(int(x) for x in serving.get("xla", {}).get("batches", ())),
                num_categories=int(serving.get("filters", {}).get("categories", 0)),
                exact_below=int(serving.get("filters", {}).get("exact_below", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(
                f"{path}/meta.json has a malformed serving block ({e!r}); re-export it"
            ) from e

    def resolve(
        self,
        k: int | None = None,
        ef: tuple[int, ...] | list[int] | None = None,
        steps: tuple[int, ...] | list[int] | None = None,
        mode: str | None = None,
    ) -> Query:
        """Fills absent parameters with the model's defaults and checks the signature's bounds.

        Args:
          k: results per user; None or 0 = the default.
          ef, steps: one value per layer, top-down from the start layer to layer 0; None or
            empty = the defaults.
          mode: one of :attr:`modes`; None or "" = the export's default mode.

        Raises:
          InvalidRequest: a value the signature would refuse, with what to send instead.
        """
        ef = tuple(int(x) for x in ef) if ef else self.default_ef
        steps = tuple(int(x) for x in steps) if steps else self.default_steps
        mode = mode or self.default_mode
        if mode not in self.modes:
            raise InvalidRequest(f"mode must be one of {', '.join(self.modes)}, got {mode!r}")
        for name, values, default in (("ef", ef, self.default_ef), ("steps", steps, self.default_steps)):
            if len(values) != self.depth:
                raise InvalidRequest(
                    f"{name} needs {self.depth} values, one per layer top-down from the start layer "
                    f"{self.start_layer} to layer 0 (default {','.join(map(str, default))}), "
                    f"got {len(values)}"
                )
        if min(ef) < 1:
            raise InvalidRequest(f"every ef value must be >= 1, got {','.join(map(str, ef))}")
        if min(steps) < 0 or steps[-1] < 1:
            raise InvalidRequest(
                "every steps value must be >= 0 (0: the layer is not walked, its entry points go "
                f"straight down) and layer 0's (the last) >= 1, got {','.join(map(str, steps))}"
            )
        k = int(k) if k else self.default_k
        upper = min(ef[-1], self.num_items)
        if not 1 <= k <= upper:
            raise InvalidRequest(f"k must be in 1..min(ef of layer 0, items) = 1..{upper}, got {k}")
        return Query(k=k, ef=ef, steps=steps, mode=mode)

    def item_ids(self) -> np.ndarray:
        """The corpus' original item ids, ascending (int64 [num_items])."""
        path = self.path / ITEM_IDS_FILE
        try:
            ids = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{path} is unreadable ({e}); re-export the model") from e
        if ids.shape != (self.num_items,) or ids.dtype != np.int64:
            raise ArtifactError(f"{path} holds {ids.dtype} {ids.shape}, expected int64 ({self.num_items},)")
        return ids

    def inputs(self, histories: np.ndarray, query: Query, filters: list[RowFilter] | None = None) -> dict:
        """The inputs of :meth:`signature` ``(xla, filtered=bool(filters))``: with the filter
        inputs when ``filters`` holds any filter (then the filtered signature takes them)."""
        if not filtered(filters):
            return retrieve_inputs(histories, query)
        if not self.has_filters:
            raise InvalidRequest(f"model version {self.version} was exported before filters; re-export it")
        return retrieve_inputs(histories, query, filters)

    def category_labels(self) -> list[str]:
        """The corpus' original category labels; a filter's dense category c is labels[c]."""
        import json

        path = self.path / CATEGORIES_FILE
        try:
            labels = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{path} is unreadable ({e}); re-export the model") from e
        if not isinstance(labels, list) or len(labels) != self.num_categories:
            raise ArtifactError(f"{path} does not list {self.num_categories} category labels; re-export")
        return [str(x) for x in labels]


@dataclasses.dataclass(frozen=True)
class RowFilter:
    """One user's filter, resolved to what the model takes (see FILTER_INPUTS)."""

    exclude_items: tuple[int, ...] = ()  # original item ids
    exclude_history: bool = False
    allow_categories: tuple[int, ...] = ()  # dense category indices
    exclude_categories: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(
            self.exclude_items or self.exclude_history or self.allow_categories or self.exclude_categories
        )


NO_FILTER = RowFilter()


def filtered(filters: list[RowFilter] | None) -> bool:
    """Whether a call with these per-row filters runs the filtered signature."""
    return filters is not None and any(filters)


def _padded(rows: list[tuple[int, ...]], dtype) -> np.ndarray:
    out = np.full((len(rows), max(1, max(map(len, rows), default=0))), PAD_ID, dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def filter_inputs(filters: list[RowFilter]) -> dict[str, np.ndarray]:
    """The filter inputs of ``retrieve`` for one filter per row (:data:`NO_FILTER` for none)."""
    return {
        "exclude_items": _padded([f.exclude_items for f in filters], np.int64),
        "exclude_history": np.array([f.exclude_history for f in filters], bool),
        "allow_categories": _padded([f.allow_categories for f in filters], np.int32),
        "exclude_categories": _padded([f.exclude_categories for f in filters], np.int32),
    }


def retrieve_inputs(
    histories: np.ndarray, query: Query, filters: list[RowFilter] | None = None
) -> dict[str, np.ndarray]:
    """The ``retrieve`` signature's inputs for histories [B, L] (original ids, -1 padded), with
    the filter inputs when ``filters`` is given (one per row; an export with filters needs them)."""
    b = histories.shape[0]
    inputs = {
        "history": np.asarray(histories, np.int64),
        "k": np.full([b], query.k, np.int32),
        "ef": np.tile(np.asarray(query.ef, np.int32), (b, 1)),
        "steps": np.tile(np.asarray(query.steps, np.int32), (b, 1)),
        "mode": np.array([query.mode.encode()] * b, object),
    }
    if filters is not None:
        if len(filters) != b:
            raise ValueError(f"{len(filters)} filters for {b} history rows")
        inputs.update(filter_inputs(filters))
    return inputs


def known_history(item_ids: np.ndarray, history: np.ndarray, max_len: int) -> tuple[np.ndarray, int]:
    """Drops ids not in ascending ``item_ids``, keeps the most recent ``max_len`` -> (ids, dropped)."""
    pos = np.minimum(np.searchsorted(item_ids, history), len(item_ids) - 1)
    kept = history[item_ids[pos] == history]
    return kept[-max_len:], int(len(history) - len(kept))


def serving_block(
    *,
    num_items: int,
    start_layer: int,
    layer_sizes: list[int],
    max_len: int,
    k: int,
    ef: tuple[int, ...],
    steps: tuple[int, ...],
    mode: str = DEFAULT_MODE,
    xla_batches: tuple[int, ...] = (),
    num_categories: int = 0,
    exact_below: int = 0,
) -> dict:
    """The ``serving`` block of an export's meta.json (what :meth:`ServingContract.from_meta` reads)."""
    plain = {"inputs": list(RETRIEVE_INPUTS), "outputs": list(RETRIEVE_OUTPUTS)}
    with_filters = {
        "inputs": list(RETRIEVE_INPUTS + FILTER_INPUTS),
        "outputs": list(RETRIEVE_OUTPUTS + FILTER_OUTPUTS),
    }
    return {
        "contract_version": CONTRACT_VERSION,
        "signatures": {
            DEFAULT_SIGNATURE: {"inputs": ["history"], "outputs": list(RETRIEVE_OUTPUTS)},
            RETRIEVE_SIGNATURE: plain,
            **({FILTER_SIGNATURE: with_filters} if num_categories else {}),
            **({XLA_FILTER_SIGNATURE: with_filters} if num_categories and xla_batches else {}),
            **(
                {
                    XLA_SIGNATURE: plain,
                    XLA_WARMUP_SIGNATURE: {"inputs": ["history"], "outputs": ["widths", "finite"]},
                }
                if xla_batches
                else {}
            ),
        },
        "num_items": int(num_items),
        "start_layer": int(start_layer),
        "layer_sizes": [int(x) for x in layer_sizes],
        "max_len": int(max_len),
        "pad_id": PAD_ID,
        "modes": list(MODES),
        # retrieve and serving_default hold no XLA op (stock TF Serving runs them); the in-process
        # server runs retrieve_xla, warmed up at each of these batch sizes it can form.
        "xla_scorer": False,
        **(
            {"xla": {"signature": XLA_SIGNATURE, "batches": list(map(int, xla_batches))}}
            if xla_batches
            else {}
        ),
        "defaults": {
            "k": int(k),
            "ef": [int(x) for x in ef],
            "steps": [int(x) for x in steps],
            "mode": mode,
        },
        "bounds": {
            "k": "1..min(ef of layer 0, num_items)",
            "ef": f"{start_layer + 1} values, each >= 1, top-down from the start layer",
            "steps": f"{start_layer + 1} values, each >= 0 (0: not walked), layer 0's >= 1, top-down",
            "history": "int64 original item ids of the corpus, oldest first, -1 padded; >= 1 per row",
        },
        **(
            {
                "filters": {
                    "categories": int(num_categories),
                    "exact_below": int(exact_below),
                    "plans": list(PLANS),
                }
            }
            if num_categories
            else {}
        ),
        "files": {"item_ids": ITEM_IDS_FILE, "warmup": WARMUP_FILE, "categories": CATEGORIES_FILE},
    }


def versions(base: str | Path) -> list[int]:
    """Numeric version directories under ``base``, ascending (TF Serving's layout)."""
    base = Path(base)
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir() if p.is_dir() and re.fullmatch(r"[1-9]\d*", p.name))


def load_contract(version_dir: str | Path, verify: bool = True) -> ServingContract:
    """Reads and verifies one SavedModel version's meta.json (checksums of every file when ``verify``).

    Raises:
      ArtifactError: the directory holds no export, or it is damaged or from an older exporter.
    """
    path = Path(version_dir)
    meta = artifacts.read_meta(path, KIND, verify=verify)
    version = int(path.name) if re.fullmatch(r"\d+", path.name) else 0
    return ServingContract.from_meta(path, meta, version)


def latest_contract(base: str | Path, verify: bool = True) -> ServingContract:
    """The contract of the highest version under ``base``.

    Raises:
      ArtifactError: no version exists (with the command that makes one), or it is damaged.
    """
    found = versions(base)
    if not found:
        raise ArtifactError(
            f"{base} holds no SavedModel version (numbered subdirectories); "
            "run `python -m model_export export --workdir DIR` and pass DIR/export"
        )
    return load_contract(Path(base) / str(found[-1]), verify=verify)
