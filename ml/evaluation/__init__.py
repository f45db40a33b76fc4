"""Evaluation of the embeddings stage against the sample's planted truth.

The only package allowed to read ``<sample_root>/truth/``: models, indexes and clusterings
must never see it (see `ml.evaluation.embeddings`).
"""

from ml.evaluation.embeddings import (
    adjusted_rand,
    knn_label_accuracy,
    read_truth,
    recall_at_k_pairs,
    truth_path,
)

__all__ = [
    "adjusted_rand",
    "knn_label_accuracy",
    "read_truth",
    "recall_at_k_pairs",
    "truth_path",
]
