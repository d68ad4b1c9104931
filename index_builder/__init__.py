"""Index builder: an hnswlib graph over the item embeddings e_v, written as plain layer arrays.

The exporter and the server never see hnswlib: they read ``index/graph.npz``
through :func:`load_graph`, which verifies the artifact before returning it.
"""

from index_builder.graph import Graph, load_graph

__all__ = ["Graph", "load_graph"]
