"""The Retrieve service: gRPC in front of the exported SavedModel and a feature store.

It knows the SavedModel only through its signature and ``meta.json`` contract
(:mod:`nann_common.contract`) and the feature snapshot's schema; it imports no
training or index-building code. ``python -m server --help`` lists the settings.
"""
