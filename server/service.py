"""The Retriever servicer, and the interceptor that times every call and maps its errors.

A Retrieve call: check the deadline, take one model slot, resolve the query against the
slot's contract and the server's caps, read the history (inline or from the store), drop
ids the model does not know, run the model, stream the candidates in chunks with the
scored count, model version and dropped-id count in trailing metadata.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

import grpc
import numpy as np

from nann.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from nann_common.contract import NO_FILTER, PLANS, Query, RowFilter
from server.backends import Backend, ModelSlot
from server.batching import MicroBatcher
from server.config import Config
from server.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    UserNotFound,
    status_of,
)
from server.features import FeatureStore
from server.items import Blocklist
from server.metrics import Metrics

logger = logging.getLogger("server.access")

SERVICE_NAME = retrieval_pb2.DESCRIPTOR.services_by_name["Retriever"].full_name
MD_SCORED = "nann-items-scored"
MD_VERSION = "nann-model-version"
MD_DROPPED = "nann-unknown-ids-dropped"
MD_HISTORY = "nann-history-length"
MD_REQUEST_ID = "nann-request-id"
MD_PLAN = "nann-plan"
MD_REMOVED = "nann-filter-removed"
MD_FILTER_UNKNOWN = "nann-filter-unknown-ids"


class RetrieverService(retrieval_pb2_grpc.RetrieverServicer):
    def __init__(
        self,
        config: Config,
        backend: Backend,
        store: FeatureStore,
        metrics: Metrics,
        blocklist: Blocklist | None = None,
    ):
        self.config, self.backend, self.store, self.metrics = config, backend, store, metrics
        self.blocklist = blocklist or Blocklist()
        self._blocked_cache: tuple = (None, ())  # (blocklist state, model version), its known ids
        self.batcher = (
            MicroBatcher(config.batch_window_ms / 1000.0, config.max_batch, metrics)
            if config.max_batch > 1
            else None
        )

    # -- request checks -----------------------------------------------------------------
    def _query(self, request, slot: ModelSlot) -> Query:
        c = self.config
        if request.k < 0:
            raise InvalidArgument(
                f"k must be >= 0 (0 = the model's default {slot.contract.default_k}), got {request.k}"
            )
        if request.k > c.max_k:
            raise InvalidArgument(f"k must be at most {c.max_k} (the server's --max-k), got {request.k}")
        params = request.params
        for name, values, cap, flag in (
            ("ef", params.ef, c.max_ef, "--max-ef"),
            ("steps", params.steps, c.max_steps, "--max-steps"),
        ):
            if len(values) > slot.contract.depth:
                raise InvalidArgument(
                    f"{name} needs {slot.contract.depth} values (top-down from the start "
                    f"layer to layer 0), got {len(values)}"
                )
            if values and max(values) > cap:
                raise InvalidArgument(
                    f"every {name} value must be at most {cap} (the server's {flag}), got {max(values)}"
                )
        if params.mode == "exhaustive" and not c.allow_exhaustive:
            raise InvalidArgument(
                "mode exhaustive scores the whole corpus and is disabled on this server "
                "(--allow-exhaustive); use beam"
            )
        return slot.contract.resolve(
            request.k or None, list(params.ef), list(params.steps), params.mode or None
        )

    def _history(self, request) -> np.ndarray:
        c = self.config
        if len(request.history):
            if len(request.history) > c.max_history:
                raise InvalidArgument(
                    f"history holds {len(request.history)} ids; at most {c.max_history} "
                    "(the server's --max-history) are accepted, send the most recent"
                )
            history = np.fromiter(request.history, np.int64, len(request.history))
            if history.min() < 0:
                raise InvalidArgument(
                    "history item ids must be >= 0; send only real behaviours, oldest first"
                )
            return history
        if not request.user_id:
            raise InvalidArgument("give user_id (read from the feature store) or an inline history")
        if len(request.user_id.encode()) > c.max_user_id_bytes:
            raise InvalidArgument(f"user_id is longer than {c.max_user_id_bytes} bytes")
        started = time.perf_counter()
        try:
            history = self.store.history(request.user_id)
        except Exception:
            self.metrics.feature_errors.labels(self.store.name).inc()
            raise
        finally:
            self.metrics.stage.labels("feature_fetch").observe(time.perf_counter() - started)
        if history is None or len(history) == 0:
            raise UserNotFound(
                f"user {request.user_id!r} has no behaviours in the feature store; send an inline history"
            )
        return history

    def _filter(self, request, slot: ModelSlot) -> tuple[RowFilter | None, int]:
        """The request's filter (with the server's defaults) resolved against the model version:
        (the RowFilter, or None when it allows nothing at all; filter ids the model does not know)."""
        c = self.config
        f = request.filter
        given = request.HasField("filter")
        exclude_history = c.exclude_history or (given and f.exclude_history)
        blocked = self._blocked_items(slot)
        if not given and not exclude_history and not blocked:
            return NO_FILTER, 0
        if given:
            if len(f.exclude_item_ids) > c.max_exclude:
                raise InvalidArgument(
                    f"filter.exclude_item_ids holds {len(f.exclude_item_ids)} ids; at most {c.max_exclude} "
                    "(the server's --max-exclude) are accepted: block long-lived items in a new model "
                    "version instead (docs/service.md, Filters)"
                )
            lists = (f.categories, f.exclude_categories, f.category_labels, f.exclude_category_labels)
            if max(map(len, lists)) > c.max_exclude:
                raise InvalidArgument(
                    f"a filter category list holds more than {c.max_exclude} entries "
                    "(the server's --max-exclude)"
                )
            if any(i < 0 for i in f.exclude_item_ids):
                raise InvalidArgument("filter.exclude_item_ids must be >= 0 (original item ids)")
        if not slot.contract.has_filters:
            raise FailedPrecondition(
                f"model version {slot.version} was exported before filters; re-export it with "
                "`python -m model_export export` to serve filtered calls"
            )
        unknown = 0
        excluded: tuple[int, ...] = ()
        if given and len(f.exclude_item_ids):
            ids = np.unique(np.fromiter(f.exclude_item_ids, np.int64, len(f.exclude_item_ids)))
            pos = np.minimum(np.searchsorted(slot.item_ids, ids), len(slot.item_ids) - 1)
            found = slot.item_ids[pos] == ids
            unknown += int((~found).sum())
            excluded = tuple(ids[found].tolist())
        if blocked:
            excluded = tuple(np.union1d(excluded, blocked).tolist()) if excluded else blocked

        def dense(ints, labels) -> tuple[int, ...]:
            nonlocal unknown
            out = set()
            for label in [str(i) for i in ints] + list(labels):
                category = slot.categories.get(label)
                if category is None:
                    unknown += 1
                else:
                    out.add(category)
            return tuple(sorted(out))

        allow = dense(f.categories, f.category_labels) if given else ()
        deny = dense(f.exclude_categories, f.exclude_category_labels) if given else ()
        if given and (len(f.categories) or len(f.category_labels)) and not allow:
            return None, unknown  # an allow-list of categories this model does not have: nothing
        return RowFilter(excluded, bool(exclude_history), allow, deny), unknown

    def _blocked_items(self, slot: ModelSlot) -> tuple[int, ...]:
        """The blocklist's items that this model version holds (original ids, sorted), cached
        per blocklist state and version."""
        state = self.blocklist.current()
        key = (state.version, slot.version)
        cached_key, cached = self._blocked_cache
        if key != cached_key:
            ids = state.ids
            pos = np.minimum(np.searchsorted(slot.item_ids, ids), max(len(slot.item_ids) - 1, 0))
            cached = tuple((ids[slot.item_ids[pos] == ids] if len(ids) else ids).tolist())
            self._blocked_cache = (key, cached)
        return cached

    @staticmethod
    def _check_alive(context) -> None:
        if not context.is_active():
            raise Cancelled("the call was cancelled")
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the deadline passed before the work started")

    # -- the call -----------------------------------------------------------------------
    def Retrieve(self, request, context):
        started = time.perf_counter()
        rid = request.request_id
        if len(rid) > 128 or not (rid.isascii() and rid.isprintable()):
            raise InvalidArgument("request_id must be printable ASCII of at most 128 characters")
        self._check_alive(context)
        slot = self.backend.slot()
        query = self._query(request, slot)
        history = self._history(request)
        known, dropped = slot.known_history(history)
        self.metrics.unknown_dropped.inc(dropped)
        if len(known) == 0:
            what = "the inline history" if len(request.history) else f"user {request.user_id!r}'s history"
            error = InvalidArgument if len(request.history) else UserNotFound
            raise error(
                f"none of the {len(history)} ids in {what} is an item of model version "
                f"{slot.version}; at least one known behaviour is needed"
            )
        row_filter, filter_unknown = self._filter(request, slot)
        self._check_alive(context)
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        t_model = time.perf_counter()
        if row_filter is None:  # the filter allows no item of this model: nothing to run
            ids, scores = np.zeros(0, np.int64), np.zeros(0, np.float32)
            scored, plan, removed = 0, PLANS.index("exact"), 0
        elif self.batcher is not None:
            ids, scores, scored, plan, removed = self.batcher.run(
                slot, known, query, deadline, context.is_active, row_filter
            )
        else:
            self.metrics.batch_size.observe(1)
            answer = slot.run(known[None, :], query, remaining, [row_filter] if row_filter else None)
            ids, scores, scored, plan, removed = (part[0] for part in answer)
        self.metrics.stage.labels("model_call").observe(time.perf_counter() - t_model)
        self.metrics.items_scored.observe(float(scored))
        self._check_alive(context)

        found = np.isfinite(scores)  # fewer than k allowed or reachable: the model pads with -inf
        ids, scores = ids[found], scores[found]
        metadata = [
            (MD_SCORED, str(int(scored))),
            (MD_VERSION, str(slot.version)),
            (MD_DROPPED, str(dropped)),
            (MD_HISTORY, str(len(known))),
            (MD_REQUEST_ID, request.request_id),
        ]
        if row_filter != NO_FILTER:
            metadata += [
                (MD_PLAN, PLANS[int(plan)]),
                (MD_REMOVED, str(int(removed))),
                (MD_FILTER_UNKNOWN, str(filter_unknown)),
            ]
        context.set_trailing_metadata(tuple(metadata))
        t_stream = time.perf_counter()
        chunk = self.config.chunk_size
        ids, scores = ids.tolist(), scores.tolist()
        for lo in range(0, len(ids), chunk):
            message = retrieval_pb2.RetrieveResponse()
            add = message.candidates.add  # add() is 3x faster than building Candidate objects
            for rank in range(lo, min(lo + chunk, len(ids))):
                add(item_id=ids[rank], score=scores[rank], rank=rank)
            yield message
        self.metrics.stage.labels("stream_write").observe(time.perf_counter() - t_stream)
        self.metrics.candidates.inc(len(ids))
        logger.info(
            json.dumps(
                {
                    "event": "retrieve",
                    "request_id": request.request_id,
                    "user_id": request.user_id,
                    "inline_history": len(request.history) > 0,
                    "k": query.k,
                    "mode": query.mode,
                    "returned": int(len(ids)),
                    "items_scored": int(scored),
                    "unknown_dropped": dropped,
                    **(
                        {"plan": PLANS[int(plan)], "filter_removed": int(removed)}
                        if row_filter != NO_FILTER
                        else {}
                    ),
                    "model_version": slot.version,
                    "ms": round(1000 * (time.perf_counter() - started), 3),
                }
            )
        )


class _Malformed:
    """Stands in for a request whose bytes did not decode, so the caller gets INVALID_ARGUMENT."""

    request_id = ""

    def __init__(self, error: Exception):
        self.error = error


def _lenient(deserializer):
    if deserializer is None:
        return None

    def decode(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # protobuf raises DecodeError, and others on some inputs
            return _Malformed(e)

    return decode


def _check_decoded(request) -> None:
    if isinstance(request, _Malformed):
        raise InvalidArgument(
            f"the request is not a valid message of this method ({type(request.error).__name__}); "
            "send a serialized nann.retrieval.v1.RetrieveRequest"
        )


class ServerInterceptor(grpc.ServerInterceptor):
    """Counts and times every unary and server-streaming call and maps its errors, in one place.

    Latency runs to the last streamed message. Domain errors become their status code with
    their message; anything else becomes INTERNAL with a generic message while the traceback
    goes to the log with the request id.
    """

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        # Health and reflection keep their own status handling.
        if handler is None or service != SERVICE_NAME or not (handler.unary_stream or handler.unary_unary):
            return handler
        deserializer = _lenient(handler.request_deserializer)
        if handler.unary_stream:
            labels = ("server_stream", service, method)
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, labels),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        labels = ("unary", service, method)
        return grpc.unary_unary_rpc_method_handler(
            self._wrap_unary(handler.unary_unary, labels),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )

    def _begin(self, request, labels):
        if not isinstance(request, _Malformed) and hasattr(request, "request_id") and not request.request_id:
            request.request_id = uuid.uuid4().hex[:16]
        self.metrics.started.labels(*labels).inc()
        return time.perf_counter()

    def _end(self, labels, code, started):
        self.metrics.handled.labels(*labels, code.name).inc()
        self.metrics.handling.labels(*labels).observe(time.perf_counter() - started)

    def _fail(self, error, request, context, labels):
        code, message = status_of(error)
        rid = getattr(request, "request_id", "")
        if code == grpc.StatusCode.INTERNAL:
            logger.error("request %s failed: %s", rid, error, exc_info=error)
        else:
            logger.info(
                json.dumps(
                    {
                        "event": "error",
                        "request_id": rid,
                        "method": labels[2],
                        "code": code.name,
                        "message": message,
                    }
                )
            )
        return code, message

    def _wrap_stream(self, behaviour, labels):
        metrics = self.metrics

        def wrapped(request, context):
            started = self._begin(request, labels)
            metrics.in_flight.inc()
            code = grpc.StatusCode.OK
            try:
                _check_decoded(request)
                for message in behaviour(request, context):
                    yield message
                    metrics.msg_sent.labels(*labels).inc()
            except GeneratorExit:  # the client went away mid-stream
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as error:
                code, message = self._fail(error, request, context, labels)
                context.abort(code, message)
            finally:
                metrics.in_flight.dec()
                self._end(labels, code, started)

        return wrapped

    def _wrap_unary(self, behaviour, labels):
        def wrapped(request, context):
            started = self._begin(request, labels)
            code = grpc.StatusCode.OK
            try:
                _check_decoded(request)
                return behaviour(request, context)
            except Exception as error:
                code, message = self._fail(error, request, context, labels)
                context.abort(code, message)
            finally:
                self._end(labels, code, started)

        return wrapped
