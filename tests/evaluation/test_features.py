"""extract_features with batch statistics: what the teacher's BatchNorm layers do in training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from protogmm.evaluation.features import _share, extract_features


def _stale_encoder() -> nn.Sequential:
    """Linear -> BatchNorm -> Linear whose running statistics are still the initial ones
    (mean 0, variance 1), far from the data's: a run stopped after a few steps."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).double()


def _reference(encoder: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The same layers by hand, normalised with the batch's mean and biased variance."""
    first, norm, last = encoder
    h = first(x)
    mean, var = h.mean(dim=0), h.var(dim=0, unbiased=False)
    h = (h - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias
    return last(h)


def _batches(x: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(chunk, torch.zeros(len(chunk), dtype=torch.long)) for chunk in x.split(size)]


def test_batch_statistics_normalise_each_batch_and_leave_running_statistics_alone() -> None:
    encoder = _stale_encoder()
    x = torch.randn(40, 6, dtype=torch.float64) * 3 + 5
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    features, _ = extract_features(encoder, _batches(x, 20), batch_statistics=True)
    expected = torch.cat([_reference(encoder, chunk) for chunk in x.split(20)])
    torch.testing.assert_close(features, expected.float(), rtol=1e-5, atol=1e-5)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert encoder.training  # the previous mode comes back
    assert encoder[1].track_running_stats
    # Running statistics (the default) give other features: the stale ones.
    running, _ = extract_features(encoder, _batches(x, 20))
    assert not torch.allclose(running, features, atol=1e-2)


def test_sync_batch_norm_uses_this_process_batch_inside_a_process_group(tmp_path) -> None:
    # Inside a process group, SyncBatchNorm in training mode would pool every process's
    # statistics: a collective that hangs when one process embeds alone (on CPU it raises).
    encoder = nn.SyncBatchNorm.convert_sync_batchnorm(_stale_encoder())
    x = torch.randn(40, 6, dtype=torch.float64) * 3 + 5
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1
    )
    try:
        features, _ = extract_features(encoder, _batches(x, 20), batch_statistics=True)
    finally:
        torch.distributed.destroy_process_group()
    expected = torch.cat([_reference(encoder, chunk) for chunk in x.split(20)])
    torch.testing.assert_close(features, expected.float(), rtol=1e-5, atol=1e-5)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert "forward" not in vars(encoder[1])  # the layer's own forward is back


def test_a_small_last_batch_is_normalised_with_the_batch_before() -> None:
    encoder = _stale_encoder()
    x = torch.randn(21, 6, dtype=torch.float64)
    features, _ = extract_features(encoder, _batches(x, 20), batch_statistics=True)
    assert features.shape == (21, 3)
    # The one-image remainder gets the statistics of the previous batch and itself.
    expected_last = _reference(encoder, x)[-1:]
    torch.testing.assert_close(features[-1:], expected_last.float(), rtol=1e-5, atol=1e-5)


def test_a_first_batch_of_one_image_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match="at least 2 images"):
        extract_features(
            _stale_encoder(), _batches(torch.randn(1, 6).double(), 4), batch_statistics=True
        )


@pytest.mark.parametrize(
    ("total", "world", "batch"), [(21, 2, 4), (20, 3, 4), (3, 4, 2), (9, 2, 9)]
)
def test_shares_of_whole_batches_partition_the_samples_as_one_process_batches_them(
    total: int, world: int, batch: int
) -> None:
    shares = [_share(total, world, rank, batch, whole_batches=True) for rank in range(world)]
    assert sorted(i for share in shares for i in share) == list(range(total))
    one_process = [list(range(s, min(s + batch, total))) for s in range(0, total, batch)]
    for share in shares:
        # Each share, cut into batches of `batch`, is a run of one process's batches, the
        # smaller last batch right after the batch before it.
        cut = [share[s : s + batch] for s in range(0, len(share), batch)]
        for index, chunk in enumerate(cut):
            assert chunk in one_process
            if len(chunk) < batch and len(one_process) > 1:
                assert cut[index - 1] == one_process[-2]
    # Without whole batches: every world-th sample.
    assert _share(total, world, 1, batch, whole_batches=False) == list(range(1, total, world))
