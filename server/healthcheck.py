"""``python -m server.healthcheck``: one grpc.health.v1 Check; exit 0 if SERVING, 1 otherwise.

The container image's HEALTHCHECK. The port is ``--port``, else ``NANN_PORT``, else 50051, on
127.0.0.1 (the server binds 0.0.0.0 inside a container). A server with TLS on is checked over
TLS with its own certificate as the root (``NANN_TLS_CERT``), under the name ``--tls-name``.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(target: str, timeout: float, cert: str | None = None, tls_name: str = "localhost") -> str:
    """The health status name (``SERVING``, ``NOT_SERVING``, ...) or the RPC's error code name."""
    if cert:
        with open(cert, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        options = (("grpc.ssl_target_name_override", tls_name),)
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as e:
            return e.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("NANN_PORT") or 50051))
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    parser.add_argument("--tls-name", default="localhost", help="name the TLS certificate was issued for")
    args = parser.parse_args(argv)
    cert = os.environ.get("NANN_TLS_CERT") or None
    status = check(f"127.0.0.1:{args.port}", args.timeout, cert, args.tls_name)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
