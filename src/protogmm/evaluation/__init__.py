"""Evaluation protocols for frozen features."""

from protogmm.evaluation.knn import knn_accuracy, knn_classify
from protogmm.evaluation.linear import linear_probe
from protogmm.evaluation.longtail import (
    GROUPS,
    FrequencyGroups,
    evaluate_long_tail,
    frequency_groups,
    group_accuracy,
    knn_group_accuracy,
    linear_group_accuracy,
    longtail_markdown,
    prototype_diversity,
)

__all__ = [
    "GROUPS",
    "FrequencyGroups",
    "evaluate_long_tail",
    "frequency_groups",
    "group_accuracy",
    "knn_accuracy",
    "knn_classify",
    "knn_group_accuracy",
    "linear_group_accuracy",
    "linear_probe",
    "longtail_markdown",
    "prototype_diversity",
]
