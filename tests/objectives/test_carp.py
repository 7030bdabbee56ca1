"""CARPLoss against an element-by-element float64 reference of Silva & Ramírez Rivera (2023)."""

from __future__ import annotations

import math

import pytest
import torch
from references import softmax_row

from protogmm.objectives import CARPLoss


def _block_probs(scores: torch.Tensor, blocks: list[list[int]], tau: float) -> list:
    """[view][block][sample] -> distribution over the block's P prototypes."""
    return [
        [
            [
                softmax_row([scores[v, b, k].item() / tau for k in block])
                for b in range(scores.shape[1])
            ]
            for block in blocks
        ]
        for v in range(scores.shape[0])
    ]


def _reference(student_p: list, teacher_p: list, block_size: int, weight: float) -> float:
    """CARP: mean over cross-view pairs of mean_{m,b} -log<p_s, p_t> + w mean_m KL(pbar||U)."""
    eps = torch.finfo(torch.float64).eps
    num_student, num_teacher = len(student_p), len(teacher_p)
    num_blocks, batch = len(student_p[0]), len(student_p[0][0])
    total, pairs = 0.0, 0
    for j in range(num_teacher):
        for i in range(num_student):
            if i == j:
                continue
            terms = []
            for m in range(num_blocks):
                for b in range(batch):
                    dot = sum(
                        p * q for p, q in zip(student_p[i][m][b], teacher_p[j][m][b], strict=True)
                    )
                    terms.append(-math.log(min(max(dot, eps), 1 - eps)))
            total += sum(terms) / len(terms)
            pairs += 1
    consistency = total / pairs
    kl_total = 0.0
    for m in range(num_blocks):
        rows = [view[m][b] for view in student_p + teacher_p for b in range(batch)]
        mean = [sum(row[k] for row in rows) / len(rows) for k in range(block_size)]
        kl_total += sum(p * math.log(p * block_size) for p in mean)
    return consistency + weight * kl_total / num_blocks


@pytest.mark.parametrize(
    ("v_s", "batch", "k", "block"), [(2, 3, 8, 4), (4, 2, 12, 3), (3, 5, 6, 6)]
)
@pytest.mark.parametrize(("tau", "weight"), [(0.1, 1.0), (0.5, 0.3)])
def test_loss_matches_reference_for_a_fixed_partition(
    v_s: int, batch: int, k: int, block: int, tau: float, weight: float
) -> None:
    generator = torch.Generator().manual_seed(v_s * 100 + k)
    student = torch.randn(v_s, batch, k, generator=generator, dtype=torch.float64)
    teacher = torch.randn(2, batch, k, generator=generator, dtype=torch.float64)
    partition = torch.randperm(k, generator=generator).view(k // block, block)
    loss_fn = CARPLoss(k, block, temperature=tau, entropy_weight=weight)
    terms = loss_fn(student, partition, teacher)
    blocks = partition.tolist()
    expected = _reference(
        _block_probs(student, blocks, tau), _block_probs(teacher, blocks, tau), block, weight
    )
    assert terms.loss.dtype == torch.float64
    assert terms.loss.item() == pytest.approx(expected, rel=1e-10)
    assert terms.loss.item() == pytest.approx(
        terms.consistency.item() + weight * terms.entropy.item(), rel=1e-12
    )


def test_ready_targets_are_renormalised_per_block() -> None:
    generator = torch.Generator().manual_seed(0)
    k, block = 8, 4
    student = torch.randn(3, 2, k, generator=generator, dtype=torch.float64)
    logits = torch.randn(2, 2, k, generator=generator, dtype=torch.float64)
    partition = torch.randperm(k, generator=generator).view(2, block)
    loss_fn = CARPLoss(k, block, temperature=0.2)
    # Targets softmax(logits) over all K, renormalised per block, equal the block softmax
    # of the same logits: the scores path with scores = logits * tau.
    from_probs = loss_fn(student, partition, teacher_probs=torch.softmax(logits, dim=-1))
    from_scores = loss_fn(student, partition, logits * 0.2)
    assert from_probs.loss.item() == pytest.approx(from_scores.loss.item(), rel=1e-10)


def test_gradient_reaches_student_scores_only() -> None:
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(4, 3, 8, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 3, 8, generator=generator, requires_grad=True)
    loss_fn = CARPLoss(8, 4)
    loss_fn(student, loss_fn.next_partition(), teacher).loss.backward()
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_partition_is_a_permutation_that_changes_every_step_and_follows_the_seed() -> None:
    loss_fn = CARPLoss(64, 8, seed=3)
    partitions = [loss_fn.next_partition() for _ in range(5)]
    for blocks in partitions:
        assert blocks.shape == (8, 8)
        assert torch.equal(blocks.flatten().sort().values, torch.arange(64))
    for a, b in zip(partitions, partitions[1:], strict=False):
        assert not torch.equal(a, b)
    assert int(loss_fn.num_partitions) == 5
    # Same seed: same sequence; another seed: another one.
    same = CARPLoss(64, 8, seed=3)
    assert all(torch.equal(same.next_partition(), p) for p in partitions)
    other = CARPLoss(64, 8, seed=4)
    assert not torch.equal(other.next_partition(), partitions[0])


def test_partition_counter_round_trips_through_the_state_dict() -> None:
    loss_fn = CARPLoss(16, 4, seed=1)
    for _ in range(3):
        loss_fn.next_partition()
    resumed = CARPLoss(16, 4, seed=1)
    resumed.load_state_dict(loss_fn.state_dict())
    assert torch.equal(resumed.next_partition(), loss_fn.next_partition())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_prototypes": 10, "block_size": 4}, "block_size must divide num_prototypes=10"),
        ({"num_prototypes": 10, "block_size": 1}, "block_size"),
        ({"num_prototypes": 8, "block_size": 4, "temperature": 0.0}, "temperature"),
        ({"num_prototypes": 8, "block_size": 4, "entropy_weight": -1.0}, "entropy_weight"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CARPLoss(**kwargs)


def test_bad_inputs_name_the_argument() -> None:
    loss_fn = CARPLoss(8, 4)
    partition = loss_fn.next_partition()
    with pytest.raises(ValueError, match="teacher_scores"):
        loss_fn(torch.zeros(2, 3, 8), partition, torch.zeros(2, 3, 7))
    with pytest.raises(ValueError, match="exactly one"):
        loss_fn(torch.zeros(2, 3, 8), partition)
    with pytest.raises(ValueError, match="partition"):
        loss_fn(torch.zeros(2, 3, 8), partition.view(-1), torch.zeros(2, 3, 8))
