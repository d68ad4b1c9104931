"""The HNSW graph as plain arrays: the ``index/`` artifact's in-memory form, saver and loader.

``graph.npz`` (no pickled objects) holds, for N items with dense ids 0..N-1:

- ``levels``       int8 [N]: the top layer of each item;
- ``entry_point``  int64 scalar: the label the search starts from (its level is ``max_level``);
- ``max_level``    int64 scalar: the top layer;
- ``nodes_{l}``    int32 [n_l]: ascending labels present in layer l (layer 0: all N);
- ``neighbors_{l}`` int32 [n_l, d_l]: row r lists the neighbour labels of ``nodes_{l}[r]`` in
  hnswlib's stored order, padded with -1; d_l is the largest degree found in layer l
  (at least 1, so a layer holding only the entry point is one row of -1).

Neighbours are labels (dense item ids), not row numbers: a consumer maps them to rows
of layer l with :meth:`Graph.positions`.
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import numpy as np

from nann_common import artifacts
from nann_common.errors import ArtifactError

GRAPH_FILE = "graph.npz"
KIND = "index"
_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
# The walk starts from a layer holding about 1/1000 of the corpus, scored whole (the paper's
# layer 2 at 1.3M items). HNSW's layer l holds about N / M**l nodes, so with M = 32 that is
# layer 2 (N / 1024); the threshold N / 2000 lets layer 2 qualify at 1.3M items.
START_SHARE = 2000


def start_layer(layer_sizes: list[int], num_items: int, ef: tuple[int, ...] | list[int] = ()) -> int:
    """The layer the walk starts from: the highest above 0 holding at least
    max(N / START_SHARE, the ef it would be given) nodes; 0 if none.

    The index builder asks it (without ``ef``) which layer to cover; the exporter asks it
    (with its default ``ef``) where the walk starts, so the two agree.

    Args:
      layer_sizes: nodes per layer, layer 0 first.
      num_items: N, the corpus size.
      ef: the query's ef per layer, top-down (as every per-layer list in this project); a start
        layer l gets the entry that starts a list fitted to l + 1 layers (the first entry when
        the list is shorter).
    """
    for layer in range(len(layer_sizes) - 1, 0, -1):
        own_ef = ef[max(len(ef) - 1 - layer, 0)] if len(ef) else 0
        if layer_sizes[layer] >= max(own_ef, num_items / START_SHARE):
            return layer
    return 0


@dataclasses.dataclass(frozen=True)
class Graph:
    """An HNSW graph over N items, layer by layer.

    Attributes:
      levels: int8 [N], the top layer of each item.
      entry_point: label of the search's entry point (an item of the top layer).
      max_level: index of the top layer.
      nodes: per layer, int32 ascending labels present in it.
      neighbors: per layer, int32 [len(nodes[l]), max degree] neighbour labels padded with -1.
      meta: the artifact's ``meta.json`` when loaded from disk, else None.
    """

    levels: np.ndarray
    entry_point: int
    max_level: int
    nodes: tuple[np.ndarray, ...]
    neighbors: tuple[np.ndarray, ...]
    meta: dict | None = None

    @property
    def num_items(self) -> int:
        return len(self.levels)

    def degrees(self, layer: int) -> np.ndarray:
        """Number of neighbours of each node of ``layer``, in the order of ``nodes[layer]``."""
        return (self.neighbors[layer] >= 0).sum(axis=1)

    def in_degrees(self, layer: int) -> np.ndarray:
        """Number of links pointing to each node of ``layer``, in the order of ``nodes[layer]``."""
        nbrs = self.neighbors[layer]
        return np.bincount(nbrs[nbrs >= 0], minlength=self.num_items)[self.nodes[layer]]

    def positions(self, layer: int) -> np.ndarray:
        """Dense label -> row map of ``layer``: int32 [N], -1 for items absent from it."""
        pos = np.full(self.num_items, -1, np.int32)
        pos[self.nodes[layer]] = np.arange(len(self.nodes[layer]), dtype=np.int32)
        return pos

    def layer_stats(self) -> list[dict]:
        """Per-layer node count, mean and max degree, and nodes no other node links to.

        A node without in-links can only be found as the entry point, so their count
        says how much of a layer the search can never reach.
        """
        stats = []
        for layer, nodes in enumerate(self.nodes):
            deg = self.degrees(layer)
            in_deg = self.in_degrees(layer)
            stats.append(
                {
                    "layer": layer,
                    "nodes": int(len(nodes)),
                    "mean_degree": round(float(deg.mean()), 3) if len(nodes) else 0.0,
                    "max_degree": int(deg.max()) if len(nodes) else 0,
                    "no_in_links": int((in_deg == 0).sum()),
                    "median_in_degree": float(np.median(in_deg)) if len(nodes) else 0.0,
                }
            )
        return stats

    def validate(self) -> None:
        """Checks the structural invariants every consumer relies on.

        Raises:
          ValueError: naming the first invariant that does not hold.
        """
        n = self.num_items
        if self.levels.dtype != np.int8 or self.levels.ndim != 1:
            raise ValueError(f"levels must be int8 [N], got {self.levels.dtype} {self.levels.shape}")
        if n == 0:
            raise ValueError("the graph has no items")
        if len(self.nodes) != self.max_level + 1 or len(self.neighbors) != self.max_level + 1:
            raise ValueError(f"expected {self.max_level + 1} layers, got {len(self.nodes)}")
        if int(self.levels.max()) != self.max_level or self.levels.min() < 0:
            raise ValueError(
                f"levels span {self.levels.min()}..{self.levels.max()}, max_level {self.max_level}"
            )
        if not 0 <= self.entry_point < n or self.levels[self.entry_point] != self.max_level:
            raise ValueError(f"entry point {self.entry_point} is not an item of the top layer")
        for layer, (nodes, nbrs) in enumerate(zip(self.nodes, self.neighbors, strict=True)):
            if nodes.dtype != np.int32 or nbrs.dtype != np.int32:
                raise ValueError(f"layer {layer}: nodes and neighbors must be int32")
            if not np.array_equal(nodes, np.flatnonzero(self.levels >= layer)):
                raise ValueError(f"layer {layer}: nodes are not the ascending items of level >= {layer}")
            if nbrs.ndim != 2 or len(nbrs) != len(nodes):
                raise ValueError(
                    f"layer {layer}: neighbors shape {nbrs.shape} does not match {len(nodes)} nodes"
                )
            if nbrs.size and (nbrs.min() < -1 or nbrs.max() >= n):
                raise ValueError(f"layer {layer}: neighbour labels outside -1..{n - 1}")
            valid = nbrs >= 0
            # Padding only at the end of a row: each row is a count followed by -1s.
            if nbrs.shape[1] > 1 and (valid[:, 1:] & ~valid[:, :-1]).any():
                raise ValueError(f"layer {layer}: -1 padding is followed by a neighbour")
            if (self.levels[nbrs[valid]] < layer).any():
                raise ValueError(f"layer {layer}: a neighbour is not present in the layer")


def save_graph(graph: Graph, directory: str | Path) -> Path:
    """Writes ``graph.npz``: the same graph always gives the same bytes (and sha256).

    The archive is what ``np.savez`` writes, minus the wall-clock timestamps of its
    members, and uncompressed: it is read whole, and zlib at GB scale costs minutes.
    """
    path = Path(directory) / GRAPH_FILE
    arrays = {
        "levels": graph.levels,
        "entry_point": np.int64(graph.entry_point),
        "max_level": np.int64(graph.max_level),
    }
    for layer, (nodes, nbrs) in enumerate(zip(graph.nodes, graph.neighbors, strict=True)):
        arrays[f"nodes_{layer}"] = nodes
        arrays[f"neighbors_{layer}"] = nbrs
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, value in arrays.items():
            member = zipfile.ZipInfo(f"{key}.npy", date_time=_FIXED_ZIP_TIME)
            with archive.open(member, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
    return path


def load_graph(directory: str | Path, embeddings_digest: str | None = None, verify: bool = True) -> Graph:
    """Loads and verifies an ``index/`` artifact.

    Args:
      directory: the ``index/`` directory written by ``python -m index_builder``.
      embeddings_digest: if given, the digest (``artifacts.digest``) of the embeddings the
        caller pairs with the graph; a graph built from other embeddings is refused.
      verify: check the files' sha256 against ``meta.json`` (seconds per GB).

    Returns:
      The graph, with ``meta`` set.

    Raises:
      ArtifactError: the artifact is missing, damaged, inconsistent, or was built from
        other embeddings.
    """
    directory = Path(directory)
    meta = artifacts.read_meta(directory, KIND, verify=verify)
    if embeddings_digest is not None and meta["inputs"].get("embeddings_digest") != embeddings_digest:
        raise ArtifactError(
            f"{directory} was built from other embeddings than the ones given; "
            "re-run python -m index_builder on this workdir"
        )
    try:
        with np.load(directory / GRAPH_FILE, allow_pickle=False) as npz:
            max_level = int(npz["max_level"])
            graph = Graph(
                levels=npz["levels"],
                entry_point=int(npz["entry_point"]),
                max_level=max_level,
                nodes=tuple(npz[f"nodes_{layer}"] for layer in range(max_level + 1)),
                neighbors=tuple(npz[f"neighbors_{layer}"] for layer in range(max_level + 1)),
                meta=meta,
            )
        graph.validate()
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"{directory / GRAPH_FILE} is not a valid graph ({e}); rebuild the index") from e
    return graph
