"""Head / medium / tail groups, per-group accuracy and prototype diversity on hand examples."""

from __future__ import annotations

import pytest
import torch

from protogmm.evaluation import (
    evaluate_long_tail,
    frequency_groups,
    group_accuracy,
    knn_classify,
    knn_group_accuracy,
    linear_group_accuracy,
    linear_probe,
    longtail_markdown,
    prototype_diversity,
)


def test_groups_by_the_literature_thresholds() -> None:
    counts = [500, 101, 100, 20, 19, 1, 0]
    groups = frequency_groups(counts)
    assert groups.members == {"many": [0, 1], "medium": [2, 3], "few": [4, 5, 6]}
    assert (groups.many_threshold, groups.few_threshold) == (100.0, 20.0)
    assert groups.group_index().tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert groups.non_empty() == ["many", "medium", "few"]
    assert groups.as_dict()["groups"]["few"] == {"classes": [4, 5, 6], "train_images": 20}


def test_relative_thresholds_scale_with_the_head_class() -> None:
    # MNIST-5k at rho = 10: 400 ... 40; log-thirds of rho: 400 * 10^(-1/3) = 185.7,
    # 400 * 10^(-2/3) = 86.2.
    counts = [400, 309, 239, 185, 143, 111, 86, 66, 51, 40]
    groups = frequency_groups(counts, 10 ** (-1 / 3), 10 ** (-2 / 3), relative=True)
    assert groups.members == {"many": [0, 1, 2], "medium": [3, 4, 5], "few": [6, 7, 8, 9]}
    assert groups.many_threshold == pytest.approx(185.66, abs=0.01)
    # The absolute defaults put every one of these classes in many or medium.
    assert frequency_groups(counts).non_empty() == ["many", "medium"]


@pytest.mark.parametrize(
    ("args", "kwargs", "culprit"),
    [
        (([],), {}, "class_counts"),
        (([3, -1],), {}, "class_counts"),
        (([2.5],), {}, "class_counts"),
        (([3], 10, 20), {}, "few_threshold must be <= many_threshold"),
        (([3], -1, -2), {}, "many_threshold"),
    ],
)
def test_bad_arguments(args: tuple, kwargs: dict, culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit):
        frequency_groups(*args, **kwargs)


def test_group_accuracy_by_hand() -> None:
    groups = frequency_groups([200, 50, 5])  # class 0 many, 1 medium, 2 few
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    predictions = torch.tensor([0, 0, 0, 1, 1, 0, 0, 0, 2])
    result = group_accuracy(predictions, labels, groups)
    assert result == {"many": 0.75, "medium": 0.5, "few": 1 / 3, "all": 5 / 9}
    no_few = group_accuracy(predictions[:6], labels[:6], groups)
    assert no_few["few"] is None and no_few["all"] == 4 / 6


def test_knn_group_accuracy_on_constructed_features() -> None:
    # Train: class c at direction e_c. Test: a sample near e_0 labelled 0 (right), near e_1
    # labelled 1 (right), near e_2 but labelled 2 ... and one labelled 2 near e_0 (wrong).
    groups = frequency_groups([150, 40, 3])
    eye = torch.eye(3)
    train_x = eye.repeat_interleave(3, dim=0)
    train_y = torch.arange(3).repeat_interleave(3)
    test_x = torch.stack([eye[0], eye[1], eye[2], eye[0] + 0.01])
    test_y = torch.tensor([0, 1, 2, 2])
    result = knn_group_accuracy(train_x, train_y, test_x, test_y, groups, k=3)
    assert result == {"many": 1.0, "medium": 1.0, "few": 0.5, "all": 0.75}


def test_knn_group_accuracy_passes_its_options_to_knn_classify() -> None:
    generator = torch.Generator().manual_seed(0)
    groups = frequency_groups([300, 60, 10])
    train_y = torch.randint(0, 3, (90,), generator=generator)
    train_x = torch.randn(90, 6, generator=generator) + torch.eye(3, 6)[train_y]
    test_y = torch.randint(0, 3, (40,), generator=generator)
    test_x = torch.randn(40, 6, generator=generator) + torch.eye(3, 6)[test_y]
    options = {"k": 200, "temperature": 0.1, "chunk_size": 7}
    result = knn_group_accuracy(train_x, train_y, test_x, test_y, groups, **options)
    predictions = knn_classify(train_x, train_y, test_x, num_classes=3, **options)
    assert result == group_accuracy(predictions, test_y, groups)
    # The options matter here: with the defaults the vote gives another result.
    assert result != knn_group_accuracy(train_x, train_y, test_x, test_y, groups)


