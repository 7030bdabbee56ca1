"""`protogmm eval` under torchrun: each process extracts its shard, rank 0 prints the same
table as one process (features gathered in the data set's order)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from helpers import child_environment, run_cli
from protogmm.evaluation.features import extract_features, extract_features_sharded

DATA = [
    "--data",
    "synthetic",
    "--data.synthetic.samples",
    "64",
    "--data.synthetic.image_size",
    "16",
]


@pytest.mark.xdist_group("multiprocess")  # one launch at a time (see tests/training/test_ddp.py)
@pytest.mark.parametrize(
    ("command", "kind", "lines"),
    [
        (["eval", "knn"], "decoupled", 5),  # header, rule, trained, untrained, pixels
        # (the linear probe reads the same gathered features: its path is one process's)
        (["diagnose"], "decoupled", 5),  # the uniqueness table and the usage table
    ],
)
def test_under_torchrun_rank_zero_prints_what_one_process_prints(
    tmp_path: Path, tiny_run: Callable[[str], Path], command: list[str], kind: str, lines: int
) -> None:
    checkpoint = str(tiny_run(kind) / "checkpoints" / "last.ckpt")
    extra = ["--epochs", "20"] if "linear" in command else []
    if command == ["diagnose"]:
        extra = ["--out", str(tmp_path / "plots")]
    args = [*command, checkpoint, *DATA, *extra]
    one = run_cli(*args, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        + ["-m", "protogmm.cli", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=child_environment(),
    )
    assert two.returncode == 0, two.stderr[-2000:]
    table = [line for line in one.stdout.splitlines() if line.startswith("|")]
    assert len(table) >= lines
    assert [line for line in two.stdout.splitlines() if line.startswith("|")] == table


def test_without_a_process_group_the_sharded_extraction_is_the_plain_one() -> None:
    images = torch.randn(10, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(images, torch.arange(10)), batch_size=3)
    plain, sharded = extract_features(None, loader), extract_features_sharded(None, loader)
    assert all(torch.equal(a, b) for a, b in zip(plain, sharded, strict=True))
