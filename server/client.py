"""``python -m server.client``: call Retrieve and print the candidates, what a person uses to try the service.

python -m server.client --user 1000042 [--k 20] [--target 127.0.0.1:50051]
python -m server.client --history 5,17,23 --k 10 --json
python -m server.client --user 1000042 --exclude-history --category 2520377,4145813 --exclude 871234
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import grpc

from nann.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from server.service import MD_DROPPED, MD_FILTER_UNKNOWN, MD_PLAN, MD_REMOVED, MD_SCORED, MD_VERSION


def _labels(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def retrieve(target: str, request: retrieval_pb2.RetrieveRequest, timeout: float = 5.0):
    """One Retrieve call -> (candidates, trailing metadata dict, seconds to first and to last message)."""
    with grpc.insecure_channel(target) as channel:
        stub = retrieval_pb2_grpc.RetrieverStub(channel)
        started = time.perf_counter()
        call = stub.Retrieve(request, timeout=timeout)
        candidates, first = [], None
        for message in call:
            if first is None:
                first = time.perf_counter() - started
            candidates.extend(message.candidates)
        last = time.perf_counter() - started
        return candidates, dict(call.trailing_metadata() or ()), first or last, last


def wait_serving(target: str, timeout: float, alive=lambda: True) -> bool:
    """Polls grpc.health.v1 until SERVING (True), or until ``timeout`` passes or ``alive()`` is False."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while alive() and time.monotonic() < deadline:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--target", default="127.0.0.1:50051", help="server HOST:PORT (default 127.0.0.1:50051)"
    )
    parser.add_argument("--user", default="", help="user id, read from the server's feature store")
    parser.add_argument("--history", type=_ints, default=[], help="inline behaviour item ids, oldest first")
    parser.add_argument("--k", type=int, default=0, help="candidates wanted (default: the model's)")
    parser.add_argument(
        "--mode", default="", help="beam, beam_history, beam_sets, hnsw, exhaustive (default: the model's)"
    )
    parser.add_argument("--ef", type=_ints, default=[], help="beam widths, top-down (default: the model's)")
    parser.add_argument("--steps", type=_ints, default=[], help="rounds T per layer, top-down")
    parser.add_argument("--exclude", type=_ints, default=[], help="item ids never to return, comma-separated")
    parser.add_argument(
        "--exclude-history", action="store_true", help="never return the behaviours the call used"
    )
    parser.add_argument(
        "--category",
        type=_labels,
        default=[],
        help="only items of these categories (ids or labels, comma-separated)",
    )
    parser.add_argument(
        "--exclude-category", type=_labels, default=[], help="never items of these categories (ids or labels)"
    )
    parser.add_argument("--show", type=int, default=10, help="candidates to print (default 10; 0 = all)")
    parser.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds (default 5)")
    parser.add_argument("--request-id", default="", help="id for the server's logs")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if not args.user and not args.history:
        parser.error("give --user or --history")
    request = retrieval_pb2.RetrieveRequest(
        user_id=args.user,
        history=args.history,
        k=args.k,
        request_id=args.request_id,
        params=retrieval_pb2.SearchParams(mode=args.mode, ef=args.ef, steps=args.steps),
    )
    if args.exclude or args.exclude_history or args.category or args.exclude_category:
        request.filter.CopyFrom(
            retrieval_pb2.Filter(
                exclude_item_ids=args.exclude,
                exclude_history=args.exclude_history,
                category_labels=args.category,
                exclude_category_labels=args.exclude_category,
            )
        )
    try:
        candidates, trailer, first, last = retrieve(args.target, request, args.timeout)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    shown = candidates if args.show == 0 else candidates[: args.show]
    if args.json:
        print(
            json.dumps(
                {
                    "candidates": [
                        {"rank": c.rank, "item_id": c.item_id, "score": c.score} for c in candidates
                    ],
                    "metadata": trailer,
                    "first_ms": round(first * 1000, 3),
                    "last_ms": round(last * 1000, 3),
                }
            )
        )
        return 0
    who = f"user {args.user}" if not args.history else f"inline history of {len(args.history)}"
    print(
        f"{who}: {len(candidates)} candidates in {last * 1000:.1f} ms (first chunk {first * 1000:.1f} ms); "
        f"items scored {trailer.get(MD_SCORED)}, "
        f"model version {trailer.get(MD_VERSION)}, "
        f"unknown ids dropped {trailer.get(MD_DROPPED)}"
        + (
            f"; plan {trailer[MD_PLAN]}, filter removed {trailer.get(MD_REMOVED)}, "
            f"unknown filter ids {trailer.get(MD_FILTER_UNKNOWN)}"
            if MD_PLAN in trailer
            else ""
        )
    )
    print(f"{'rank':>5} {'item_id':>12} {'score':>10}")
    for c in shown:
        print(f"{c.rank:>5} {c.item_id:>12} {c.score:>10.4f}")
    if len(shown) < len(candidates):
        print(f"  ... {len(candidates) - len(shown)} more (--show 0 prints all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
