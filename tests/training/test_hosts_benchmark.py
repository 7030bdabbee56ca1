"""benchmarks/hosts.py --quick runs end to end, so the script cannot rot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import _common as common
from benchmarks import hosts
from helpers import REPO_ROOT, run_benchmark


@pytest.mark.slow  # nine one-epoch runs with the k-NN monitor on MNIST-5k (minutes on 2 cores)
def test_quick_mode_trains_every_host_and_kind_and_prints_the_section(tmp_path: Path) -> None:
    before = (REPO_ROOT / "BENCHMARKS.md").read_text()
    out = run_benchmark("hosts", "--quick", "--out", str(tmp_path), cwd=tmp_path, timeout=1800)
    section = out[out.index("### Joint vs decoupled vs joint + KoLeo") :]
    for host in ("dino", "ibot", "carp"):
        for kind in ("joint", "decoupled", "joint + KoLeo-proto 0.1"):
            assert f"| {host} | {kind} |" in section, (host, kind)
    for baseline in ("| untrained convnet |", "| untrained vit |", "| raw pixels |"):
        assert baseline in section
    ibot_rows = [line for line in section.splitlines() if line.startswith("| ibot |")]
    assert all(line.split(" | ")[7].count("/") == 3 for line in ibot_rows)  # patch unique %
    # --quick never rewrites the measured numbers.
    assert (REPO_ROOT / "BENCHMARKS.md").read_text() == before


def fake_summary() -> dict[str, Any]:
    """What ``train_run`` returns, with every key the hosts table reads."""
    unique = {"0.025": 100.0, "0.1": 100.0, "0.25": 90.0, "0.5": 10.0}
    return {
        "epochs": 5,
        "steps": 155,
        "seconds_per_epoch": 60.0,
        "unique_pct": unique,
        "rows": [{"step": 5.0, "unique_pct/eps=0.025": 99.0}],
        **{f"knn/{name}": 0.9 for name in ("top1", "untrained", "pixels")},
        **{f"knn/{name}_k200": 0.8 for name in ("top1", "untrained", "pixels")},
    }


@pytest.mark.parametrize("reuse", [True, False])
def test_reuse_trains_only_the_runs_without_a_matching_finished_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reuse: bool,
) -> None:
    trained: list[str] = []
    finished = {"dino-joint-seed0", "dino-joint-koleo-seed1"}

    def reusable_run(run_dir: Path, **settings: Any) -> dict[str, Any] | None:
        assert settings["model"]["host"] == "dino" and settings["epochs"] == 5
        return fake_summary() if run_dir.name in finished else None

    def train_run(run_dir: Path, **settings: Any) -> dict[str, Any]:
        trained.append(run_dir.name)
        return fake_summary()

    monkeypatch.setattr(common, "reusable_run", reusable_run)
    monkeypatch.setattr(common, "train_run", train_run)
    monkeypatch.setattr(hosts, "patch_unique_pct", lambda run_dir, steps: None)
    argv = ["--hosts", "dino", "--seeds", "0", "1", "--out", str(tmp_path), "--no-write"]
    assert hosts.main(argv + (["--reuse"] if reuse else [])) == 0
    kinds = ("joint", "decoupled", "joint-koleo")
    every_run = {f"dino-{kind}-seed{seed}" for kind in kinds for seed in (0, 1)}
    assert sorted(trained) == sorted(every_run - finished if reuse else every_run)


def test_patch_prototypes_are_read_only_from_the_last_step(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    # A run without a patch set (DINO, CARP) does not need last.ckpt to be the last step's:
    # runs from before that fix saved the best epoch there.
    torch.save({"global_step": 62, "state_dict": {"teacher.head.weight": torch.ones(2)}}, last)
    assert hosts.patch_unique_pct(tmp_path, steps=155) is None
    patch = torch.eye(4).repeat(2, 1)  # 8 prototypes, 4 distinct directions
    torch.save({"global_step": 62, "state_dict": {"patch.gmm.mean": patch}}, last)
    with pytest.raises(SystemExit, match="from step 62, not the run's last step 155"):
        hosts.patch_unique_pct(tmp_path, steps=155)
    torch.save({"global_step": 155, "state_dict": {"patch.gmm.mean": patch}}, last)
    assert hosts.patch_unique_pct(tmp_path, steps=155) == {
        "0.025": 50.0,
        "0.1": 50.0,
        "0.25": 50.0,
        "0.5": 50.0,
    }
