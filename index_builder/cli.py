"""Command line of the index builder.

    python -m index_builder --workdir DIR [--m 32] [--ef-construction 40] [--threads N] [--seed 0]
                           [--layer0-degree 16] [--layer0-in-degree 8] [--start-nodes S]

Bad flags and a missing or damaged embeddings artifact are reported as one line
on stderr with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from index_builder.build import MAX_M, BuildConfig, build_index
from nann_common.errors import NannError

logger = logging.getLogger("index_builder")


class _OneLineParser(argparse.ArgumentParser):
    """Reports flag errors as ``error: ...`` on one line, like every other failure here."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int, high: int | None = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"in {low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="python -m index_builder",
        description="Builds the HNSW graph (hnswlib, l2) over the item embeddings e_v of a workdir "
        "and writes DIR/index/ (graph.npz with every layer's neighbour lists, meta.json with "
        "provenance and per-layer degrees). Reads DIR/embeddings/ written by "
        "'python -m model_export train'. The result replaces DIR/index/ only when complete.",
    )
    parser.add_argument(
        "--workdir", required=True, metavar="DIR", help="workdir holding embeddings/ (written by train)"
    )
    parser.add_argument(
        "--m",
        metavar="M",
        type=_int_at_least(2, MAX_M),
        default=32,
        help="links per node on upper layers, 2*M on layer 0 (default 32, as the paper)",
    )
    parser.add_argument(
        "--ef-construction",
        metavar="N",
        type=_int_at_least(1),
        default=40,
        help="candidate beam while inserting (default 40, as the paper); larger is slower, better linked",
    )
    parser.add_argument(
        "--threads",
        metavar="N",
        type=_int_at_least(1),
        default=os.cpu_count() or 1,
        help="insertion threads (default: all cores); only 1 gives a reproducible graph",
    )
    parser.add_argument(
        "--seed",
        metavar="N",
        type=_int_at_least(0),
        default=0,
        help="seed of the level generator (default 0)",
    )
    parser.add_argument(
        "--layer0-degree",
        metavar="D",
        type=_int_at_least(0),
        default=None,
        help="top every layer-0 node up to D links with its nearest neighbours after the build "
        "(default min(16, 2*M), at most 2*M; 0 keeps hnswlib's graph as built). hnswlib's pruning leaves "
        "clustered e_v with about 11 links per node, too few for the neural scorer's walk",
    )
    parser.add_argument(
        "--layer0-in-degree",
        metavar="R",
        type=_int_at_least(0),
        default=None,
        help="then give every layer-0 node with fewer than R in-links reverse links from its own "
        "neighbours, where their lists have room (default min(8, 2*M); 0 adds none). Items on the rim "
        "of a cluster, where the scorer's top items often lie, are rarely anyone's nearest neighbour",
    )
    parser.add_argument(
        "--start-nodes",
        metavar="S",
        type=_int_at_least(0),
        default=None,
        help="top the start layer (the highest with at least N/2000 nodes) up to S nodes by "
        "farthest-point sampling of all items but the sparsest 1%%, so that every group of items "
        "has a start node (default N/200, at least 400 if the layer below has 1,600; 0 keeps "
        "hnswlib's levels). The walk never crosses low-scoring ground, so a group of items without "
        "a start node of its own is lost",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = BuildConfig(
            m=args.m,
            ef_construction=args.ef_construction,
            threads=args.threads,
            seed=args.seed,
            layer0_degree=args.layer0_degree,
            layer0_in_degree=args.layer0_in_degree,
            start_nodes=args.start_nodes,
        )
    except ValueError as e:
        message = (
            str(e)
            .replace("layer0_degree", "--layer0-degree")
            .replace("layer0_in_degree", "--layer0-in-degree")
        )
        print(f"error: {message} (see --help)", file=sys.stderr)
        return 2
    try:
        build_index(args.workdir, config)
    except NannError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
