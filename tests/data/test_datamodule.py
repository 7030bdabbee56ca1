"""The data module on folders and CIFAR pickles: splits, long tail, bad files, a tiny fit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from imagefiles import break_file, write_cifar, write_tree

from helpers import FOLDER_MODEL, fit_tiny, run_cli
from protogmm.data import BadImageError, SkipBadImages
from protogmm.training import datamodule
from protogmm.training.datamodule import SSLDataModule, datamodule_from_checkpoint


def folder_data(folder: Path, **kwargs: object) -> SSLDataModule:
    args = {
        "dataset": "folder",
        "root": str(folder),
        "image_size": 16,
        "batch_size": 8,
        "num_local_crops": 0,
    }
    return SSLDataModule(**(args | kwargs))


def test_train_and_val_folders(tmp_path: Path) -> None:
    write_tree(tmp_path / "train", {"cat": 5, "dog": 3}, size=12)
    write_tree(tmp_path / "val", {"cat": 2, "dog": 2}, size=12)
    data = folder_data(tmp_path)
    assert (data.in_channels, data.image_size) == (3, 16)
    data.setup("fit")
    assert data.train_class_counts() == [5, 3]
    assert np.bincount(data.labelled_split("test").labels).tolist() == [2, 2]
    views, labels = next(iter(torch.utils.data.DataLoader(data.train_set, batch_size=8)))
    assert [tuple(v.shape) for v in views] == [(8, 3, 16, 16)] * 2
    assert sorted(labels.tolist()) == [0, 0, 0, 0, 0, 1, 1, 1]
    train_loader, test_loader = data.knn_dataloaders()
    images, _ = next(iter(test_loader))
    assert tuple(images.shape) == (4, 3, 16, 16)


def test_one_folder_is_split_by_class(tmp_path: Path) -> None:
    write_tree(tmp_path, {"a": 10, "b": 5})
    data = folder_data(tmp_path, test_fraction=0.2, in_channels=1)
    # round(10 * 0.2) = 2 and round(5 * 0.2) = 1 held out per class.
    assert data.train_class_counts() == [8, 4]
    assert np.bincount(data.labelled_split("test").labels).tolist() == [2, 1]
    train = set(p for p, _ in data.labelled_split("train").samples)
    test = set(p for p, _ in data.labelled_split("test").samples)
    assert not train & test and len(train | test) == 15
    images, _ = next(iter(data.knn_dataloaders()[0]))
    assert images.shape[1] == 1  # converted to grayscale


@pytest.mark.parametrize(
    ("layout", "kwargs", "error", "message"),
    [
        ({"train": {"a": 1, "b": 1}, "val": {"a": 1, "c": 1}}, {}, ValueError, "only in"),
        ({"train": {"a": 1}}, {}, FileNotFoundError, "no .*val or .*test"),
        ({}, {"root": "/nonexistent/protogmm"}, FileNotFoundError, "data.root"),
        ({"x": {"a": 1}}, {"image_size": None}, ValueError, "data.image_size is required"),
    ],
)
def test_layout_errors_are_one_line(tmp_path: Path, layout, kwargs, error, message) -> None:
    for split, counts in layout.items():
        write_tree(tmp_path / split, counts)
    with pytest.raises(error, match=message) as caught:
        folder_data(tmp_path / "x" if "x" in layout else tmp_path, **kwargs).setup("fit")
    assert "\n" not in str(caught.value)


def test_mismatch_names_both_folders(tmp_path: Path) -> None:
    write_tree(tmp_path / "train", {"a": 1, "b": 1})
    write_tree(tmp_path / "test", {"a": 1, "c": 1})
    with pytest.raises(ValueError) as caught:
        folder_data(tmp_path).setup("fit")
    assert str(caught.value) == (
        f"class folders differ between {tmp_path / 'train'} and {tmp_path / 'test'}: only in "
        f"{tmp_path / 'train'}: ['b'], only in {tmp_path / 'test'}: ['c']"
    )


def test_long_tailed_training_split_counts(tmp_path: Path) -> None:
    write_tree(tmp_path / "train", {"a": 12, "b": 12, "c": 12, "d": 12})
    write_tree(tmp_path / "val", {"a": 2, "b": 2, "c": 2, "d": 2})
    data = folder_data(
        tmp_path,
        imbalance={"ratio": 4.0},
        longtail={"thresholds": (0.5, 0.3), "relative": True},
    )
    # 12 * 4^(-c/3) = 12, 7.56, 4.76, 3 -> floor.
    assert data.train_class_counts() == [12, 7, 4, 3]
    assert np.bincount(data.labelled_split("test").labels).tolist() == [2, 2, 2, 2]
    groups = data.frequency_groups()  # many > 6, few < 3.6
    assert groups.members == {"many": [0, 1], "medium": [2], "few": [3]}
    assert data.is_long_tailed()
    record = data.class_counts_record()
    assert record["counts"] == [12, 7, 4, 3] and record["classes"] == ["a", "b", "c", "d"]
    assert record["long_tail"]["n_max"] == 12 and record["long_tail"]["imbalance_ratio"] == 4.0
    assert not folder_data(tmp_path).is_long_tailed()  # balanced: one group


def test_scan_error_names_the_first_bad_file_and_the_count(tmp_path: Path) -> None:
    paths = write_tree(tmp_path / "train", {"a": 3, "b": 3})
    write_tree(tmp_path / "val", {"a": 1, "b": 1})
    break_file(paths[1], "zero")
    break_file(paths[4], "text")
    with pytest.raises(ValueError) as caught:
        folder_data(tmp_path, images={"scan": True})  # before any trainer exists
    message = str(caught.value)
    assert message.startswith("data.images.scan: 2 unreadable image file(s) among 6 in ")
    assert f"first: unreadable image {paths[1]}: empty file (0 bytes)" in message
    assert "data.images.on_bad=skip" in message and "\n" not in message


def test_scan_with_skip_drops_the_files_before_training(tmp_path: Path) -> None:
    paths = write_tree(tmp_path / "train", {"a": 3, "b": 3})
    write_tree(tmp_path / "val", {"a": 1, "b": 1})
    break_file(paths[1], "truncated")
    data = folder_data(tmp_path, images={"scan": True, "on_bad": "skip"})
    data.setup("fit")
    assert data.train_class_counts() == [2, 3]
    assert data.skipped_images() == {"train": [str(paths[1])]}
    assert str(paths[1]) not in [p for p, _ in data.labelled_split("train").samples]


def test_error_policy_stops_at_first_touch_naming_the_file(tmp_path: Path) -> None:
    paths = write_tree(tmp_path / "train", {"a": 3, "b": 3})
    write_tree(tmp_path / "val", {"a": 1, "b": 1})
    break_file(paths[4], "corrupt")
    data = folder_data(tmp_path)
    data.setup("fit")
    with pytest.raises(BadImageError, match=str(paths[4])):
        list(torch.utils.data.DataLoader(data.train_set, batch_size=8))


def test_cifar_datamodule(tmp_path: Path) -> None:
    write_cifar(tmp_path, "cifar10", per_file=4)
    data = SSLDataModule(dataset="cifar10", root=str(tmp_path), batch_size=4, num_local_crops=1)
    assert (data.in_channels, data.image_size) == (3, 32)
    data.setup("fit")
    views, _ = next(iter(torch.utils.data.DataLoader(data.train_set, batch_size=4)))
    assert [tuple(v.shape) for v in views] == [(4, 3, 32, 32)] * 2 + [(4, 3, 14, 14)]
    assert len(data.labelled_split("train")) == 20 and len(data.labelled_split("test")) == 4
    with pytest.raises(FileNotFoundError, match="CIFAR-100 not found"):
        SSLDataModule(dataset="cifar100", root=str(tmp_path)).setup("fit")


def test_fit_on_a_long_tailed_folder_with_a_broken_file(tmp_path: Path) -> None:
    """End to end: two steps, class_counts.json, skipped file and long-tail report."""
    root = tmp_path / "data"
    write_tree(root / "train", {"a": 10, "b": 10, "c": 10}, size=12)
    write_tree(root / "val", {"a": 3, "b": 3, "c": 3}, size=12)
    data = folder_data(
        root,
        imbalance={"ratio": 3.0},
        images={"on_bad": "skip"},
        longtail={"thresholds": (0.6, 0.4), "relative": True},
    )
    # Break one of the 5 files class b keeps (10 * 3^(-1/2) = 5.77): files are decoded
    # lazily, so it is found at first touch.
    broken = next(p for p, label in data.labelled_split("train").samples if label == 1)
    break_file(Path(broken), "text")
    run_dir = tmp_path / "run"
    _, trainer = fit_tiny(run_dir, FOLDER_MODEL | {"prototypes": "decoupled"}, data, devices=1)
    assert trainer.global_step == 2  # 10 + 5 + 3 = 18 images, batch 8, drop_last

    counts = json.loads((run_dir / "class_counts.json").read_text())
    assert counts["counts"] == [10, 5, 3] and counts["held_out_counts"] == [3, 3, 3]
    assert counts["frequency_groups"]["groups"]["few"]["classes"] == [2]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped_images"] == {
        "count": 1,
        "by_split": {"train": 1},
        "files": {"train": [broken]},
    }
    longtail = summary["longtail"]
    assert longtail["groups"]["many"]["classes"] == [0]
    assert set(longtail["results"]) == {"trained", "untrained encoder", "raw pixels"}
    assert longtail["results"]["trained"]["prototypes"]["all"]["samples"] == 18
    report = (run_dir / "report.md").read_text()
    assert "## Long tail: head / medium / tail" in report
    assert "| few | 1 | 3 |" in report

    # The checkpoint rebuilds the same data module (weights-only read).
    again = datamodule_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert again.train_class_counts() == [10, 5, 3]


def test_skip_at_first_touch_is_reported_by_the_fit(tmp_path: Path) -> None:
    root = tmp_path / "data"
    paths = write_tree(root / "train", {"a": 8, "b": 8}, size=12)
    write_tree(root / "val", {"a": 2, "b": 2}, size=12)
    break_file(paths[3], "zero")
    data = folder_data(root, images={"on_bad": "skip"})
    fit_tiny(tmp_path / "run", FOLDER_MODEL | {"prototypes": "joint"}, data)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_images"]["files"] == {"train": [str(paths[3])]}
    assert isinstance(data.labelled_split("train"), SkipBadImages)
    report = (tmp_path / "run" / "report.md").read_text()
    assert (
        f"Unreadable image files skipped (data.images.on_bad=skip): 1 (train: 1), e.g. `{paths[3]}`"
        in report
    )
    assert "longtail" not in summary  # balanced classes: no per-group analysis


def test_cli_scan_error_is_one_line(tmp_path: Path) -> None:
    paths = write_tree(tmp_path / "train", {"a": 2, "b": 2})
    write_tree(tmp_path / "val", {"a": 1, "b": 1})
    break_file(paths[0], "truncated")
    result = run_cli(
        "fit",
        "--data.dataset=folder",
        f"--data.root={tmp_path}",
        "--data.image_size=16",
        "--data.images.scan=true",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-2000:]
    assert "1 unreadable image file(s) among 4" in lines[0] and str(paths[0]) in lines[0]


def test_a_batch_larger_than_the_data_is_a_one_line_error_not_a_run_of_no_steps(
    tmp_path: Path,
) -> None:
    data = SSLDataModule(dataset="synthetic", synthetic={"samples": 64}, batch_size=128)
    data.setup("fit")
    with pytest.raises(ValueError, match=r"data\.batch_size: 128 .* 64 training images"):
        data.train_dataloader()
    # Through the command line: exit code 2 and one line naming the key, no run reported done.
    result = run_cli(
        "fit",
        "--data.dataset",
        "synthetic",
        "--data.synthetic.samples",
        "64",
        "--data.batch_size",
        "128",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--trainer.max_epochs",
        "1",
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "data.batch_size: 128" in result.stderr
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("cached", [True, False])
def test_knn_loaders_decode_once_when_they_fit_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached: bool
) -> None:
    write_tree(tmp_path / "train", {"cat": 5, "dog": 3}, size=12)
    write_tree(tmp_path / "val", {"cat": 2, "dog": 2}, size=12)
    data = folder_data(tmp_path)
    data.setup("fit")
    monkeypatch.setattr(datamodule, "KNN_CACHE_BYTES", 0)
    streamed = [list(loader) for loader in data.knn_dataloaders()]  # the reference
    one_byte_short = 12 * 4 * 3 * 16 * 16 - 1  # 12 RGB images of 16 px, float32
    monkeypatch.setattr(datamodule, "KNN_CACHE_BYTES", one_byte_short + int(cached))
    decodes = []
    original = datamodule.SSLDataModule._decoded
    monkeypatch.setattr(
        datamodule.SSLDataModule,
        "_decoded",
        lambda self, split: decodes.append(len(split)) or original(self, split),
    )
    for _ in range(3):  # the monitor's baselines and two epochs
        for loader, reference in zip(data.knn_dataloaders(), streamed, strict=True):
            batches = list(loader)
            assert len(batches) == len(reference) == 1
            torch.testing.assert_close(batches[0][0], reference[0][0], atol=0, rtol=0)
            assert batches[0][1].tolist() == reference[0][1].tolist()
    assert decodes == ([8, 4] if cached else [])  # each split decoded once, or streamed


def test_the_pixel_limit_reaches_the_folder_data_set(tmp_path: Path) -> None:
    write_tree(tmp_path / "train", {"cat": 2, "dog": 2}, size=12)
    write_tree(tmp_path / "val", {"cat": 1, "dog": 1}, size=12)
    with pytest.raises(ValueError, match="4 unreadable image file.* over the limit of 100"):
        folder_data(tmp_path, images={"max_pixels": 100, "scan": True})  # 12 x 12 > 100
    folder_data(tmp_path, images={"max_pixels": 144, "scan": True}).setup("fit")
    with pytest.raises(ValueError, match=r"data\.images\.max_pixels"):
        folder_data(tmp_path, images={"max_pixels": 0})
