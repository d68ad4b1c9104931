"""Export ONE SavedModel that unifies e_v, the HNSW graph, the scorer and Beam-retrieval.

``python -m model_export export --workdir DIR`` reads ``model/``,
``embeddings/`` and ``index/`` and writes ``DIR/export/<version>/``, a
SavedModel made of stock TensorFlow ops only, so the stock TensorFlow Serving
binary can load it. Large tensors (e_v, the graph) are variables, not
constants (the 2 GB proto limit).

Signatures (dense and batch-major, as TF Serving's batching needs):

* ``serving_default``: ``history`` int64 [B, L] original item ids of each
  user's behaviours, -1 padded -> ``item_ids`` int64 [B, k] (original ids),
  ``scores`` float32 [B, k], ``scored`` int32 [B] (items scored per user),
  with the default retrieval parameters.
* ``retrieve``: the same plus per-request parameters, one row per user (all
  rows of a request must agree): ``k`` int32 [B], ``ef`` int32 [B, S+1] and
  ``steps`` int32 [B, S+1] from the start layer S down to layer 0 (the paper's
  {ef_2, ef_1, ef_0}), ``mode`` string [B] in beam | beam_history | beam_sets | hnsw |
  exhaustive.
* ``retrieve_xla``: ``retrieve`` with the scorer compiled by XLA (``jit_compile``), in
  ``score_split`` parts; the same answers, about twice as fast on CPU. The in-process server
  runs it; stock TF Serving runs the two signatures above, which hold no XLA op (it would need
  ``--xla_cpu_compilation_enabled`` for this one). All signatures share the variables.
* ``retrieve_filtered`` and ``retrieve_filtered_xla``: ``retrieve`` / ``retrieve_xla`` with a
  filter per row (``exclude_items``, ``exclude_history``, ``allow_categories``,
  ``exclude_categories``; :mod:`nann_common.contract`) and two more outputs, ``plan`` and
  ``removed``: the filter is applied inside the walk, by the planner (``_filtered``). Separate
  signatures, so that an unfiltered call runs exactly the unfiltered graph.
* ``warmup_xla``: ``history`` [B, L] -> compiles and runs the XLA scorer at every shape
  ``retrieve_xla`` can meet at batch B (padded to a power of two), so that no call after the
  warm-up pays for a compilation.

Modes: ``beam`` scores the whole start layer and walks down (Algorithm 1). ``beam_history``
scores every ``history_stride``-th start node only, walks down the same way, and adds the
user's own behaviours to layer 0's entry points (with ``history_stride`` 0 the behaviours are
the only entry points and the upper layers are skipped). ``beam_sets`` is ``beam`` with raw
set-op marking (the paper's Table 1), ``hnsw`` the SL2G baseline, ``exhaustive`` the exact
answer.

Bad input fails with InvalidArgument and a message that says how to fix it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import tensorflow as tf

from model_export.model import NannModel, load_model_files
from nann_common import artifacts, contract
from nann_common import graph as graph_lib
from nann_common.errors import ArtifactError, InputError
from walk import search

logger = logging.getLogger(__name__)

MODES = contract.MODES
# Top-down from the start layer: the paper's {ef_2, ef_1, ef_0} = {100, 200, 400}. The default
# search is beam_history with T {1, 0, 5}: every 2nd start-layer node scored, their best 100 handed
# straight to layer 0 with the user's own behaviours, then up to 5 rounds there. Replayed on five
# corpora (9.7k to 3.9M items) it held the paper's beam with T {1, 1, 3} to within 0.002 of
# coverage@200 and scored 0.57-0.63x its items at 1.4M and 3.9M items; beam with T {1, 0, 5} (what
# a caller naming beam gets by default) beat beam {1, 1, 3} on the three corpora replayed
# (docs/parameters.md).
DEFAULT_EF = (100, 200, 400)
DEFAULT_STEPS = (1, 0, 5)
DEFAULT_K = 200
DEFAULT_MODE = "beam_history"
DEFAULT_HISTORY_STRIDE = 2
# The XLA scorer runs in 2 parts, one per core of the 2-core machines measured
# (docs/parameters.md, "Export: --score-split"); stock ops are not split.
DEFAULT_XLA_SCORE_SPLIT = 2
# Batch sizes the XLA scorer is compiled for: a batch is padded up to the next of these.
XLA_BATCHES = tuple(2**i for i in range(11))
EXPORT_DIR = "export"
# Filters: layer 0's ef grows as allowed share ** -SELECTIVE_POWER, at most SELECTIVE_EF times, and
# its T is SELECTIVE_STEPS times the query's; a walk that
# found fewer than min(k, allowed) items walks again with layer 0's ef and T times WIDEN_*; the
# exact answer over a row's allowed items is gathered by category up to EXACT_GATHER_LIMIT items
# per row (a scan of the corpus beyond).
WIDEN_EF = 4
WIDEN_STEPS = 2
SELECTIVE_POWER = 0.8
SELECTIVE_EF = 8.0
SELECTIVE_STEPS = 2
# A filtered walk also starts from one item of each category an allow-list names (the item nearest
# the category's mean e_v), when it names at most this many.
ENTRY_CATEGORIES = 512
EXACT_GATHER_LIMIT = 1 << 18
# The planner scores a filter's allowed items exactly when every row allows at most this many
# times the items the default query walks through (measured at export), times the walk's growth
# under the filter (docs/parameters.md, Filters).
EXACT_COST_FACTOR = 2.0


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Query defaults baked into the SavedModel; every one can be overridden per request."""

    start_layer: int | None = None  # None: nann_common.graph.start_layer
    k: int = DEFAULT_K
    ef: tuple[int, ...] = DEFAULT_EF
    steps: tuple[int, ...] = DEFAULT_STEPS
    mode: str = DEFAULT_MODE
    history_stride: int = DEFAULT_HISTORY_STRIDE  # beam_history: every F-th start node; 0 = none
    score_split: int = DEFAULT_XLA_SCORE_SPLIT  # retrieve_xla: every scorer call as this many XLA calls
    exact_below: int | None = None  # filters: score the allowed items exactly up to this many (None: rule)
    query_source: str = "built-in defaults"  # or the tuning (DIR/tune) they came from


