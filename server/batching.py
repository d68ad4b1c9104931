"""Micro-batching: concurrent calls with equal parameters share one model call.

Calls queue here; one dispatcher thread runs the model on everything queued for the oldest
call's (model version, query) key, up to ``max_batch`` users, then the next. At low load a
call runs alone at once (a thread hand-off is all it costs); under load the calls that
arrive while the model is busy form the next batch, as TF Serving's batcher does with one
batch thread per model. ``window_s`` > 0 additionally holds a lone call that long for company.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import numpy as np

from nann_common.contract import NO_FILTER, PAD_ID, Query, RowFilter
from server.backends import ModelSlot
from server.errors import Cancelled, DeadlineExceeded
from server.metrics import Metrics

logger = logging.getLogger(__name__)


class _Entry:
    __slots__ = (
        "slot",
        "query",
        "history",
        "filter",
        "deadline",
        "alive",
        "enqueued",
        "done",
        "result",
        "error",
    )

    def __init__(
        self, slot: ModelSlot, query: Query, history: np.ndarray, row_filter: RowFilter, deadline, alive
    ):
        self.slot, self.query, self.history, self.deadline, self.alive = slot, query, history, deadline, alive
        self.filter = row_filter
        self.enqueued = time.monotonic()
        self.done = threading.Event()
        self.result = None
        self.error: BaseException | None = None


class MicroBatcher:
    """Groups single-user calls into batched model calls on one dispatcher thread."""

    def __init__(self, window_s: float, max_batch: int, metrics: Metrics):
        self.window_s, self.max_batch, self.metrics = window_s, max_batch, metrics
        self._cond = threading.Condition()
        self._queue: collections.deque[_Entry] = collections.deque()
        self._closed = False
        self._thread = threading.Thread(target=self._dispatch, name="batcher", daemon=True)
        self._thread.start()

    def run(
        self,
        slot: ModelSlot,
        history: np.ndarray,
        query: Query,
        deadline: float | None,
        alive=None,
        row_filter: RowFilter = NO_FILTER,
    ):
        """One user's row of the shared model call's :class:`server.backends.Answer`.

        ``alive()`` False (the caller cancelled) drops the call before the model runs it.
        """
        entry = _Entry(slot, query, history, row_filter, deadline, alive or (lambda: True))
        with self._cond:
            self._queue.append(entry)
            self._cond.notify()
        entry.done.wait()
        if entry.error is not None:
            raise entry.error
        return entry.result

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _take(self) -> list[_Entry]:
        """The next batch: queued calls sharing the oldest call's key (waits for work)."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return []
            first = self._queue[0]
            # Filtered and unfiltered calls batch apart: an unfiltered batch runs the plain walk.
            key = (id(first.slot), first.query, bool(first.filter))
            if self.window_s > 0:
                end = first.enqueued + self.window_s
                while len(self._queue) < self.max_batch and (left := end - time.monotonic()) > 0:
                    self._cond.wait(left)
            batch, rest = [], collections.deque()
            while self._queue:
                e = self._queue.popleft()
                if len(batch) < self.max_batch and (id(e.slot), e.query, bool(e.filter)) == key:
                    batch.append(e)
                else:
                    rest.append(e)
            self._queue = rest
            return batch

    def _dispatch(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            try:
                self._run_batch(batch)
            except BaseException as error:  # the dispatcher must outlive any batch
                logger.exception("batch failed outside the model call")
                for e in batch:
                    if not e.done.is_set():
                        e.error = error
                        e.done.set()

    def _run_batch(self, entries: list[_Entry]) -> None:
        now = time.monotonic()
        live = []
        for e in entries:
            self.metrics.stage.labels("queue_wait").observe(now - e.enqueued)
            if e.deadline is not None and e.deadline <= now:
                e.error = DeadlineExceeded("the deadline passed while the call waited for the model")
                e.done.set()
            elif not e.alive():
                e.error = Cancelled("the call was cancelled while it waited for the model")
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
            filters = [e.filter for e in live] if live[0].filter else None
            answer = live[0].slot.run(histories, live[0].query, timeout, filters)
            for i, e in enumerate(live):
                e.result = type(answer)(*(part[i] for part in answer))
        except BaseException as error:  # every waiter learns the batch's fate
            for e in live:
                e.error = error
        finally:
            for e in live:
                e.done.set()
