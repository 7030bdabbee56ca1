"""Evaluation protocols for frozen features."""

from protogmm.evaluation.knn import knn_accuracy, knn_classify
from protogmm.evaluation.linear import linear_probe

__all__ = ["knn_accuracy", "knn_classify", "linear_probe"]