QUERY_FIELDS = ("k", "ef", "steps", "mode", "history_stride")


def default_config(workdir: str | Path) -> ExportConfig:
    """The export's query defaults for ``workdir``: the ones ``tune`` chose for its index when it
    was tuned (``DIR/tune/query.json``), else the built-in ones.

    Raises:
      ArtifactError: ``DIR/tune`` is damaged or was tuned on another index.
    """
    from model_export.tune import TUNE_DIR, load_tuned

    workdir = Path(workdir)
    tuned = load_tuned(workdir, artifacts.read_meta(workdir / "index", "index", verify=False))
    if tuned is None:
        return ExportConfig()
    values = {name: tuple(tuned[name]) if name in ("ef", "steps") else tuned[name] for name in QUERY_FIELDS}
    return ExportConfig(**values, query_source=f"tuned ({TUNE_DIR}/)")


def _params_for(start_layer: int, values: tuple[int, ...]) -> tuple[int, ...]:
    """Fits a top-down parameter list to start_layer + 1 layers (repeating the top value upward)."""
    need = start_layer + 1
    values = tuple(values)
    if len(values) >= need:
        return values[len(values) - need :]
    return (values[0],) * (need - len(values)) + values


class RetrievalModule(tf.Module):
    """The exported object: variables plus the serving functions."""

    def __init__(
        self,
        model: NannModel,
        item_e: np.ndarray,
        item_ids: np.ndarray,
        graph,
        config: ExportConfig,
        max_len: int = 50,
        item_category: np.ndarray | None = None,
    ):
        """``item_category``: each item's dense category [N] (default: the model's own table)."""
        super().__init__(name="nann_retrieval")
        if np.any(np.diff(item_ids) <= 0):
            raise ArtifactError(
                "item_ids must be strictly ascending (dense ids follow the original id order)"
            )
        # The Keras model is held outside tf.Module tracking (saving it as an object would
        # also trace its own Keras call signature); its variables are tracked instead, which is
        # all the serving functions capture.
        object.__setattr__(self, "model", model)
        self.model_variables = [v.value if hasattr(v, "value") else v for v in model.weights]
        self.num_items = int(item_e.shape[0])
        self.item_e = tf.Variable(item_e.astype(np.float32), trainable=False, name="item_embeddings")
        self.item_ids = tf.Variable(np.asarray(item_ids, np.int64), trainable=False, name="item_ids")
        self.graph = search.GraphTensors(list(graph.nodes), list(graph.neighbors), graph.entry_point)
        # Filters: each item's category, and the items grouped by category (offsets[c] to
        # offsets[c + 1] in category_items), so that a category allow-list is a gather, not a scan.
        if item_category is None:
            item_category = model.item_category.numpy()
        item_category = np.asarray(item_category, np.int32)
        if item_category.shape != (self.num_items,):
            raise ArtifactError(
                f"item_category has shape {item_category.shape}, expected ({self.num_items},); re-run train"
            )
        self.num_categories = int(model.config.num_categories)
        by_category = np.argsort(item_category, kind="stable").astype(np.int32)
        offsets = np.searchsorted(item_category[by_category], np.arange(self.num_categories + 1))
        self.item_category = tf.Variable(item_category, trainable=False, name="item_category")
        self.category_items = tf.Variable(by_category, trainable=False, name="category_items")
        self.category_offsets = tf.Variable(
            offsets.astype(np.int32), trainable=False, name="category_offsets"
        )
        self.category_entries = tf.Variable(
            category_entries(item_e, item_category, self.num_categories),
            trainable=False,
            name="category_entries",
        )
        ef0 = config.ef[-1]
        start = config.start_layer
        if start is None:
            start = graph_lib.start_layer(self.graph.layer_sizes, self.num_items, config.ef)
        if not 0 <= start < self.graph.num_layers:
            raise InputError(f"--start-layer must be in 0..{self.graph.num_layers - 1}, got {start}")
        self.start_layer = start
        self.default_k = config.k
        self.default_ef = _params_for(start, config.ef)
        self.default_steps = _params_for(start, config.steps)
        if config.mode not in MODES:
            raise InputError(f"--mode must be one of {', '.join(MODES)}, got {config.mode!r}")
        if config.history_stride < 0:
            raise InputError(
                f"--history-stride must be >= 0 (0: behaviours only), got {config.history_stride}"
            )
        self.default_mode = config.mode
        if config.score_split < 1:
            raise InputError(f"--score-split must be >= 1, got {config.score_split}")
        self.score_split = config.score_split
        self.max_len = int(max_len)
        self.history_stride = config.history_stride
        start_nodes = np.asarray(graph.nodes[start], np.int32)
        # With stride 0 the start layer is not used; one node keeps the variable non-empty.
        thin = start_nodes[:: config.history_stride] if config.history_stride else start_nodes[:1]
        self.history_start_nodes = tf.Variable(thin, trainable=False, name="history_start_nodes")
        # The start nodes' e_v, held apart: read in order, not gathered from item_e per request
        # (not when layer 0 is the start layer: that copy would be all of item_e).
        self.start_e = self.history_start_e = None
        if start > 0:
            self.start_e = tf.Variable(
                item_e[start_nodes].astype(np.float32), trainable=False, name="start_e"
            )
            self.history_start_e = tf.Variable(
                item_e[thin].astype(np.float32), trainable=False, name="history_start_e"
            )
        if not 1 <= config.k <= min(ef0, self.num_items):
            raise InputError(
                f"k must be in 1..min(ef_0, items) = 1..{min(ef0, self.num_items)}, got {config.k}"
            )

        # The XLA scorer is traced once, with a fixed signature: every call site in every signature
        # calls this one function, so one compilation per shape serves them all and a warm-up
        # that meets every shape leaves nothing to compile.
        dim = int(item_e.shape[1])
        self._xla_score = tf.function(
            self._score,
            jit_compile=True,
            input_signature=[self._state_spec(dim), tf.TensorSpec([None, None, dim], tf.float32)],
        )
        self.xla_max_width, self.xla_widths = xla_shapes(
            num_items=self.num_items,
            ef=self.default_ef,
            max_len=self.max_len,
            max_degree=max(int(nb.shape[1]) for nb in graph.neighbors),
            fixed=[len(start_nodes), len(thin)] if start > 0 else [],
        )

        # Set by export() from a measured walk unless the config names it; read per request.
        if config.exact_below is not None and config.exact_below < 0:
            raise InputError(f"--exact-below must be >= 0, got {config.exact_below}")
        self.exact_below = tf.Variable(np.int32(config.exact_below or 0), trainable=False, name="exact_below")

        depth = start + 1
        history = tf.TensorSpec([None, None], tf.int64, name="history")
        params = [
            history,
            tf.TensorSpec([None], tf.int32, name="k"),
            tf.TensorSpec([None, depth], tf.int32, name="ef"),
            tf.TensorSpec([None, depth], tf.int32, name="steps"),
            tf.TensorSpec([None], tf.string, name="mode"),
        ]
        filter_params = params + [
            tf.TensorSpec([None, None], tf.int64, name="exclude_items"),
            tf.TensorSpec([None], tf.bool, name="exclude_history"),
            tf.TensorSpec([None, None], tf.int32, name="allow_categories"),
            tf.TensorSpec([None, None], tf.int32, name="exclude_categories"),
        ]
        self.serve_default = tf.function(self._serve_default, input_signature=[history])
        self.retrieve = tf.function(self._retrieve_stock, input_signature=params)
        self.retrieve_xla = tf.function(self._retrieve_xla, input_signature=params)
        self.retrieve_filtered = tf.function(self._filtered_fn(xla=False), input_signature=filter_params)
        self.retrieve_filtered_xla = tf.function(self._filtered_fn(xla=True), input_signature=filter_params)
        self.warmup_xla = tf.function(self._warmup_xla, input_signature=[history])

    def _state_spec(self, dim: int) -> dict:
        """The user state's structure with the batch and history axes left open."""
        probe_len = 7919  # a history length no other axis has, so that its axes can be found
        state = self.model.user_state(tf.zeros([1, probe_len, dim]), tf.ones([1, probe_len], tf.bool))
        return {
            name: tf.TensorSpec([None] + [None if d == probe_len else d for d in t.shape[1:]], t.dtype)
            for name, t in state.items()
        }

    def _score(self, state, cand):
        return self.model.score(state, cand)

    def _fast_score(self, state, cand):
        """The XLA scorer for candidates [B, N, D] up to :attr:`xla_max_width`, the stock one beyond.

        The batch is padded to the next of :data:`XLA_BATCHES` and the candidates are scored in
        ``score_split`` parts that TensorFlow's inter-op threads run side by side (one XLA call
        runs mostly on one thread). Wider calls (only a request with a much larger ef makes one)
        run the stock scorer rather than compile a new shape while a caller waits.
        """

        def compiled():
            batch = tf.shape(cand)[0]
            at = tf.minimum(tf.searchsorted(XLA_BATCHES, tf.reshape(batch, [1])), len(XLA_BATCHES) - 1)
            pad = tf.maximum(tf.gather(XLA_BATCHES, at)[0], batch) - batch
            padded = {
                name: tf.pad(t, [[0, pad]] + [[0, 0]] * (t.shape.rank - 1)) for name, t in state.items()
            }
            part = split_scorer(lambda c: self._xla_score(padded, c), self.score_split)
            return part(tf.pad(cand, [[0, pad], [0, 0], [0, 0]]))[:batch]

        width = cand.shape[1]
        if width is not None:
            return compiled() if width <= self.xla_max_width else self._score(state, cand)
        return tf.cond(tf.shape(cand)[1] <= self.xla_max_width, compiled, lambda: self._score(state, cand))

    # -- boundary checks ---------------------------------------------------------
    def _dense_history(self, history, item_ids):
        """Original ids [B, L] (-1 padded) -> dense ids; unknown ids and empty rows are errors."""
        pad = history < 0
        pos = tf.searchsorted(item_ids, tf.reshape(tf.maximum(history, 0), [-1]), out_type=tf.int32)
        pos = tf.reshape(tf.minimum(pos, self.num_items - 1), tf.shape(history))
        found = tf.gather(item_ids, pos) == history
        checks = [
            tf.debugging.assert_greater(
                tf.shape(history)[0], 0, message="history must hold at least one user"
            ),
            tf.debugging.Assert(
                tf.reduce_all(found | pad),
                [
                    "history holds item ids that are not in the corpus (pad with -1); unknown ids:",
                    tf.boolean_mask(history, ~(found | pad)),
                ],
                summarize=10,
            ),
            tf.debugging.Assert(
                tf.reduce_all(tf.reduce_any(~pad, axis=1)),
                [
                    "every user needs at least one behaviour; rows of history that are all padding:",
                    tf.where(~tf.reduce_any(~pad, axis=1))[:, 0],
                ],
                summarize=10,
            ),
        ]
        with tf.control_dependencies(checks):
            return tf.where(pad, -1, pos)

    def _check_params(self, k, ef, steps):
        n = self.num_items
        return [
            tf.debugging.Assert((k >= 1) & (k <= n), [f"k must be in 1..{n} (the corpus size), got", k]),
            tf.debugging.Assert(tf.reduce_all(ef >= 1), ["every ef must be >= 1, got", ef]),
            tf.debugging.Assert(
                ef[-1] >= k, ["ef of layer 0 (the last ef) must be >= k; got ef", ef, "k", k]
            ),
            tf.debugging.Assert(
                tf.reduce_all(steps >= 0) & (steps[-1] >= 1),
                ["every step count T must be >= 0, and T of layer 0 (the last) >= 1, got", steps],
            ),
        ]

    # -- serving -------------------------------------------------------------------
    def _serve_default(self, history):
        return self._run(
            history,
            tf.constant(self.default_k),
            tf.constant(self.default_ef),
            tf.constant(self.default_steps),
            tf.constant(self.default_mode),
        )

    def _retrieve_stock(self, history, k, ef, steps, mode):
        return self._retrieve_signature(history, k, ef, steps, mode, None, xla=False)

    def _retrieve_xla(self, history, k, ef, steps, mode):
        return self._retrieve_signature(history, k, ef, steps, mode, None, xla=True)

    def _filtered_fn(self, xla: bool):
        """``retrieve_filtered`` (stock scorer) or ``retrieve_filtered_xla``, inputs by name."""

        def retrieve(
            history, k, ef, steps, mode, exclude_items, exclude_history, allow_categories, exclude_categories
        ):
            filters = (exclude_items, exclude_history, allow_categories, exclude_categories)
            return self._retrieve_signature(history, k, ef, steps, mode, filters, xla=xla)

        retrieve.__name__ = "_retrieve_filtered_xla" if xla else "_retrieve_filtered"
        return retrieve

    def _warmup_xla(self, history):
        """Runs the XLA scorer at every width of :attr:`xla_widths` for this batch size."""
        state = self._user_state(history, xla=True)
        batch, dim = tf.shape(history)[0], self.item_e.shape[1]
        scores = [self._fast_score(state, tf.zeros([batch, w, dim])) for w in self.xla_widths]
        finite = [tf.reduce_sum(tf.cast(tf.math.is_finite(s), tf.int32)) for s in scores]
        return {"widths": tf.constant(self.xla_widths, tf.int32), "finite": tf.add_n(finite)}

    def _user_state(self, history, xla: bool):
        item_ids = tf.convert_to_tensor(self.item_ids)
        dense = self._dense_history(history, item_ids)
        if xla:
            dense = self._pad_history(dense)
        return self.model.user_state(tf.gather(self.item_e, tf.maximum(dense, 0)), dense >= 0)

    def _pad_history(self, dense):
        # XLA compiles per shape, and the scorer's user state is [B, L, D]: histories of every
        # length would each compile every candidate width. Pad them to max_len.
        short = tf.maximum(self.max_len - tf.shape(dense)[1], 0)
        return tf.pad(dense, [[0, 0], [0, short]], constant_values=-1)

    def _retrieve_signature(self, history, k, ef, steps, mode, filters, xla: bool):
        rows = tf.shape(history)[0]
        same = [
            tf.debugging.Assert(
                tf.reduce_all(k == k[0])
                & tf.reduce_all(ef == ef[:1])
                & tf.reduce_all(steps == steps[:1])
                & tf.reduce_all(mode == mode[0]),
                ["all rows of a request must share k, ef, steps and mode"],
            ),
            tf.debugging.assert_equal(
                tf.shape(k)[0], rows, message="k, ef, steps and mode need one row per history row"
            ),
            *(
                tf.debugging.assert_equal(
                    tf.shape(f)[0], rows, message="every filter input needs one row per history row"
                )
                for f in filters or ()
            ),
        ]
        with tf.control_dependencies(same):
            return self._run(history, k[0], ef[0], steps[0], mode[0], xla, filters)

    def _run(self, history, k, ef, steps, mode, xla: bool = False, filters=None):
        # item_ids is read whole (searchsorted needs it) and gathered from that one read: a gather
        # on the variable itself (ResourceGather) puts it in copy-on-read mode, after which every
        # whole read copies it (31 MB per request at 3.9M items).
        item_ids = tf.convert_to_tensor(self.item_ids)
        dense = self._dense_history(history, item_ids)
        # Every use of the parameters waits for their checks, so a bad value fails with its
        # message rather than deep inside the search.
        with tf.control_dependencies(self._check_params(k, ef, steps)):
            dense, k, ef, steps = (tf.identity(t) for t in (dense, k, ef, steps))
        if xla:
            dense = self._pad_history(dense)
        hist_e = tf.gather(self.item_e, tf.maximum(dense, 0))
        state = self.model.user_state(hist_e, dense >= 0)

        def score_fn(cand):
            return self._fast_score(state, cand) if xla else self._score(state, cand)

        batch = tf.shape(history)[0]
        # Top-down, as everywhere: entry 0 is the start layer, the last entry layer 0.
        ef_list = [ef[i] for i in range(self.start_layer + 1)]
        steps_list = [steps[i] for i in range(self.start_layer + 1)]

        def walks(ef_list, steps_list, flt=None, entries=None, k_out=None):
            """Per mode, its search -> (ids, scores, scored), the best ``k_out`` (default k);
            with a filter, the walks' filtered forms -> (ids, scores, scored, removed)."""
            k_out = k if k_out is None else k_out

            def walk(start, **options):
                # A walk that starts lower takes the lower layers' entries.
                return search.beam_retrieval(
                    self.graph,
                    score_fn,
                    self.item_e,
                    batch,
                    k_out,
                    ef_list[-start - 1 :],
                    steps_list[-start - 1 :],
                    start,
                    flt=flt,
                    **options,
                )

            # A filtered walk also starts from one item of each allowed category (entries).
            def beam(marking):
                # (A start layer 0 scores every item already: no seeds there.)
                seeds = entries if self.start_layer > 0 else None
                return lambda: walk(self.start_layer, marking=marking, start_e=self.start_e, seeds=seeds)

            def beam_history():
                return walk(
                    self.start_layer if self.history_stride else 0,
                    start_nodes=self.history_start_nodes,
                    seeds=dense if entries is None else tf.concat([dense, entries], axis=1),
                    start_e=self.history_start_e,
                )

            def hnsw():
                if flt is None:
                    return search.hnsw_retrieval(self.graph, score_fn, self.item_e, batch, k_out, ef_list[-1])
                # HNSW's walk knows no filter: its whole layer-0 result set, filtered.
                ids, scores, scored = search.hnsw_retrieval(
                    self.graph, score_fn, self.item_e, batch, ef_list[-1], ef_list[-1]
                )
                found = search.Found.start(ids, scores, flt.allows(ids), k)
                return found[0], found[1], scored, found[2]

            return {
                "beam": beam("bitmap"),
                "beam_history": beam_history,
                "beam_sets": beam("sets"),
                "hnsw": hnsw,
                "exhaustive": lambda: search.exhaustive_retrieval(score_fn, self.item_e, batch, k_out),
            }

        match = tf.equal(mode, list(MODES))
        with tf.control_dependencies(
            [
                tf.debugging.Assert(
                    tf.reduce_any(match), ["mode must be one of", ", ".join(MODES), "got", mode]
                )
            ]
        ):
            # One N-way switch (a Case op): a chain of conds would route every captured tensor of
            # the later branches through a Switch per level, hundreds of ops per request.
            index = tf.identity(tf.argmax(tf.cast(match, tf.int32), output_type=tf.int32))

        def unfiltered():
            branches = walks(ef_list, steps_list)
            return tf.switch_case(index, [branches[n] for n in MODES])

        if filters is None:
            ids, scores, scored = unfiltered()
            return {"item_ids": tf.gather(item_ids, tf.maximum(ids, 0)), "scores": scores, "scored": scored}

        flt, allowed, entries = self._filter(dense, item_ids, *filters)
        ids, scores, scored, plan, removed = self._filtered(
            flt, allowed, entries, k, ef_list, steps_list, index, walks, score_fn, batch
        )
        return {
            "item_ids": tf.where(ids >= 0, tf.gather(item_ids, tf.maximum(ids, 0)), contract.PAD_ID),
            "scores": scores,
            "scored": scored,
            "plan": plan,
            "removed": removed,
        }

    # -- filters -------------------------------------------------------------------
    def _filter(self, dense, item_ids, exclude_items, exclude_history, allow_categories, exclude_categories):
        """The filter inputs -> (a :class:`walk.search.Filter`, allowed items per row [B], extra
        entry points [B, m] -1 padded: one item of each category a
        row's allow-list names, when it names at most ENTRY_CATEGORIES). Unknown item ids and
        category indices are ignored."""
        n, c = self.num_items, self.num_categories
        batch = tf.shape(dense)[0]
        pos = tf.searchsorted(item_ids, tf.reshape(tf.maximum(exclude_items, 0), [-1]), out_type=tf.int32)
        pos = tf.reshape(tf.minimum(pos, n - 1), tf.shape(exclude_items))
        known = (exclude_items >= 0) & (tf.gather(item_ids, pos) == exclude_items)
        from_history = tf.where(exclude_history[:, None] & (dense >= 0), dense, n)
        excluded = tf.sort(
            tf.concat([tf.where(known, pos, n), from_history, tf.fill([batch, 1], n)], axis=1), axis=1
        )

        def category_mask(cats):
            valid = (cats >= 0) & (cats < c)
            at = tf.where(valid, tf.range(batch)[:, None] * c + cats, batch * c)
            at = tf.reshape(at, [-1])
            hits = tf.math.unsorted_segment_sum(tf.ones_like(at), at, batch * c + 1)
            return tf.reshape(hits[:-1] > 0, [batch, c]), tf.reduce_any(valid, axis=1)

        allow, has_allow = category_mask(allow_categories)
        deny, _ = category_mask(exclude_categories)
        category_ok = tf.where(has_allow[:, None], allow, True) & ~deny
        flt = search.Filter(tf.convert_to_tensor(self.item_category), category_ok, excluded)
        # Allowed items per row: the allowed categories' sizes, less the excluded items in them.
        offsets = tf.convert_to_tensor(self.category_offsets)
        sizes = offsets[1:] - offsets[:-1]
        in_categories = tf.reduce_sum(tf.where(category_ok, sizes[None], 0), axis=1)
        first = tf.concat([tf.ones([batch, 1], tf.bool), excluded[:, 1:] != excluded[:, :-1]], axis=1)
        counted = flt.allows(tf.where(first & (excluded < n), excluded, -1), check_excluded=False)
        allowed = in_categories - tf.reduce_sum(tf.cast(counted, tf.int32), axis=1)
        named = tf.reduce_sum(tf.cast(allow, tf.int32), axis=1)
        seeded = allow & (has_allow & (named <= ENTRY_CATEGORIES))[:, None]
        entries = tf.where(seeded, tf.convert_to_tensor(self.category_entries)[None, :], -1)
        at = tf.where(entries >= 0)
        entries = tf.RaggedTensor.from_value_rowids(
            tf.gather_nd(entries, at), at[:, 0], nrows=tf.cast(batch, tf.int64), validate=False
        ).to_tensor(default_value=-1)
        entries = tf.concat([entries, tf.fill([batch, 1], -1)], axis=1)  # never zero-wide
        return flt, allowed, entries

    def _allowed_items(self, flt):
        """Every row's allowed items [B, M] (dense ids, -1 padded), gathered by category."""
        batch = tf.shape(flt.category_ok)[0]
        at = tf.where(flt.category_ok)
        offsets = tf.convert_to_tensor(self.category_offsets)
        ranges = tf.ragged.range(tf.gather(offsets, at[:, 1]), tf.gather(offsets, at[:, 1] + 1))
        rows = tf.repeat(at[:, 0], tf.cast(ranges.row_lengths(), tf.int64))
        items = tf.gather(tf.convert_to_tensor(self.category_items), ranges.flat_values)
        cand = tf.RaggedTensor.from_value_rowids(items, rows, nrows=tf.cast(batch, tf.int64), validate=False)
        cand = cand.to_tensor(default_value=-1)
        return tf.where(flt.allows(cand), cand, -1)

    def _filtered(self, flt, allowed, entries, k, ef_list, steps_list, index, walks, score_fn, batch):
        """The planner: (ids, scores, scored, plan, removed) of a filtered request.

        exact: every row allows at most ``exact_below`` items: they are scored, all of them.
        walk: the filtered walk of the request's mode; when no row constrains categories (item
        exclusions alone: the blocklist, the history), the unfiltered walk with its layer-0 beam
        filtered, which scores what an unfiltered call scores. walk+widen: rows whose walk found fewer
        than min(k, allowed) items walk again with layer 0's ef x WIDEN_EF and T x WIDEN_STEPS,
        and rows still short get the exact answer over their allowed items.
        """
        want = tf.minimum(k, allowed)
        exact_below = tf.convert_to_tensor(self.exact_below)
        exhaustive = tf.equal(index, MODES.index("exhaustive"))
        # A selective filter leaves fewer allowed items in each neighbourhood: layer 0's beam grows
        # as (the share of items the most selective row allows) ** -SELECTIVE_POWER, at most
        # SELECTIVE_EF times, and walks SELECTIVE_STEPS times the rounds (a walk stops when no new
        # item enters its beam, so the rounds cost only where they find something); a walk that
        # grown costs about that many times more.
        share = tf.cast(tf.reduce_min(allowed), tf.float32) / self.num_items
        grow = tf.clip_by_value(tf.maximum(share, 1e-12) ** -SELECTIVE_POWER, 1.0, SELECTIVE_EF)
        base_ef0 = tf.cast(tf.math.round(tf.cast(ef_list[-1], tf.float32) * grow), tf.int32)
        # Exact when scoring every allowed item costs no more than exact_below (EXACT_COST_FACTOR
        # unfiltered walks) times that growth. exhaustive under a filter is the exact answer over
        # the allowed items, which this plan gives; beam_sets walks as beam (only the marking differs).
        fits = tf.cast(allowed, tf.float32) <= tf.cast(exact_below, tf.float32) * grow
        use_exact = tf.reduce_all(fits) | exhaustive
        walk_modes = ("beam", "beam_history", "hnsw")
        walk_index = tf.gather(
            [walk_modes.index({"beam_sets": "beam", "exhaustive": "beam"}.get(m, m)) for m in MODES], index
        )

        def attempt(t, ids, scores, scored, removed, short, widened):
            # One trace serves both attempts: the second widens layer 0.
            wide = t > 0
            ef0 = tf.where(wide, base_ef0 * WIDEN_EF, base_ef0)
            t0 = steps_list[-1] * SELECTIVE_STEPS
            t0 = tf.where(wide, t0 * WIDEN_STEPS, t0)
            branches = walks(ef_list[:-1] + [ef0], steps_list[:-1] + [t0], flt, entries)
            n_ids, n_scores, n_scored, n_removed = tf.switch_case(
                walk_index, [branches[m] for m in walk_modes]
            )
            return (
                t + 1,
                tf.where(short[:, None], n_ids, ids),
                tf.where(short[:, None], n_scores, scores),
                scored + tf.where(short, n_scored, 0),
                removed + tf.where(short, n_removed, 0),
                short & (tf.reduce_sum(tf.cast(n_ids >= 0, tf.int32), axis=1) < want),
                widened | (short & wide),
            )

        # Exclusions alone (no row names categories): the unfiltered walk, its whole layer-0 beam
        # kept, then filtered. The beam is the best ef of all the walk scored, so while it holds k
        # allowed items they are the filtered walk's answer over the same items scored; excluded
        # items cost beam slots only. Rows left short widen, as below.
        post_filter = tf.reduce_all(flt.category_ok) & ~use_exact

        def beam_then_filter():
            branches = walks(ef_list, steps_list, k_out=ef_list[-1])
            b_ids, b_scores, b_scored = tf.switch_case(walk_index, [branches[m] for m in walk_modes])
            f_ids, f_scores, f_removed = search.Found.start(b_ids, b_scores, flt.allows(b_ids), k)
            f_short = tf.reduce_sum(tf.cast(f_ids >= 0, tf.int32), axis=1) < want
            return tf.constant(1), f_ids, f_scores, b_scored, f_removed, f_short

        def nothing_yet():
            empty = tf.fill([batch, k], -1)
            none = tf.fill([batch, k], tf.constant(-np.inf, self.item_e.dtype))
            zeros = tf.zeros([batch], tf.int32)
            return tf.constant(0), empty, none, zeros, zeros, tf.fill([batch], True)

        start = [*tf.cond(post_filter, beam_then_filter, nothing_yet), tf.fill([batch], False)]
        _, ids, scores, scored, removed, short, widened = tf.while_loop(
            lambda t, ids, scores, scored, removed, short, widened: (
                (t < 2) & ~use_exact & tf.reduce_any(short)
            ),
            attempt,
            start,
            shape_invariants=[
                tf.TensorShape([]),
                tf.TensorShape([None, None]),
                tf.TensorShape([None, None]),
                tf.TensorShape([None]),
                tf.TensorShape([None]),
                tf.TensorShape([None]),
                tf.TensorShape([None]),
            ],
        )
        # Rows still short (all rows on the exact plan) get the exact answer over their allowed items.
        short = short | use_exact

        def exact_rest():
            def gathered():
                return search.exact_retrieval(score_fn, self.item_e, self._allowed_items(flt), k)

            def scanned():
                return search.exhaustive_retrieval(score_fn, self.item_e, batch, k, flt=flt)

            e_ids, e_scores, e_scored = tf.cond(
                tf.reduce_max(allowed) <= EXACT_GATHER_LIMIT, gathered, scanned
            )
            return (
                tf.where(short[:, None], e_ids, ids),
                tf.where(short[:, None], e_scores, scores),
                scored + tf.where(short, e_scored, 0),
            )

        ids, scores, scored = tf.cond(tf.reduce_any(short), exact_rest, lambda: (ids, scores, scored))
        plan = tf.where(
            use_exact,
            contract.PLANS.index("exact"),
            tf.where(widened | short, contract.PLANS.index("walk+widen"), contract.PLANS.index("walk")),
        )
        return ids, scores, scored, tf.broadcast_to(plan, [batch]), removed


