"""The server's settings: command-line flags, each also read from a ``NANN_*`` environment variable.

Flags win over the environment, the environment over the defaults; the result is one
frozen :class:`Config`. Nothing here runs at import.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

ENV_PREFIX = "NANN_"


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of one server process (see ``python -m server --help``)."""

    model: Path
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9100
    features: str = ""  # "" = embedded:<model>/../features
    backend: str = "inprocess"
    workers: int = 8
    max_concurrent: int = 64
    chunk_size: int = 200
    max_k: int = 1000
    max_ef: int = 4000
    max_steps: int = 50
    max_history: int = 1000
    max_user_id_bytes: int = 256
    allow_exhaustive: bool = False
    max_exclude: int = 10_000
    exclude_history: bool = False
    blocklist: str = ""
    max_blocklist: int = 10_000
    batch_window_ms: float = 0.0
    max_batch: int = 1
    reload_interval_s: float = 2.0
    grace_s: float = 10.0
    max_message_bytes: int = 4 << 20
    redis_timeout_s: float = 0.25
    redis_pool: int = 32
    backend_timeout_s: float = 5.0
    backend_retries: int = 2
    tfserving_version: str = "pinned"  # pinned | latest
    scorer: str = "auto"  # auto | xla | stock
    intra_op_threads: int = 1
    inter_op_threads: int = 0
    tls_cert: str = ""
    tls_key: str = ""
    log_level: str = "INFO"
    log_json: bool = True

    @property
    def features_spec(self) -> str:
        return self.features or f"embedded:{self.model.parent / 'features'}"


