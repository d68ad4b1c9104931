"""The paper's algorithm: Beam-retrieval over an HNSW graph with a neural scorer.

``walk.search`` is the walk in stock TensorFlow ops, as the exported SavedModel runs it;
``walk.replay`` is the same walk in numpy over precomputed exact scores, for tuning and graph
design in seconds. Per-layer parameters (ef, T) are top-down everywhere: entry 0 is the start
layer, the last entry is layer 0.
"""
