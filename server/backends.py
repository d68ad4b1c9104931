"""Model backends: the exported SavedModel run in this process, or on TensorFlow Serving.

Both hand out a :class:`ModelSlot`: one model version's contract, its item vocabulary
and the call that runs its ``retrieve`` signature. A request takes one slot and uses
it throughout, so a hot reload between its stages cannot mix two versions.

The in-process backend watches the ``--model`` base directory: a newer numeric version
is verified (checksums, contract), loaded and warmed up with its own warm-up records in
the background, then swapped in with one reference assignment. A damaged or
incompatible version is refused (log line, ``nann_model_reloads_total{outcome="refused"}``)
and the old one serves on.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from nann_common import contract as contract_lib
from nann_common import xla
from nann_common.contract import Query, ServingContract
from nann_common.errors import NannError
from server.errors import DeadlineExceeded, Unavailable
from server.metrics import Metrics

logger = logging.getLogger(__name__)
_STOCK = (contract_lib.RETRIEVE_SIGNATURE, contract_lib.FILTER_SIGNATURE)

# (histories int64 [B, L] -1 padded, query, timeout seconds or None, one RowFilter per row or None)
# -> Answer with [B, ...] arrays
RunFn = Callable[..., "Answer"]


class Answer(NamedTuple):
    """A model call's outputs, one row per user (plan and removed are 0 for exports without filters)."""

    ids: np.ndarray  # [B, k] original ids, -1 past a row's answer
    scores: np.ndarray  # [B, k] float32, -inf past a row's answer
    scored: np.ndarray  # [B] items scored
    plan: np.ndarray  # [B] index into contract.PLANS
    removed: np.ndarray  # [B] scored items the filter removed

    @classmethod
    def of(cls, out: dict) -> Answer:
        """From a signature's outputs (numpy arrays by name)."""
        zeros = np.zeros(len(out["scored"]), np.int32)
        return cls(
            out["item_ids"], out["scores"], out["scored"], out.get("plan", zeros), out.get("removed", zeros)
        )


class ModelRefused(RuntimeError):
    """The model refused a request the service had validated: the export and the server disagree.

    Both backends raise it; it is a server fault (INTERNAL, the detail logged, not sent).
    """


@dataclasses.dataclass(frozen=True)
class ModelSlot:
    """One servable model version."""

    contract: ServingContract
    item_ids: np.ndarray  # ascending original ids of the corpus
    run: RunFn
    categories: dict[str, int] = dataclasses.field(default_factory=dict)  # label -> dense category

    @property
    def version(self) -> int:
        return self.contract.version

    def known_history(self, history: np.ndarray) -> tuple[np.ndarray, int]:
        """Drops ids this version does not know; keeps the most recent ``max_len``. -> (ids, dropped)."""
        return contract_lib.known_history(self.item_ids, history, self.contract.max_len)


def read_warmup(version_dir: Path) -> list[tuple[str, dict[str, np.ndarray]]]:
    """The version's warm-up records as (signature name, inputs) pairs."""
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    path = version_dir / contract_lib.WARMUP_FILE
    if not path.is_file():
        return []
    records = []
    for raw in tf.data.TFRecordDataset(str(path)):
        log = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        request = log.predict_log.request
        inputs = {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}
        records.append((request.model_spec.signature_name or contract_lib.DEFAULT_SIGNATURE, inputs))
    return records


