"""NANN offline pipeline: data preparation, scoring model training, evaluation."""
