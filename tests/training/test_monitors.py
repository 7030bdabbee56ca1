"""The monitors' cost is bounded: a k-NN bank of fixed size, baselines within a memory
budget (else one log line), the collapse monitor on rank 0 at a period growing with K."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import TINY_FIT, TINY_MODEL, fit_tiny, metric_rows, tiny_data
from protogmm.training.callbacks import CollapseMonitor, KNNMonitor
from protogmm.training.datamodule import SSLDataModule, merge_data_settings


def synthetic(**kwargs: object) -> SSLDataModule:
    """96 synthetic 16 px images without local crops (48 held out)."""
    return tiny_data(
        **merge_data_settings({"num_local_crops": 0, "synthetic": {"samples": 96}}, kwargs)
    )


def test_the_knn_bank_is_a_bounded_seeded_subset() -> None:
    full, bounded = synthetic(), synthetic(knn={"train_samples": 40, "test_samples": 10})
    full_train, full_test = full.knn_splits()
    train, test = bounded.knn_splits()
    assert (len(full_train), len(full_test)) == (96, 48)
    assert (len(train), len(test)) == (40, 10)
    assert set(train.indices.tolist()) <= set(range(96))
    assert (
        train.indices.tolist()
        == synthetic(knn={"train_samples": 40}).knn_splits()[0].indices.tolist()
    )
    assert len(next(iter(bounded.knn_dataloaders()[0]))[0]) == 40
    assert bounded.knn_image_bytes() == 50 * 4 * 1 * 16 * 16


def test_a_baseline_over_the_memory_budget_is_skipped_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 144 images: pixels 144 x 256 floats = 0.14 MB; the ConvNet's features 144 x 32.
    with caplog.at_level(logging.WARNING, logger="protogmm"):
        _, trainer = fit_tiny(tmp_path / "run", TINY_MODEL, synthetic(), baseline_memory_mb=0.1)
    monitor = next(c for c in trainer.callbacks if isinstance(c, KNNMonitor))
    assert "knn/untrained" in monitor.baselines and "knn/pixels" not in monitor.baselines
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 1 and "'pixels' skipped: 144 images x 256 features" in lines[0]
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert "knn/pixels" not in summary and "knn/untrained" in summary


def test_the_knn_monitor_options_are_checked() -> None:
    with pytest.raises(ValueError, match="knn_every_n_epochs"):
        KNNMonitor(every_n_epochs=0)
    with pytest.raises(ValueError, match="baseline_memory_mb"):
        KNNMonitor(baseline_memory_mb=-1)


@pytest.mark.parametrize(("k", "period"), [(1024, 10), (4096, 10), (4097, 20), (65536, 160)])
def test_the_dense_period_grows_with_k(k: int, period: int) -> None:
    monitor = CollapseMonitor(dense_every_n_steps=10)
    measured: list[int] = []
    monitor._measure = lambda trainer, module: measured.append(trainer.global_step)  # type: ignore[method-assign]
    module = SimpleNamespace(hparams={"num_prototypes": k})
    for step in range(1, 321):
        trainer = SimpleNamespace(current_epoch=0, global_step=step, is_global_zero=True)
        monitor.on_train_batch_end(trainer, module)  # type: ignore[arg-type]
    assert measured == list(range(period, 321, period))


def test_only_rank_zero_measures() -> None:
    monitor = CollapseMonitor()
    module = SimpleNamespace(prototypes_fitted=lambda: True)
    trainer = SimpleNamespace(is_global_zero=False, global_step=0)
    monitor._measure(trainer, module)  # type: ignore[arg-type]  # would fail past the rank test
    assert monitor.history == []


def test_eval_batches_hold_a_bounded_number_of_input_values(tmp_path: Path) -> None:
    assert synthetic().eval_batch_size() == 512  # 16 px grayscale
    data = synthetic(synthetic={"image_size": 224})
    data.in_channels = 3  # as a 224-px RGB folder
    assert data.eval_batch_size() == (1 << 24) // (3 * 224 * 224) == 111


def test_fit_takes_the_monitor_options_and_checks_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from protogmm.cli import main

    tiny = [*TINY_FIT, "--data.num_local_crops=0", "--trainer.max_epochs=2"]
    run_dir = tmp_path / "run"
    bad = ["fit", *tiny, f"--trainer.default_root_dir={run_dir}", "--knn_every_n_epochs=0"]
    assert main(bad) == 2
    assert "knn_every_n_epochs" in capsys.readouterr().err
    good = ["fit", *tiny, f"--trainer.default_root_dir={run_dir}", "--knn_every_n_epochs=2"]
    assert main([*good, "--baseline_memory_mb=0.01", "--dense_every_n_steps=3"]) == 0
    rows = metric_rows(run_dir)
    assert [row["step"] for row in rows if row.get("knn/top1")] == ["7"]  # epoch 1's end
    assert "knn/pixels" not in rows[0] and "knn/untrained" not in rows[0]  # over 0.01 MB
    best = [path.name for path in (run_dir / "checkpoints").glob("best-knn-*")]
    assert len(best) == 1 and best[0].startswith("best-knn-epoch=1-")  # measured epochs only