class Backend:
    """What the service needs of a model backend."""

    name = "backend"

    def slot(self) -> ModelSlot:
        """The version to use for one request. Raises Unavailable when none is ready."""
        raise NotImplementedError

    def start(self) -> None:
        """Loads and warms up the first version (blocking); then watches for newer ones."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class _VersionWatcher:
    """Polls the base directory and hands each newer version to ``load`` once."""

    def __init__(self, base: Path, interval: float, current: Callable[[], int], load: Callable[[Path], None]):
        self.base, self.interval, self.current, self.load = base, interval, current, load
        self.refused: set[tuple[int, float]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="model-watcher", daemon=True)

    def start(self) -> None:
        if self.interval > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def check_once(self) -> None:
        found = contract_lib.versions(self.base)
        if not found or found[-1] <= self.current():
            return
        path = self.base / str(found[-1])
        key = (found[-1], path.stat().st_mtime)
        if key in self.refused:
            return
        if not self.load(path):
            self.refused.add(key)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check_once()
            except Exception:  # the watcher must survive anything a directory can do
                logger.exception("model watcher: unexpected error; still serving the current version")


class InProcessBackend(Backend):
    """Runs the SavedModel's ``retrieve`` signature in this process."""

    name = "inprocess"

    def __init__(
        self,
        base: Path,
        metrics: Metrics,
        reload_interval: float = 2.0,
        intra_op_threads: int = 1,
        inter_op_threads: int = 0,
        scorer: str = "auto",
        max_batch: int = 1,
    ):
        self.base = Path(base)
        self.scorer = scorer
        self.max_batch = max_batch
        self.metrics = metrics
        self._slot: ModelSlot | None = None
        self._models: dict[int, object] = {}  # keeps each loaded SavedModel's resources alive
        self._threads = (intra_op_threads, inter_op_threads)
        self._load_lock = threading.Lock()
        self.watcher = _VersionWatcher(self.base, reload_interval, self._current_version, self._try_load)

    def _current_version(self) -> int:
        return self._slot.version if self._slot else 0

    def slot(self) -> ModelSlot:
        slot = self._slot
        if slot is None:
            raise Unavailable("the model is not loaded yet; retry when health reports SERVING")
        return slot

    def start(self) -> None:
        logger.info("XLA_FLAGS: %s", xla.configure())
        import tensorflow as tf

        intra, inter = self._threads
        if intra:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
        if inter:
            tf.config.threading.set_inter_op_parallelism_threads(inter)
        found = contract_lib.versions(self.base)
        if not found:
            contract_lib.latest_contract(self.base)  # raises with the command that makes one
        self._swap(self._load(self.base / str(found[-1])))
        self.watcher.start()

    def close(self) -> None:
        self.watcher.stop()

    def _try_load(self, path: Path) -> bool:
        try:
            self._swap(self._load(path))
            self.metrics.reloads.labels("success").inc()
            return True
        except Exception as e:  # a bad version must never take the server down
            self.metrics.reloads.labels("refused").inc()
            level = logging.ERROR if isinstance(e, NannError) else logging.CRITICAL
            logger.log(
                level,
                "refused model version %s: %s; still serving version %d",
                path.name,
                e,
                self._current_version(),
                exc_info=not isinstance(e, NannError),
            )
            return False

    def _swap(self, slot: ModelSlot) -> None:
        old = self._slot
        self._slot = slot  # one reference assignment: a request sees the old slot or the new one
        self.metrics.set_model(slot.version, slot.contract.digest, slot.contract.num_items)
        logger.info(
            "serving model version %d (%d items, start layer %d)%s",
            slot.version,
            slot.contract.num_items,
            slot.contract.start_layer,
            f", replacing version {old.version}" if old else "",
        )
        if old is not None:
            # In-flight calls hold their own reference to the old slot; drop ours.
            self._models.pop(old.version, None)

    def _load(self, path: Path) -> ModelSlot:
        """Verifies, loads and warms up one version; raises NannError (or TF's) on a bad one."""
        import tensorflow as tf

        with self._load_lock:
            started = time.monotonic()
            contract = contract_lib.load_contract(path, verify=True)
            item_ids = contract.item_ids()
            try:
                model = tf.saved_model.load(str(path))
            except (OSError, ValueError, tf.errors.OpError) as e:
                raise NannError(f"{path} does not load as a SavedModel: {type(e).__name__}: {e}") from e
            signature = self._signature(contract)
            xla = signature == contract_lib.XLA_SIGNATURE
            # Unfiltered calls run `signature`; filtered ones its filtered twin (exports with filters).
            fns = {}
            for filtered in (False, True) if contract.has_filters else (False,):
                name = contract.signature(xla, filtered)
                fns[filtered] = model.signatures.get(name)
                if fns[filtered] is None:
                    raise NannError(f"{path} has no {name!r} signature")
                want = contract_lib.RETRIEVE_INPUTS + (contract_lib.FILTER_INPUTS if filtered else ())
                names = set(fns[filtered].structured_input_signature[1])
                if names != set(want):
                    raise NannError(f"{path}: {name} inputs {sorted(names)} are not {list(want)}")

            def run(histories, query, timeout=None, filters=None):
                try:
                    inputs = contract.inputs(histories, query, filters)
                    fn = fns[contract_lib.filtered(filters)]
                    out = fn(**{name: tf.constant(value) for name, value in inputs.items()})
                except (tf.errors.InvalidArgumentError, contract_lib.InvalidRequest) as e:
                    message = getattr(e, "message", str(e))
                    raise ModelRefused(f"the model refused a validated request: {message}") from e
                return Answer.of({name: t.numpy() for name, t in out.items()})

            records = read_warmup(path)
            compiled = 0
            if xla:
                compiled = self._warm_xla(model, contract, records)
                # Batches the micro-batcher never forms would compile shapes no call uses.
                records = [(s, i) for s, i in records if len(i["history"]) <= self.max_batch]
            for name, inputs in records:
                # The records name the stock signatures (TF Serving's); this server runs `signature`.
                f = fns[name == contract_lib.FILTER_SIGNATURE] if name in _STOCK else model.signatures[name]
                f(**{key: tf.constant(value) for key, value in inputs.items()})
            self._models[contract.version] = model
            logger.info(
                "loaded model version %d from %s in %.1f s: signature %s, %d warm-up requests%s",
                contract.version,
                path,
                time.monotonic() - started,
                signature,
                len(records),
                f", XLA scorer compiled at {compiled} shapes" if compiled else "",
            )
            return ModelSlot(contract, item_ids, run, _categories(contract))

    def _signature(self, contract: ServingContract) -> str:
        if self.scorer == "stock":
            return contract_lib.RETRIEVE_SIGNATURE
        if contract.has_xla_signature:
            return contract_lib.XLA_SIGNATURE
        if self.scorer == "xla":
            raise NannError(
                f"{contract.path} has no {contract_lib.XLA_SIGNATURE} signature (exported before "
                "it existed): re-export it, or serve it with --scorer stock"
            )
        return contract_lib.RETRIEVE_SIGNATURE

    def _warm_xla(self, model, contract: ServingContract, records) -> int:
        """Compiles the XLA scorer at every shape a call can meet, for every batch size the
        micro-batcher can form (padded to the export's batch sizes): no call pays for one.

        Returns:
          The number of (batch size, width) shapes warmed.
        """
        import tensorflow as tf

        if not records:
            raise NannError(f"{contract.path} has no warm-up records; re-export it")
        history = records[0][1]["history"][:1]
        warm = model.signatures[contract_lib.XLA_WARMUP_SIGNATURE]
        shapes = 0
        for batch in contract.xla_batches:
            out = warm(history=tf.constant(np.repeat(history, batch, axis=0)))
            shapes += len(out["widths"])
            if batch >= self.max_batch:
                break
        return shapes