def split_scorer(score_fn, parts: int):
    """``score_fn`` (candidates [B, N, D] -> [B, N]) run on ``parts`` slices of the candidate axis.

    The calls are independent, so TensorFlow runs them on its inter-op threads at once: with one
    intra-op thread (the server's ``--intra-op-threads 1``) an XLA scorer then uses every core
    on a single request, where one call would use one. Slice widths differ by at most one.
    """
    if parts <= 1:
        return score_fn

    def scorer(cand):
        width = cand.shape[1]
        if width is not None and width < parts:
            return score_fn(cand)
        if width is None:
            width = tf.shape(cand)[1]
        cuts = [width * i // parts for i in range(parts + 1)]
        return tf.concat([score_fn(cand[:, a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)], axis=1)

    return scorer


def _next_version(export_root: Path) -> int:
    return max(contract.versions(export_root), default=0) + 1


# (users per request, requests). Many single-user requests: the serving batch, and the walk widths an
# XLA scorer compiles once each (a width first met while serving would stall that call).
WARMUP_BATCHES = ((1, 48), (4, 4), (16, 2), (32, 2))


def corpus_tables(workdir: Path, max_len: int, num_categories: int):
    """(item -> dense category [N], category labels [C], real behaviour histories [u, max_len] in
    original ids, -1 padded) for the export: each user's most recent behaviours, so that the warm-up
    walks reach the candidate widths real requests reach.

    Read from the embeddings artifact (written by train), so that an export needs no training data;
    a workdir trained before it carried them falls back to the dataset and the model.
    """
    from model_export import train

    emb = workdir / "embeddings"
    if (emb / train.ITEM_CATEGORY_FILE).is_file():
        item_category = np.load(emb / train.ITEM_CATEGORY_FILE)
        labels = [str(x) for x in json.loads((emb / train.CATEGORY_LABELS_FILE).read_text())]
        hist = np.load(emb / train.SAMPLE_HISTORIES_FILE)
    else:
        from model_export.data import load_dataset

        ds = load_dataset(workdir / "dataset")
        item_category = None  # the model's own table
        labels = [str(x) for x in ds.category_names]
        hist = ds.sample_histories(train.SAMPLE_USERS, max_len)
    if len(labels) != num_categories:
        raise ArtifactError(f"{emb} names {len(labels)} categories, the model {num_categories}; re-run train")
    return item_category, labels, np.asarray(hist, np.int64)[:, :max_len]


def write_warmup_requests(path: Path, histories: np.ndarray, k: int, ef, steps, mode: str) -> int:
    """Writes TF Serving's warm-up file: PredictionLog records of ``retrieve`` calls at the defaults.

    TF Serving replays ``assets.extra/tf_serving_warmup_requests`` before it serves a version
    (``--enable_model_warmup``); the in-process server backend replays the same records before
    it reports SERVING. Batch sizes 1 to 32 over real histories make the walks reach the
    scorer's padded widths, so the first real requests do not pay for building kernels.

    Returns:
      The number of records written.
    """
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    path.parent.mkdir(parents=True, exist_ok=True)
    query = contract.Query(k, tuple(ef), tuple(steps), mode)
    # Unfiltered calls at every batch size, then each filter kind once at batch 1 (the filtered
    # walk, the exact plan over one category, a deny-list).
    calls = [
        ([contract.NO_FILTER] * batch, batch) for batch, requests in WARMUP_BATCHES for _ in range(requests)
    ]
    calls += [
        ([contract.RowFilter(exclude_history=True)], 1),
        ([contract.RowFilter(allow_categories=(0,))], 1),
        ([contract.RowFilter(exclude_categories=(0,))], 1),
    ]
    count, row = 0, 0
    with tf.io.TFRecordWriter(str(path)) as writer:
        for filters, batch in calls:
            take = np.arange(row, row + batch) % len(histories)
            row += batch
            request = predict_pb2.PredictRequest()
            with_filters = contract.filtered(filters)
            request.model_spec.signature_name = (
                contract.FILTER_SIGNATURE if with_filters else contract.RETRIEVE_SIGNATURE
            )
            inputs = contract.retrieve_inputs(histories[take], query, filters if with_filters else None)
            for name, value in inputs.items():
                request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
            count += 1
    return count


def xla_shapes(*, num_items: int, ef, max_len: int, max_degree: int, fixed=()) -> tuple[int, list[int]]:
    """The widest candidate call the XLA scorer takes, and every width it is warmed up at.

    A layer's first round expands every entry point (at most the largest ef plus the user's
    ``max_len`` behaviours), a later round the beam's newest members (at most ef), each with up
    to ``max_degree`` neighbours: the default query never scores more candidates in one call.
    Walk calls are padded to :data:`walk.search.WIDTH_GRID`; the start layer's calls have the
    ``fixed`` widths, and exhaustive search's its chunk and the corpus' remainder.
    """
    most = min(num_items, (max(ef) + max_len) * max_degree)
    widest = search.WIDTH_GRID[np.searchsorted(search.WIDTH_GRID, most)]
    chunk = search.EXHAUSTIVE_CHUNK
    widths = {int(w) for w in search.WIDTH_GRID if w <= widest}
    widths |= {int(w) for w in (*fixed, min(chunk, num_items), num_items % chunk) if 0 < w <= widest}
    return int(widest), sorted(widths)


def category_entries(item_e: np.ndarray, item_category: np.ndarray, num_categories: int) -> np.ndarray:
    """int32 [C]: each category's item nearest the mean e_v of its items (-1 for an empty one)."""
    entries = np.full(num_categories, -1, np.int32)
    order = np.argsort(item_category, kind="stable")
    bounds = np.searchsorted(item_category[order], np.arange(num_categories + 1))
    for c in range(num_categories):
        members = order[bounds[c] : bounds[c + 1]]
        if len(members):
            e = item_e[members]
            entries[c] = members[np.argmin(((e - e.mean(axis=0)) ** 2).sum(axis=1))]
    return entries


def measured_walk_cost(module: RetrievalModule, histories: np.ndarray, config: ExportConfig) -> float:
    """Items the default query scores per user, on the warm-up users, unfiltered: the filter
    planner's yardstick (EXACT_COST_FACTOR times this is where scoring the allowed items beats
    walking)."""
    query = contract.Query(config.k, module.default_ef, module.default_steps, config.mode)
    scored = []
    for start in range(0, len(histories), 16):
        rows = histories[start : start + 16]
        inputs = contract.retrieve_inputs(rows, query)
        out = module.retrieve(**{name: tf.constant(value) for name, value in inputs.items()})
        scored.append(out["scored"].numpy())
    return float(np.concatenate(scored).mean())


def export(workdir: str | Path, config: ExportConfig = ExportConfig()) -> Path:
    """Writes the next ``DIR/export/<version>/`` SavedModel and returns its path.

    Besides the SavedModel, the version directory holds ``meta.json`` (provenance and the
    serving contract, :mod:`nann_common.contract`), ``assets.extra/item_ids.npy`` (the
    corpus' original ids, for callers that drop unknown history ids before calling) and
    ``assets.extra/tf_serving_warmup_requests``.

    Raises:
      ArtifactError: an input artifact is missing, damaged or from another run.
      InputError: bad export parameters.
    """
    workdir = Path(workdir)
    model_meta = artifacts.read_meta(workdir / "model", "model")
    emb_meta = artifacts.read_meta(workdir / "embeddings", "embeddings")
    if emb_meta["inputs"].get("model_weights_sha256") != model_meta["files"]["model.weights.h5"]["sha256"]:
        raise ArtifactError(f"{workdir / 'embeddings'} was computed from another model; re-run train")
    graph = graph_lib.load_graph(workdir / "index", embeddings_digest=artifacts.digest(emb_meta))
    model = load_model_files(workdir / "model")
    item_e = np.load(workdir / "embeddings" / "item_embeddings.npy")
    item_ids = np.load(workdir / "embeddings" / "item_ids.npy")
    max_len = int(model_meta["params"]["max_len"])
    item_category, categories, warmup = corpus_tables(workdir, max_len, int(model.config.num_categories))
    module = RetrievalModule(model, item_e, item_ids, graph, config, max_len, item_category)
    walk_cost = measured_walk_cost(module, warmup, config)
    exact_below = config.exact_below if config.exact_below is not None else int(EXACT_COST_FACTOR * walk_cost)
    module.exact_below.assign(exact_below)

    export_root = workdir / EXPORT_DIR
    export_root.mkdir(parents=True, exist_ok=True)
    version = _next_version(export_root)
    tmp = artifacts.temp_dir(export_root, f".{version}.tmp-")
    try:
        tf.saved_model.save(
            module,
            str(tmp),
            signatures={
                contract.DEFAULT_SIGNATURE: module.serve_default.get_concrete_function(),
                contract.RETRIEVE_SIGNATURE: module.retrieve.get_concrete_function(),
                contract.XLA_SIGNATURE: module.retrieve_xla.get_concrete_function(),
                contract.FILTER_SIGNATURE: module.retrieve_filtered.get_concrete_function(),
                contract.XLA_FILTER_SIGNATURE: module.retrieve_filtered_xla.get_concrete_function(),
                contract.XLA_WARMUP_SIGNATURE: module.warmup_xla.get_concrete_function(),
            },
        )
        (tmp / contract.ITEM_IDS_FILE).parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp / contract.ITEM_IDS_FILE, np.asarray(item_ids, np.int64))
        (tmp / contract.CATEGORIES_FILE).write_text(json.dumps(categories) + "\n")
        records = write_warmup_requests(
            tmp / contract.WARMUP_FILE, warmup, config.k, module.default_ef, module.default_steps, config.mode
        )
        params = {
            **dataclasses.asdict(config),
            "start_layer": module.start_layer,
            "ef": list(module.default_ef),
            "steps": list(module.default_steps),
            "layer_sizes": module.graph.layer_sizes,
            "warmup_records": records,
            "xla_max_width": module.xla_max_width,
            "xla_widths": module.xla_widths,
            "exact_below": exact_below,
            "walk_cost": round(walk_cost, 1),
        }
        meta = artifacts.provenance(
            "saved_model",
            params,
            inputs={
                "model": artifacts.digest(model_meta),
                "embeddings": artifacts.digest(emb_meta),
                "index": artifacts.digest(graph.meta),
            },
        )
        meta[contract.SERVING_KEY] = contract.serving_block(
            num_items=module.num_items,
            start_layer=module.start_layer,
            layer_sizes=module.graph.layer_sizes,
            max_len=max_len,
            k=config.k,
            ef=module.default_ef,
            steps=module.default_steps,
            mode=config.mode,
            xla_batches=XLA_BATCHES,
            num_categories=module.num_categories,
            exact_below=exact_below,
        )
        artifacts.write_meta(tmp, meta)
        final = export_root / str(version)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info(
        "exported %s (start layer %d, defaults mode=%s k=%d ef=%s T=%s, history stride %d; "
        "XLA scorer in %d parts, compiled at %d widths up to %d per batch size; %d warm-up records)",
        final,
        module.start_layer,
        config.mode,
        config.k,
        module.default_ef,
        module.default_steps,
        config.history_stride,
        config.score_split,
        len(module.xla_widths),
        module.xla_max_width,
        records,
    )
    return final


def latest_export(workdir: str | Path) -> Path:
    """The highest-numbered SavedModel version under ``DIR/export``."""
    root = Path(workdir) / EXPORT_DIR
    found = contract.versions(root)
    if not found:
        raise ArtifactError(
            f"{root} holds no SavedModel; run `python -m model_export export --workdir {workdir}`"
        )
    return root / str(found[-1])
