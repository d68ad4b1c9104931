"""Reads the layers of an hnswlib index out of its pickle state, without a copy per node.

hnswlib's Python binding (0.8.0, ``ser_version`` 1) has no graph accessor, but
``Index.__getstate__()[0]`` is a dict that mirrors ``HierarchicalNSW``'s memory:

- ``data_level0``: int8 [cur_element_count * size_data_per_element], one record per
  internal id: at ``offset_level0`` (0) the layer-0 link list, a uint32 header whose
  low 16 bits are the neighbour count (byte 2 is the deleted mark), then ``max_M0``
  uint32 internal ids; at ``offset_data`` the vector (dim float32); at ``label_offset``
  the label (uint64). Slots past the count hold stale ids and must be ignored.
- ``link_lists``: int8, the upper layers: for every internal id i with level L_i > 0, in
  internal-id order, L_i blocks of ``size_links_per_element`` bytes (layer 1 first),
  each a uint32 header (count in the low 16 bits) and ``max_M`` uint32 internal ids.
- ``element_levels``: int32, level of each internal id (the array may be longer than
  cur_element_count: only the first cur_element_count entries are meaningful).
- ``label_lookup_external`` uint64 / ``label_lookup_internal`` uint32: the label -> internal
  id hash map as two parallel arrays, in hash order.
- ``enterpoint_node`` (internal id), ``max_level``, ``max_M``, ``max_M0``, ``has_deletions``.

Internal ids follow insertion order, which with several threads is not label order,
so every id is translated through the label stored in each record (and that
mapping is cross-checked against the label lookup arrays).
"""

from __future__ import annotations

import numpy as np

from nann_common.errors import NannError
from nann_common.graph import Graph

SUPPORTED_SER_VERSION = 1
_COUNT_MASK = 0xFFFF  # getListCount reads an unsigned short; the next byte is the deleted mark
_CHUNK_ROWS = 1 << 16  # rows translated at a time: bounds the int64 temporaries to ~32 MB at M=32


class IndexStateError(NannError):
    """The hnswlib pickle state does not have the layout this reader knows."""


