"""Every Prometheus metric the server exports, declared once.

The ``grpc_server_*`` names follow the go-grpc-prometheus convention that dashboards know;
latency covers a streaming call to its last message (py-grpc-prometheus records none for
server-streaming methods). Buckets are fine below 25 ms, with one at the paper's 6.3 ms.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.001,
    0.002,
    0.003,
    0.004,
    0.005,
    0.0063,
    0.0075,
    0.01,
    0.0125,
    0.015,
    0.0175,
    0.02,
    0.0234,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
STAGE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0063,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
SCORED_BUCKETS = (
    100,
    250,
    500,
    1000,
    2500,
    5000,
    7500,
    10000,
    12500,
    15000,
    17500,
    20000,
    30000,
    50000,
    100000,
    1e6,
    1e7,
)
# The paper's Table 1 (1.3M items, a T4 GPU + 32 cores): the reference lines of a dashboard.
TABLE1 = {"bitmap": (624.0, 0.0063), "raw_set_ops": (185.0, 0.0234)}


class Metrics:
    """The server's metrics on one registry (a fresh one per server, so tests can run several)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        rpc = ("grpc_type", "grpc_service", "grpc_method")
        self.started = Counter("grpc_server_started_total", "RPCs started on the server.", rpc, registry=r)
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            (*rpc, "grpc_code"),
            registry=r,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Time from the call's start to its last message (or error).",
            rpc,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.msg_sent = Counter("grpc_server_msg_sent_total", "Stream messages sent.", rpc, registry=r)
        self.stage = Histogram(
            "nann_stage_seconds",
            "Time spent per request in each stage.",
            ("stage",),
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.items_scored = Histogram(
            "nann_items_scored", "Items the model scored per user.", buckets=SCORED_BUCKETS, registry=r
        )
        self.candidates = Counter("nann_candidates_returned_total", "Candidates streamed.", registry=r)
        self.in_flight = Gauge("nann_in_flight_requests", "Retrieve calls in progress.", registry=r)
        self.unknown_dropped = Counter(
            "nann_unknown_ids_dropped_total",
            "History item ids unknown to the served model (newer than its index), dropped.",
            registry=r,
        )
        self.feature_errors = Counter(
            "nann_feature_store_errors_total", "Feature store reads that failed.", ("store",), registry=r
        )
        self.blocklist_items = Gauge(
            "nann_blocklist_items", "Items on the blocklist in force (--blocklist).", registry=r
        )
        self.blocklist_errors = Counter(
            "nann_blocklist_errors_total",
            "Blocklist reads refused (malformed, over_cap, unreachable); the previous list stays in force.",
            ("reason",),
            registry=r,
        )
        self.backend_errors = Counter(
            "nann_backend_errors_total", "Model backend calls that failed.", ("backend",), registry=r
        )
        self.reloads = Counter(
            "nann_model_reloads_total", "Model versions loaded or refused.", ("outcome",), registry=r
        )
        self.model_info = Gauge(
            "nann_model_version_info",
            "1 for the model version being served.",
            ("version", "digest"),
            registry=r,
        )
        self.model_ready = Gauge("nann_model_ready", "1 when a model is loaded and warmed up.", registry=r)
        self.model_items = Gauge("nann_model_items", "Items in the served model's corpus.", registry=r)
        self.batch_size = Histogram(
            "nann_batch_users", "Users per model call.", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.table1_qps = Gauge(
            "nann_table1_baseline_qps",
            "The paper's Table 1 QPS (1.3M items, T4 GPU).",
            ("marking",),
            registry=r,
        )
        self.table1_latency = Gauge(
            "nann_table1_baseline_latency_seconds",
            "The paper's Table 1 response time.",
            ("marking",),
            registry=r,
        )
        for marking, (qps, seconds) in TABLE1.items():
            self.table1_qps.labels(marking).set(qps)
            self.table1_latency.labels(marking).set(seconds)
        self.model_ready.set(0)

    def set_model(self, version: int, digest: str, num_items: int) -> None:
        self.model_info.clear()
        self.model_info.labels(str(version), digest[:16]).set(1)
        self.model_items.set(num_items)
        self.model_ready.set(1)
