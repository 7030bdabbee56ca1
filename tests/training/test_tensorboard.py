"""TensorBoard beside (or instead of) metrics.csv: the same metrics, and `compare` reads both."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import TINY_FIT
from protogmm.cli import main
from protogmm.cli.compare import read_run
from protogmm.training.run_folder import holds_a_run


def fit(run_dir: Path, *args: str) -> int:
    return main(
        [
            "fit",
            *TINY_FIT,
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={run_dir}",
            "--dense_every_n_steps=1",
            *args,
        ]
    )


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run logged to metrics.csv and TensorBoard."""
    run_dir = tmp_path_factory.mktemp("both")
    assert fit(run_dir, "--logger=both") == 0
    return run_dir


def test_both_loggers_write_into_the_run_folder_with_the_same_history(both: Path) -> None:
    events = list(both.glob("events.out.tfevents.*"))
    assert len(events) == 1 and (both / "metrics.csv").is_file()
    summary, from_csv = read_run(both)
    assert len(from_csv) >= 4 and summary["num_prototypes"] == 32
    (both / "metrics.csv").rename(both / "metrics.csv.bak")  # compare falls back to events
    try:
        _, from_events = read_run(both)
    finally:
        (both / "metrics.csv.bak").rename(both / "metrics.csv")
    assert [row["step"] for row in from_events] == [row["step"] for row in from_csv]
    for csv_row, event_row in zip(from_csv, from_events, strict=True):
        assert event_row == pytest.approx(csv_row, rel=1e-6)  # TensorBoard keeps float32


def test_a_tensorboard_only_run_is_a_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    assert fit(run_dir, "--logger=tensorboard") == 0
    assert not (run_dir / "metrics.csv").exists() and (run_dir / "summary.json").is_file()
    assert read_run(run_dir)[1]  # the history, from the events alone
    (run_dir / "summary.json").unlink()  # a folder with only events still holds a run
    assert holds_a_run(run_dir)
    assert fit(run_dir, "--logger=tensorboard") == 2
    assert "holds a run already" in capsys.readouterr().err
    old_events = set(run_dir.glob("events.out.tfevents.*"))
    assert fit(run_dir, "--logger=tensorboard", "--overwrite=true") == 0
    assert not old_events & set(run_dir.glob("events.out.tfevents.*"))  # replaced, not mixed
