"""Micro-batching: concurrent calls with equal parameters share one model call.

The first call of a (model version, query) key becomes the batch's leader: it waits up
to the window (or until ``max_batch`` users have joined), runs the model once on every
joined history, and hands each caller its row. No thread of its own: the callers' own
threads do the work, so an idle server costs nothing. Off unless ``--batch-window-ms``
is above 0 (see the README's serving benchmark for when it pays).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from nann_common.contract import PAD_ID, Query
from server.backends import ModelSlot
from server.errors import DeadlineExceeded
from server.metrics import Metrics


class _Entry:
    __slots__ = ("history", "deadline", "done", "result", "error")

    def __init__(self, history: np.ndarray, deadline: float | None):
        self.history, self.deadline = history, deadline
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None


class _Batch:
    def __init__(self):
        self.entries: list[_Entry] = []
        self.full = threading.Event()


class MicroBatcher:
    """Groups single-user calls into batched model calls."""

    def __init__(self, window_s: float, max_batch: int, metrics: Metrics):
        self.window_s, self.max_batch, self.metrics = window_s, max_batch, metrics
        self._lock = threading.Lock()
        self._open: dict[tuple, _Batch] = {}

    def run(self, slot: ModelSlot, history: np.ndarray, query: Query, deadline: float | None):
        """One user's (ids [k], scores [k], scored) through a shared model call."""
        key = (slot.version, id(slot), query)
        entry = _Entry(history, deadline)
        with self._lock:
            batch = self._open.get(key)
            leader = batch is None
            if leader:
                batch = self._open[key] = _Batch()
            batch.entries.append(entry)
            if len(batch.entries) >= self.max_batch:
                del self._open[key]
                batch.full.set()
        if leader:
            batch.full.wait(self.window_s)
            with self._lock:
                if self._open.get(key) is batch:
                    del self._open[key]
            self._run_batch(slot, query, batch.entries)
        else:
            entry.done.wait()
        if entry.error is not None:
            raise entry.error
        return entry.result

    def _run_batch(self, slot: ModelSlot, query: Query, entries: list[_Entry]) -> None:
        now = time.monotonic()
        live = []
        for e in entries:
            if e.deadline is not None and e.deadline <= now:
                e.error = DeadlineExceeded("the deadline passed while the call waited for its batch")
                e.done.set()
            else:
                live.append(e)
        if not live:
            return
        width = max(len(e.history) for e in live)
        histories = np.full((len(live), width), PAD_ID, np.int64)
        for i, e in enumerate(live):
            histories[i, : len(e.history)] = e.history
        deadlines = [e.deadline for e in live if e.deadline is not None]
        timeout = max(min(deadlines) - now, 0.001) if deadlines else None
        self.metrics.batch_size.observe(len(live))
        try:
            ids, scores, scored = slot.run(histories, query, timeout)
            for i, e in enumerate(live):
                e.result = (ids[i], scores[i], scored[i])
        except BaseException as error:  # every waiter learns the batch's fate
            for e in live:
                e.error = error
        finally:
            for e in live:
                e.done.set()