def graph_from_state(state: dict) -> Graph:
    """Builds a :class:`Graph` (labels, not internal ids) from ``Index.__getstate__()[0]``.

    Memory: the result (int32 neighbours, about 4 * 2M bytes per item at layer 0)
    plus bounded per-chunk temporaries; the state's buffers are only viewed.

    Raises:
      IndexStateError: the state has another layout (another hnswlib version), holds
        deleted elements, or is internally inconsistent.
    """
    n = _check_layout(state)
    size = state["size_data_per_element"]
    data = np.frombuffer(state["data_level0"], np.uint8, count=n * size)
    records = data.view(np.uint32).reshape(n, size // 4)
    label_of = np.ndarray((n,), np.uint64, buffer=data, offset=state["label_offset"], strides=(size,))
    label_of = _check_labels(label_of.astype(np.int64), state)

    levels_internal = np.asarray(state["element_levels"][:n], np.int64)
    max_level = int(state["max_level"])
    if n and int(levels_internal.max()) != max_level:
        raise IndexStateError(f"element levels reach {levels_internal.max()} but max_level is {max_level}")
    if max_level > np.iinfo(np.int8).max:
        raise IndexStateError(f"max_level {max_level} does not fit int8")
    levels = np.empty(n, np.int8)
    levels[label_of] = levels_internal

    # Layer 0: the link list opens every record, so the whole layer is one strided view.
    links0 = records[:, 1 : 1 + state["max_M0"]]
    counts0 = records[:, 0] & _COUNT_MASK
    nodes = [np.arange(n, dtype=np.int32)]
    neighbors = [_translate(links0, counts0, label_of, dest_rows=label_of, n_dest=n)]

    # Upper layers: the blocks of each element with level > 0, concatenated in internal-id order.
    words = _link_list_words(state, levels_internal)
    block_words = state["size_links_per_element"] // 4
    starts = np.zeros(n, np.int64)
    np.cumsum(levels_internal[:-1] * block_words, out=starts[1:])
    for layer in range(1, max_level + 1):
        internal = np.flatnonzero(levels_internal >= layer)
        base = starts[internal] + (layer - 1) * block_words
        counts = words[base] & _COUNT_MASK
        links = words[base[:, None] + 1 + np.arange(state["max_M"])]
        layer_labels = label_of[internal]
        order = np.argsort(layer_labels)
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        nodes.append(layer_labels[order].astype(np.int32))
        neighbors.append(_translate(links, counts, label_of, dest_rows=rank, n_dest=len(internal)))

    return Graph(
        levels=levels,
        entry_point=int(label_of[state["enterpoint_node"]]),
        max_level=max_level,
        nodes=tuple(nodes),
        neighbors=tuple(neighbors),
    )


def _check_layout(state: dict) -> int:
    """Verifies the fields the reader depends on and returns the element count."""
    if state.get("ser_version") != SUPPORTED_SER_VERSION:
        raise IndexStateError(
            f"hnswlib pickle state version {state.get('ser_version')} is not supported "
            f"(this reader knows version {SUPPORTED_SER_VERSION}, hnswlib 0.8.0); pin hnswlib==0.8.0"
        )
    if not state.get("index_inited") or state.get("space") != "l2":
        raise IndexStateError("expected an initialised l2 index")
    if state["has_deletions"]:
        raise IndexStateError("the index has deleted elements; build a fresh one")
    n = state["cur_element_count"]
    size = state["size_data_per_element"]
    links0_bytes = 4 + 4 * state["max_M0"]
    expected = {
        "offset_level0": 0,
        "offset_data": links0_bytes,
        "label_offset": links0_bytes + 4 * state["dim"],
        "size_data_per_element": links0_bytes + 4 * state["dim"] + 8,
        "size_links_per_element": 4 + 4 * state["max_M"],
    }
    for key, value in expected.items():
        if state[key] != value:
            raise IndexStateError(f"unexpected hnswlib layout: {key} = {state[key]}, expected {value}")
    if n == 0:
        raise IndexStateError("the index is empty")
    if len(state["data_level0"]) < n * size or len(state["element_levels"]) < n:
        raise IndexStateError("the level-0 data or element levels are shorter than the element count")
    if n > np.iinfo(np.int32).max:
        raise IndexStateError(f"{n} items do not fit int32 labels")
    return n


def _check_labels(label_of: np.ndarray, state: dict) -> np.ndarray:
    """Checks labels form 0..N-1 and agree with hnswlib's label -> internal id map."""
    n = len(label_of)
    if label_of.min() < 0 or label_of.max() >= n:
        raise IndexStateError(
            f"labels must be the dense ids 0..{n - 1}, found {label_of.min()}..{label_of.max()}"
        )
    seen = np.zeros(n, bool)
    seen[label_of] = True
    if not seen.all():
        raise IndexStateError("labels are not a permutation of 0..N-1 (an item was added twice?)")
    external = np.asarray(state["label_lookup_external"], np.int64)
    internal = np.asarray(state["label_lookup_internal"], np.int64)
    if len(external) != n or not np.array_equal(label_of[internal], external):
        raise IndexStateError("the label lookup map disagrees with the labels stored in the records")
    return label_of


def _link_list_words(state: dict, levels_internal: np.ndarray) -> np.ndarray:
    """The upper-layer link lists as uint32 words, with the total size checked."""
    raw = np.frombuffer(state["link_lists"], np.uint8)
    expected = int(levels_internal.sum()) * state["size_links_per_element"]
    if len(raw) != expected:
        raise IndexStateError(f"link_lists holds {len(raw)} bytes, the element levels imply {expected}")
    return raw.view(np.uint32)


def _translate(
    links: np.ndarray, counts: np.ndarray, label_of: np.ndarray, dest_rows: np.ndarray, n_dest: int
) -> np.ndarray:
    """Maps internal-id link lists to label rows padded with -1, chunk by chunk.

    Args:
      links: uint32 [rows, capacity] internal ids (may be a strided view).
      counts: valid entries of each row.
      label_of: internal id -> label.
      dest_rows: output row of each input row.
      n_dest: output rows.
    """
    capacity = links.shape[1]
    if len(counts) and int(counts.max()) > capacity:
        raise IndexStateError(f"a link list claims {counts.max()} neighbours, capacity {capacity}")
    # At least one column, so a top layer holding only the entry point is [1, 1] of -1, not [1, 0].
    width = max(1, int(counts.max()) if len(counts) else 0)
    out = np.empty((n_dest, width), np.int32)
    label32 = label_of.astype(np.int32)
    slots = np.arange(width)
    for start in range(0, len(links), _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, len(links))
        ids = links[start:stop, :width].astype(np.int64)
        valid = slots < counts[start:stop, None]
        ids[~valid] = 0
        if ids.size and ids.max() >= len(label_of):
            raise IndexStateError("a link points past the last element")
        rows = label32[ids]
        rows[~valid] = -1
        out[dest_rows[start:stop]] = rows
    return out
