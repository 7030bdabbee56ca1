"""Tests of prototype usage over a pass of data (ever chosen, marginal entropy)."""

from __future__ import annotations

import math

import pytest
import torch

from protogmm.diagnostics.usage import UsageAccumulator, prototype_usage


def test_hand_computed_example() -> None:
    # K = 4, N = 2. Row 0 is one-hot on 0; row 1 splits evenly between 1 and 2.
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]])
    usage = prototype_usage(probs)
    # Mean assignment (0.5, 0.25, 0.25, 0): H = 0.5 log 2 + 2 * 0.25 log 4 = 1.5 log 2.
    assert usage["num_prototypes"] == 4
    assert usage["num_samples"] == 2
    assert usage["ever_chosen"] == 2  # argmax of row 1 is the first of the tie: 1
    assert usage["marginal_entropy"] == pytest.approx(1.5 * math.log(2))
    assert usage["effective_number"] == pytest.approx(2.0**1.5)
    # Sample entropies 0 and log 2.
    assert usage["mean_sample_entropy"] == pytest.approx(0.5 * math.log(2))


def test_uniform_and_collapsed_extremes() -> None:
    k = 8
    spread = prototype_usage(torch.eye(k))
    assert spread["ever_chosen"] == k
    assert spread["marginal_entropy"] == pytest.approx(math.log(k))
    assert spread["effective_number"] == pytest.approx(k)
    assert spread["mean_sample_entropy"] == pytest.approx(0.0)

    collapsed = prototype_usage(torch.eye(k)[[3] * 5])
    assert collapsed["ever_chosen"] == 1
    assert collapsed["marginal_entropy"] == pytest.approx(0.0)
    assert collapsed["effective_number"] == pytest.approx(1.0)


def test_hard_assignments_equal_one_hot_probabilities() -> None:
    indices = torch.tensor([0, 2, 2, 5, 2])
    hard = prototype_usage(indices, num_prototypes=6)
    soft = prototype_usage(torch.eye(6)[indices])
    assert hard == pytest.approx(soft)


def test_accumulator_equals_one_shot() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3.0 * torch.randn(103, 16, generator=gen), dim=1)
    one_shot = prototype_usage(probs)
    acc = UsageAccumulator()
    for chunk in probs.split(10):
        acc.update(chunk)
    assert acc.compute() == pytest.approx(one_shot, rel=1e-9)
    assert one_shot["ever_chosen"] == int(probs.argmax(dim=1).unique().numel())
    mean = probs.double().mean(dim=0)
    assert one_shot["marginal_entropy"] == pytest.approx(float(-(mean * mean.log()).sum()))


def test_accumulator_mixes_soft_and_hard_batches() -> None:
    acc = UsageAccumulator(num_prototypes=3)
    acc.update(torch.tensor([[0.2, 0.8, 0.0]]))
    acc.update(torch.tensor([2, 2]))
    result = acc.compute()
    assert result["ever_chosen"] == 2 and result["num_samples"] == 3
    mean = torch.tensor([0.2, 0.8, 2.0]) / 3
    assert result["marginal_entropy"] == pytest.approx(float(-(mean * mean.log()).sum()))


def test_compute_without_samples_raises() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        UsageAccumulator(4).compute()


@pytest.mark.parametrize(
    ("value", "kwargs", "match"),
    [
        (
            torch.tensor([[0.5, 0.7]]),
            {},
            r"assignments_or_scores rows must be probabilities.*row 0",
        ),
        (torch.tensor([[1.5, -0.5]]), {}, r"assignments_or_scores must be non-negative"),
        (torch.tensor([[float("nan"), 1.0]]), {}, r"assignments_or_scores has a non-finite"),
        (torch.ones(2, 3) / 3, {"num_prototypes": 4}, r"assignments_or_scores must have 4 columns"),
        (torch.tensor([0, 1]), {}, r"assignments_or_scores given as \[B\] indices needs"),
        (torch.tensor([0, 4]), {"num_prototypes": 4}, r"must be in \[0, 4\), got an index 4"),
        (torch.tensor([0.0, 1.0]), {"num_prototypes": 4}, r"must be integers"),
        (torch.ones(2, 2, 2), {}, r"assignments_or_scores must have shape \[N, D\]"),
        ([[1.0]], {}, r"assignments_or_scores must be a torch.Tensor"),
        (torch.ones(2, 2) / 2, {"num_prototypes": 0}, r"num_prototypes must be an integer >= 1"),
    ],
)
def test_bad_inputs_name_the_argument(value: object, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        prototype_usage(value, **kwargs)  # type: ignore[arg-type]


def test_accumulator_rejects_a_batch_with_another_k() -> None:
    acc = UsageAccumulator()
    acc.update(torch.ones(2, 3) / 3)
    with pytest.raises(ValueError, match=r"assignments must have 3 columns"):
        acc.update(torch.ones(2, 4) / 4)