class TFServingBackend(Backend):
    """Calls TensorFlow Serving's PredictionService.Predict on the ``retrieve`` signature.

    The contract and item vocabulary come from the same ``--model`` directory TF Serving
    serves; with ``version="pinned"`` each call names the version whose contract the
    server holds, so the vocabulary always matches the model that answers.
    """

    name = "tfserving"

    def __init__(
        self,
        spec: str,
        base: Path,
        metrics: Metrics,
        reload_interval: float = 2.0,
        timeout_s: float = 5.0,
        retries: int = 2,
        version: str = "pinned",
        max_message_bytes: int = 4 << 20,
    ):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        rest = spec[len("tfserving://") :]
        target, _, model_name = rest.partition("/")
        if not target or not model_name:
            raise NannError(f"--backend {spec!r}: expected tfserving://HOST:PORT/MODEL_NAME")
        self.target, self.model_name = target, model_name
        self.base = Path(base)
        self.metrics = metrics
        self.timeout_s, self.retries, self.pinned = timeout_s, retries, version == "pinned"
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self._slot: ModelSlot | None = None
        self.watcher = _VersionWatcher(
            self.base, reload_interval, lambda: self._slot.version if self._slot else 0, self._try_load
        )

    def slot(self) -> ModelSlot:
        if self._slot is None:
            raise Unavailable(
                "no model version is ready on TF Serving yet; retry when health reports SERVING"
            )
        return self._slot

    def start(self) -> None:
        found = contract_lib.versions(self.base)
        if not found:
            contract_lib.latest_contract(self.base)
        slot = self._load(self.base / str(found[-1]))
        # One warm-up record through TF Serving proves the version answers before SERVING. TF
        # Serving may still be loading or warming it up: wait (bounded) rather than fail.
        records = read_warmup(slot.contract.path)
        deadline = time.monotonic() + 120
        while records:
            inputs = records[0][1]
            query = Query(
                int(inputs["k"][0]),
                tuple(int(x) for x in inputs["ef"][0]),
                tuple(int(x) for x in inputs["steps"][0]),
                inputs["mode"][0].decode(),
            )
            try:
                self._predict(slot.contract, inputs["history"], query, max(self.timeout_s, 30.0), cap=False)
                break
            except (Unavailable, DeadlineExceeded) as e:
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"TF Serving at {self.target} never answered for {self.model_name} "
                        f"version {slot.version}: {e}"
                    ) from e
                logger.warning(
                    "TF Serving at %s not ready for %s version %d (%s); retrying",
                    self.target,
                    self.model_name,
                    slot.version,
                    e,
                )
                time.sleep(1.0)
        self._slot = slot
        self.metrics.set_model(slot.version, slot.contract.digest, slot.contract.num_items)
        self.watcher.start()

    def _try_load(self, path: Path) -> bool:
        try:
            slot = self._load(path)
        except NannError as e:
            self.metrics.reloads.labels("refused").inc()
            logger.error("refused model version %s: %s", path.name, e)
            return False
        self._slot = slot
        self.metrics.reloads.labels("success").inc()
        self.metrics.set_model(slot.version, slot.contract.digest, slot.contract.num_items)
        return True

    def close(self) -> None:
        self.watcher.stop()
        self.channel.close()

    def _load(self, path: Path) -> ModelSlot:
        contract = contract_lib.load_contract(path, verify=False)  # TF Serving reads the variables
        item_ids = contract.item_ids()
        if contract.xla_scorer:
            logger.warning(
                "model version %d was exported by an older exporter with --xla: TF Serving runs it "
                "only with --xla_cpu_compilation_enabled=true; re-export it (the retrieve "
                "signature of a current export holds no XLA op)",
                contract.version,
            )
        return ModelSlot(
            contract,
            item_ids,
            lambda h, q, t=None, f=None: self._predict(contract, h, q, t, filters=f),
            _categories(contract),
        )

    def _predict(self, contract: ServingContract, histories, query, timeout, cap: bool = True, filters=None):
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        if self.pinned:
            request.model_spec.version.value = contract.version
        # Padded to max_len (padding does not change the answer), so that TF Serving's batching
        # can concatenate calls whose histories differ in length.
        histories = np.asarray(histories, np.int64)
        if histories.shape[1] < contract.max_len:
            padded = np.full((histories.shape[0], contract.max_len), contract_lib.PAD_ID, np.int64)
            padded[:, : histories.shape[1]] = histories
            histories = padded
        try:
            inputs = contract.inputs(histories, query, filters)
        except contract_lib.InvalidRequest as e:
            raise ModelRefused(str(e)) from e
        request.model_spec.signature_name = contract.signature(
            xla=False, filtered=contract_lib.filtered(filters)
        )
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        if timeout is None:
            timeout = self.timeout_s
        elif cap:
            timeout = min(timeout, self.timeout_s)
        end = time.monotonic() + timeout
        for attempt in range(self.retries + 1):
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded("the deadline passed while waiting for TF Serving")
            try:
                response = self.stub.Predict(request, timeout=remaining)
                break
            except grpc.RpcError as e:
                code = e.code()
                self.metrics.backend_errors.labels(self.name).inc()
                if code == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    time.sleep(min(0.05 * 2**attempt, max(end - time.monotonic(), 0)))
                    continue
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise DeadlineExceeded("TF Serving did not answer within the deadline") from e
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                    raise Unavailable(
                        f"TF Serving unavailable for {self.model_name} version "
                        f"{contract.version}: {code.name}"
                    ) from e
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise ModelRefused(f"the model refused a validated request: {e.details()}") from e
                raise RuntimeError(f"TF Serving answered {code.name}: {e.details()}") from e
        return Answer.of({name: tf.make_ndarray(proto) for name, proto in response.outputs.items()})


def _categories(contract: ServingContract) -> dict[str, int]:
    """Category label -> dense category of an export with filters ({} without)."""
    if not contract.has_filters:
        return {}
    return {label: i for i, label in enumerate(contract.category_labels())}


def open_backend(config, metrics: Metrics) -> Backend:
    if config.backend == "inprocess":
        return InProcessBackend(
            config.model,
            metrics,
            config.reload_interval_s,
            config.intra_op_threads,
            config.inter_op_threads,
            config.scorer,
            config.max_batch,
        )
    return TFServingBackend(
        config.backend,
        config.model,
        metrics,
        config.reload_interval_s,
        config.backend_timeout_s,
        config.backend_retries,
        config.tfserving_version,
        config.max_message_bytes,
    )
