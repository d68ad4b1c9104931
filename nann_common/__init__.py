"""What every stage and the server share: artifact I/O, the graph format, the serving contract, errors.

This package imports none of ``model_export``, ``index_builder`` or ``server``, and no
TensorFlow, Keras or hnswlib, so any of them can depend on it.
"""
