"""Index builder: an hnswlib graph over the item embeddings e_v, written as plain layer arrays.

The exporter never sees hnswlib: it reads ``index/graph.npz`` through
:func:`nann_common.graph.load_graph`, which verifies the artifact before returning it.
"""