def test_linear_group_accuracy_is_one_classifier_split_by_group() -> None:
    generator = torch.Generator().manual_seed(0)
    groups = frequency_groups([300, 60, 10, 10])
    train_y = torch.randint(0, 4, (200,), generator=generator)
    train_x = torch.randn(200, 8, generator=generator) + 1.5 * torch.eye(4, 8)[train_y]
    test_y = torch.randint(0, 4, (120,), generator=generator)
    test_x = torch.randn(120, 8, generator=generator) + 1.5 * torch.eye(4, 8)[test_y]
    result = linear_group_accuracy(train_x, train_y, test_x, test_y, groups, epochs=20)
    for name, classes in groups.members.items():
        mask = torch.isin(test_y, torch.tensor(classes))
        expected = linear_probe(
            train_x, train_y, test_x[mask], test_y[mask], epochs=20, num_classes=4
        )
        assert result[name] == expected
    overall = linear_probe(train_x, train_y, test_x, test_y, epochs=20, num_classes=4)
    assert result["all"] == pytest.approx(overall, abs=1e-12)


def test_prototype_diversity_by_hand() -> None:
    groups = frequency_groups([200, 150, 50, 5])  # many: 0, 1; medium: 2; few: 3
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    assignments = torch.tensor([7, 7, 3, 3, 9, 1, 1, 1, 1, 1])
    result = prototype_diversity(assignments, labels, groups)
    assert result["many"] == {
        "classes": 2,
        "samples": 5,
        "distinct": 3,  # prototypes 7, 3, 9
        "per_class": 1.5,
        "per_sample": 0.6,
    }
    assert result["medium"] == {
        "classes": 1,
        "samples": 3,
        "distinct": 1,
        "per_class": 1.0,
        "per_sample": 1 / 3,
    }
    assert result["few"]["distinct"] == 1 and result["few"]["per_sample"] == 0.5
    assert result["all"]["distinct"] == 4 and result["all"]["classes"] == 4


def test_prototype_diversity_empty_group_and_label_checks() -> None:
    groups = frequency_groups([200, 5])
    result = prototype_diversity(torch.tensor([0, 1]), torch.tensor([0, 0]), groups)
    assert result["medium"] == {
        "classes": 0,
        "samples": 0,
        "distinct": 0,
        "per_class": None,
        "per_sample": None,
    }
    assert result["few"]["samples"] == 0 and result["few"]["per_sample"] is None
    with pytest.raises(ValueError, match="labels must lie in \\[0, 2\\)"):
        prototype_diversity(torch.tensor([0]), torch.tensor([2]), groups)
    with pytest.raises(ValueError, match="assignments"):
        prototype_diversity(torch.tensor([0, 1]), torch.tensor([0]), groups)


def test_evaluate_long_tail_end_to_end_and_markdown() -> None:
    groups = frequency_groups([150, 40, 3])
    eye = torch.eye(3)
    train = [(eye.repeat_interleave(2, dim=0), torch.arange(3).repeat_interleave(2))]
    test = [(eye, torch.arange(3))]
    encoder = torch.nn.Identity()
    prototypes = torch.tensor([[1.0, 0, 0], [0, 1.0, 1.0]])  # class 0 -> 0, 1 and 2 -> 1

    def assign(features: torch.Tensor) -> torch.Tensor:
        return (features @ prototypes.T).argmax(dim=1)

    result = evaluate_long_tail(groups, train, test, encoder, assign=assign, linear_epochs=10)
    assert result["knn"] == {"many": 1.0, "medium": 1.0, "few": 1.0, "all": 1.0}
    assert set(result["linear"]) == {"many", "medium", "few", "all"}
    assert [result["prototypes"][g]["distinct"] for g in ("many", "medium", "few", "all")] == [
        1,
        1,
        1,
        2,
    ]
    pixels = evaluate_long_tail(groups, train, test, None, linear_epochs=0)
    assert "linear" not in pixels and "prototypes" not in pixels
    text = longtail_markdown(groups, {"trained": result, "raw pixels": pixels}, num_prototypes=2)
    assert (
        "| group | classes | train images | k-NN trained | linear trained | k-NN raw pixels |"
        in text
    )
    assert "| few | 1 | 3 | 100.0 |" in text
    assert "| all | 3 | 6 | 2 | 0.7 | 33.3 |" in text  # distinct 2 over 3 classes, 6 images
