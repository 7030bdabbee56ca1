"""Evaluation protocols for frozen features."""

from protogmm.evaluation.knn import knn_accuracy, knn_classify

__all__ = ["knn_accuracy", "knn_classify"]
