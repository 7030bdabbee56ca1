"""benchmarks/hosts.py --quick runs end to end, so the script cannot rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # nine one-epoch runs with the k-NN monitor on MNIST-5k (minutes on 2 cores)
def test_quick_mode_trains_every_host_and_kind_and_prints_the_section(tmp_path: Path) -> None:
    before = (ROOT / "BENCHMARKS.md").read_text()
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "hosts.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    section = result.stdout[result.stdout.index("### Joint vs decoupled vs joint + KoLeo") :]
    for host in ("dino", "ibot", "carp"):
        for kind in ("joint", "decoupled", "joint + KoLeo-proto 0.1"):
            assert f"| {host} | {kind} |" in section, (host, kind)
    for baseline in ("| untrained convnet |", "| untrained vit |", "| raw pixels |"):
        assert baseline in section
    ibot_rows = [line for line in section.splitlines() if line.startswith("| ibot |")]
    assert all(line.split(" | ")[7].count("/") == 3 for line in ibot_rows)  # patch unique %
    # --quick never rewrites the measured numbers.
    assert (ROOT / "BENCHMARKS.md").read_text() == before
