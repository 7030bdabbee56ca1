"""benchmarks/gpu_check.py, the script a lent GPU runs, smoke-tested on the CPU at a tiny size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO_ROOT, child_environment


@pytest.mark.slow  # 12 s: a smoke test of a script only a lent GPU runs
def test_the_gpu_check_runs_every_host_and_kind_on_the_cpu(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--tiny", "--device", "cpu"]
        + ["--no-write", "--batches", "2", "--steps", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=child_environment(REPO_ROOT),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [
        line
        for line in done.stdout.splitlines()
        if line.startswith("| dino") or line.startswith("| ibot")
    ]
    assert [row.split("|")[1:4] for row in rows] == [
        [" dino ", " joint ", " 2 "],
        [" dino ", " decoupled ", " 2 "],
        [" ibot ", " joint ", " 2 "],
        [" ibot ", " decoupled ", " 2 "],
    ]
    assert (
        "no CUDA device"
        in subprocess.run(
            [sys.executable, "-m", "benchmarks.gpu_check", "--no-write"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env=child_environment(REPO_ROOT),
        ).stderr
    )
