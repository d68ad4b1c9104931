"""``python -m server``: start, serve, drain.

Lifecycle: the gRPC port opens at once with health NOT_SERVING (Retrieve answers
UNAVAILABLE), the feature store opens, the model loads and replays its warm-up records,
then health turns SERVING. SIGTERM (or SIGINT) turns health NOT_SERVING, lets in-flight
calls finish within ``--grace-s`` while refusing new ones, and exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from nann.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from nann_common.errors import NannError
from server.config import Config, ConfigError, load_config
from server.metrics import Metrics
from server.service import SERVICE_NAME, RetrieverService, ServerInterceptor

logger = logging.getLogger("server")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; messages that are JSON objects are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name}
        message = record.getMessage()
        try:
            parsed = json.loads(message) if message.startswith("{") else None
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            entry.update(parsed)
        else:
            entry["message"] = message
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(config: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())
    # TensorFlow's C++ start-up banners (CUDA probing, oneDNN) say nothing an operator needs.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class Server:
    """One running Retrieve server (the gRPC server, health, metrics endpoint, backend, store)."""

    def __init__(self, config: Config):
        self.config = config
        self.metrics = Metrics()
        self.health = health.HealthServicer()
        self.backend = None
        self.store = None
        self.blocklist = None
        self.port = 0
        self.metrics_port = 0
        self._metrics_server = None
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rpc"),
            interceptors=[ServerInterceptor(self.metrics)],
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=config.max_concurrent,
        )

    def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def start(self) -> None:
        """Opens the ports, then loads the store and the model; returns once SERVING."""
        from prometheus_client import start_http_server

        from server.backends import open_backend
        from server.features import open_store
        from server.items import open_blocklist

        c = self.config
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        service = _LazyService()
        retrieval_pb2_grpc.add_RetrieverServicer_to_server(service, self.grpc)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.grpc,
        )
        address = f"{c.host}:{c.port}"
        if c.tls_cert:
            try:
                with open(c.tls_key, "rb") as key, open(c.tls_cert, "rb") as cert:
                    creds = grpc.ssl_server_credentials([(key.read(), cert.read())])
            except OSError as e:
                raise NannError(f"cannot read --tls-cert / --tls-key: {e}") from e
            self.port = self.grpc.add_secure_port(address, creds)
        else:
            self.port = self.grpc.add_insecure_port(address)
        if self.port == 0:
            raise NannError(f"cannot bind {address}: the port is taken or the address is not local")
        self.grpc.start()
        if c.metrics_port >= 0:
            self._metrics_server, _ = start_http_server(
                c.metrics_port, addr=c.host, registry=self.metrics.registry
            )
            self.metrics_port = self._metrics_server.server_port
        logger.info(
            json.dumps(
                {
                    "event": "listening",
                    "grpc": f"{c.host}:{self.port}",
                    "metrics": f"{c.host}:{self.metrics_port}" if c.metrics_port >= 0 else "off",
                    "health": "NOT_SERVING",
                    "backend": c.backend,
                    "features": c.features_spec,
                }
            )
        )
        started = time.monotonic()
        self.store = open_store(c.features_spec, c.redis_timeout_s, c.redis_pool)
        self.blocklist = open_blocklist(c.blocklist, c.max_blocklist, self.metrics, c.redis_timeout_s)
        self.backend = open_backend(c, self.metrics)
        self.backend.start()
        if c.blocklist and not self.backend.slot().contract.has_filters:
            raise NannError(
                f"--blocklist needs a model exported with filters; model version "
                f"{self.backend.slot().version} predates them: re-export it (python -m model_export export)"
            )
        service.target = RetrieverService(c, self.backend, self.store, self.metrics, self.blocklist)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            json.dumps(
                {
                    "event": "serving",
                    "model_version": self.backend.slot().version,
                    "startup_s": round(time.monotonic() - started, 2),
                }
            )
        )

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight ones finish within the grace period."""
        grace = self.config.grace_s if grace is None else grace
        self.health.enter_graceful_shutdown()
        logger.info(json.dumps({"event": "draining", "grace_s": grace}))
        self.grpc.stop(grace).wait()
        if self.backend is not None:
            self.backend.close()
        if self.store is not None:
            self.store.close()
        if self.blocklist is not None:
            self.blocklist.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        logger.info(json.dumps({"event": "stopped"}))


class _LazyService(retrieval_pb2_grpc.RetrieverServicer):
    """Answers UNAVAILABLE until the real servicer is in place (health says NOT_SERVING meanwhile)."""

    target: RetrieverService | None = None

    def Retrieve(self, request, context):
        target = self.target
        if target is None:
            from server.errors import Unavailable

            raise Unavailable("the model is still loading; retry when health reports SERVING")
        return target.Retrieve(request, context)


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    setup_logging(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = Server(config)
    try:
        server.start()
    except NannError as e:
        logger.error(json.dumps({"event": "startup_failed", "error": str(e)}))
        server.stop(0)
        return 2
    stop.wait()
    server.stop()
    return 0


__all__ = ["Server", "main", "retrieval_pb2"]