# flag -> (type, help). The flag's dest is the Config field; its env var is NANN_<FIELD>.
_FLAGS: dict[str, tuple[type, str]] = {
    "model": (Path, "versioned SavedModel base directory (a workdir's export/), as TF Serving takes it"),
    "host": (str, "address to bind (a container passes 0.0.0.0)"),
    "port": (int, "gRPC port (0 = pick a free one and log it)"),
    "metrics_port": (int, "Prometheus /metrics port (0 = pick a free one, -1 = off)"),
    "features": (
        str,
        "feature store: embedded:DIR/features or redis://HOST:PORT/DB (default embedded:<model>/../features)",
    ),
    "backend": (str, "model backend: inprocess or tfserving://HOST:PORT/MODEL_NAME"),
    "workers": (int, "threads serving calls"),
    "max_concurrent": (int, "calls in progress or queued before new ones get RESOURCE_EXHAUSTED"),
    "chunk_size": (int, "candidates per streamed message"),
    "max_k": (int, "largest k a request may ask for"),
    "max_ef": (int, "largest ef per layer a request may ask for"),
    "max_steps": (int, "largest T per layer a request may ask for"),
    "max_history": (int, "longest inline history a request may send"),
    "max_user_id_bytes": (int, "longest user_id"),
    "allow_exhaustive": (bool, "accept mode=exhaustive (scores the whole corpus per user)"),
    "max_exclude": (int, "most item ids (and, apart, most categories) one request's filter may list"),
    "exclude_history": (
        bool,
        "never return the behaviours a call used, whether or not the caller asks (off: repeat "
        "purchases and re-watches are real recommendations)",
    ),
    "blocklist": (
        str,
        "items no call returns, changed live (python -m server.items): a file of item ids (re-read "
        "when it changes) or redis://HOST:PORT/DB (the set nann:blocked); empty = none",
    ),
    "max_blocklist": (
        int,
        "most blocked items; a longer list is refused and the previous one stays in force (every "
        "call carries the list: items gone for good belong in a new model version)",
    ),
    "batch_window_ms": (
        float,
        "micro-batching: how long a lone call waits for company (0 = batch only the calls that "
        "queued while the model was busy)",
    ),
    "max_batch": (int, "in-process micro-batching: most users in one model call (1 = off)"),
    "reload_interval_s": (float, "how often to look for a newer model version (0 = never)"),
    "grace_s": (float, "on SIGTERM, how long in-flight calls may finish"),
    "max_message_bytes": (int, "largest gRPC message received or sent"),
    "redis_timeout_s": (float, "Redis connect and read timeout"),
    "redis_pool": (int, "Redis connections kept"),
    "backend_timeout_s": (float, "TF Serving call timeout when the caller sets no shorter deadline"),
    "backend_retries": (int, "TF Serving retries on UNAVAILABLE (with backoff, within the deadline)"),
    "tfserving_version": (
        str,
        "TF Serving: 'pinned' asks for the version whose contract is loaded, "
        "'latest' for whatever TF Serving serves",
    ),
    "scorer": (
        str,
        "in-process: which signature runs, 'xla' (retrieve_xla, the scorer compiled by XLA), 'stock' "
        "(retrieve) or 'auto' (xla when the export has it)",
    ),
    "intra_op_threads": (
        int,
        "TensorFlow intra-op threads (0 = TensorFlow's choice); 1, with the XLA scorer's calls split "
        "over the inter-op threads, measured fastest for a loaded server (docs/parameters.md)",
    ),
    "inter_op_threads": (int, "TensorFlow inter-op threads (0 = TensorFlow's choice)"),
    "tls_cert": (str, "PEM certificate chain; with --tls-key, serve TLS"),
    "tls_key": (str, "PEM private key"),
    "log_level": (str, "DEBUG, INFO, WARNING or ERROR"),
    "log_json": (bool, "one JSON object per log line (false: plain text)"),
}


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class ConfigError(ValueError):
    """A setting is unusable; the message names the flag and its environment variable."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="NANN Retrieve service: gRPC nann.retrieval.v1.Retriever over an exported SavedModel. "
        f"Every flag can also be set by the environment variable {ENV_PREFIX}<FLAG> (e.g. NANN_PORT).",
    )
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    for name, (kind, text) in _FLAGS.items():
        flag = "--" + name.replace("_", "-")
        env = ENV_PREFIX + name.upper()
        kwargs = {"dest": name, "help": f"{text} [{env}]", "default": None}
        kwargs["type"] = _parse_bool if kind is bool else kind
        if kind is bool:
            kwargs["metavar"] = "true|false"
        if name not in ("model", "features", "blocklist"):
            kwargs["help"] += f" (default: {defaults[name]})"
        parser.add_argument(flag, **kwargs)
    return parser


def load_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Config:
    """Flags, then ``NANN_*`` variables, then defaults -> a checked :class:`Config`.

    Raises:
      ConfigError: a value of the wrong type or out of range.
      SystemExit: argparse's exit on --help or a malformed flag.
    """
    environ = os.environ if environ is None else environ
    args = vars(build_parser().parse_args(argv))
    values = {}
    for name, (kind, _) in _FLAGS.items():
        value = args[name]
        env = ENV_PREFIX + name.upper()
        if value is None and env in environ:
            try:
                value = _parse_bool(environ[env]) if kind is bool else kind(environ[env])
            except (ValueError, argparse.ArgumentTypeError) as e:
                raise ConfigError(f"{env}={environ[env]!r} is not a valid {kind.__name__}: {e}") from e
        if value is not None:
            values[name] = value
    if "model" not in values:
        raise ConfigError("--model (or NANN_MODEL) is required: the SavedModel base directory, DIR/export")
    config = Config(**values)
    _check(config)
    return config


def _check(c: Config) -> None:
    problems = []
    positive = (
        "workers",
        "max_concurrent",
        "chunk_size",
        "max_k",
        "max_ef",
        "max_steps",
        "max_history",
        "max_user_id_bytes",
        "max_exclude",
        "max_blocklist",
        "max_batch",
        "max_message_bytes",
        "redis_pool",
    )
    for name in positive:
        if getattr(c, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(c, name)}")
    for name in (
        "batch_window_ms",
        "reload_interval_s",
        "grace_s",
        "backend_retries",
        "intra_op_threads",
        "inter_op_threads",
    ):
        if getattr(c, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(c, name)}")
    for name in ("redis_timeout_s", "backend_timeout_s"):
        if getattr(c, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be > 0, got {getattr(c, name)}")
    if not 0 <= c.port < 65536:
        problems.append(f"--port must be in 0..65535, got {c.port}")
    if not -1 <= c.metrics_port < 65536:
        problems.append(f"--metrics-port must be in -1..65535, got {c.metrics_port}")
    if c.backend != "inprocess" and not c.backend.startswith("tfserving://"):
        problems.append(f"--backend must be inprocess or tfserving://HOST:PORT/MODEL, got {c.backend!r}")
    if c.scorer not in ("auto", "xla", "stock"):
        problems.append(f"--scorer must be auto, xla or stock, got {c.scorer!r}")
    if c.tfserving_version not in ("pinned", "latest"):
        problems.append(f"--tfserving-version must be pinned or latest, got {c.tfserving_version!r}")
    spec = c.features_spec
    if not (spec.startswith("embedded:") or spec.startswith("redis://") or spec.startswith("rediss://")):
        problems.append(f"--features must be embedded:DIR or redis://HOST:PORT/DB, got {spec!r}")
    if bool(c.tls_cert) != bool(c.tls_key):
        problems.append("--tls-cert and --tls-key go together; give both or neither")
    if c.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        problems.append(f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {c.log_level!r}")
    if problems:
        raise ConfigError("; ".join(problems))
