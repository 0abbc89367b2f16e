"""Synthetic key-value retrieval tasks (Schlag, Irie & Schmidhuber 2021, arXiv 2102.11174)."""
from tasks.associative import SETTINGS, RetrievalBatch, capacity_batch, overwrite_batch, sample_batch
from tasks.evaluation import PROTOCOLS, evaluation_set, aggregate_eval_loss

__all__ = [
    "SETTINGS", "RetrievalBatch", "capacity_batch", "overwrite_batch", "sample_batch",
    "PROTOCOLS", "evaluation_set", "aggregate_eval_loss",
]
