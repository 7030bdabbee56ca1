"""`protogmm eval` and `diagnose` take `fit`'s `--data.*` arguments (and the short forms)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from protogmm.cli import main
from protogmm.cli.data_arguments import command_parser, expand_data_shorthands, parse_command
from protogmm.cli.legacy_data import upgrade_data_argv
from protogmm.training.legacy_hparams import MOVED_DATA_KEYS

#: The tiny run's data: 64 synthetic 16 px images (the data-module default is 512).
SYNTHETIC = ["--data.dataset", "synthetic", "--data.synthetic.samples", "64"]


@pytest.fixture(scope="module")
def checkpoint(tiny_run: Callable[[str], Path]) -> Path:
    """The last checkpoint of one tiny decoupled run on synthetic 16 px images."""
    return tiny_run("decoupled") / "checkpoints" / "last.ckpt"


def whole_stderr_line(capsys: pytest.CaptureFixture[str]) -> str:
    """All that the command wrote on stderr, which must be one line."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_eval_knn_with_dotted_data_arguments(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["eval", "knn", str(checkpoint), *SYNTHETIC, "--data.synthetic.image_size", "16"]
    assert main([*args, "--k", "5"]) == 0
    out = capsys.readouterr().out
    assert "k-NN (k=5, T=0.07) on synthetic" in out
    for row in ("| trained |", "| untrained encoder |", "| raw pixels |"):
        assert row in out


def test_eval_on_a_class_folder(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The README's example: a folder of classes, resized and converted to the run's geometry.
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for index in range(10):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / label / f"{index}.png")
    args = ["eval", "knn", str(checkpoint), "--data.dataset", "folder"]
    args += ["--data.root", str(tmp_path), "--data.image_size", "16", "--data.in_channels", "1"]
    assert main([*args, "--k", "3"]) == 0
    assert "on folder" in capsys.readouterr().out


def test_eval_reads_a_data_config_file(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "data.yaml"
    config.write_text("dataset: synthetic\nsynthetic:\n  samples: 64\n")
    assert main(["eval", "knn", str(checkpoint), "--data", str(config), "--k", "5"]) == 0
    assert "on synthetic" in capsys.readouterr().out


def test_diagnose_with_dotted_data_arguments_measures_usage(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["diagnose", str(checkpoint), "--eps", "0.025", "--out", str(tmp_path), *SYNTHETIC]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "usage on synthetic" in out and "ever chosen" in out


def test_data_checkpoint_replaces_only_the_given_stored_arguments(checkpoint: Path) -> None:
    parser = command_parser("protogmm eval", None)
    parser.add_argument("checkpoint", type=Path)
    args, data = parse_command(parser, [str(checkpoint), "--data", "checkpoint", "--data.seed=3"])
    assert data.from_checkpoint and data.given == {"seed": 3} and data.requested
    datamodule = data.datamodule(args.checkpoint)
    # Stored: synthetic, 64 samples, batch 16; given: the seed.
    assert datamodule.hparams.dataset == "synthetic" and datamodule.hparams.seed == 3
    assert datamodule.synthetic.samples == 64 and datamodule.hparams.batch_size == 16


def test_no_data_argument_asks_for_no_data() -> None:
    parser = command_parser("protogmm diagnose", None)
    parser.add_argument("checkpoint", type=Path)
    args, data = parse_command(parser, ["x.ckpt"])
    assert not data.requested and data.given == {} and args.data.dataset == "mnist5k"


def test_short_forms_are_the_dotted_arguments() -> None:
    argv = ["x.ckpt", "--data", "synthetic", "--data-root", "/d", "--data-arg", "seed=3"]
    assert expand_data_shorthands(argv) == (
        ["x.ckpt", "--data.dataset=synthetic", "--data.root=/d", "--data.seed=3"],
        False,
    )
    assert expand_data_shorthands(["--data=checkpoint", "--data.root", "/d"]) == (
        ["--data.root", "/d"],
        True,
    )
    # A missing value is left to the parser, which names the option.
    assert expand_data_shorthands(["--data", "--k", "3"]) == (["--data", "--k", "3"], False)


@pytest.mark.parametrize(
    ("args", "culprit"),
    [
        (["--data.dataset", "imagenet"], "data.dataset"),  # the parser lists the datasets
        (["--data", "imagenet"], "data.dataset"),
        (["--data.synthetic.samplez", "64"], "--data.synthetic.samplez"),
        (["--data.batch_size", "many"], "data.batch_size"),
        ([*SYNTHETIC[:2], "--data.synthetic.samples", "4"], "data.synthetic.samples"),
        ([*SYNTHETIC[:2], "--data.synthetic_samples", "4"], "data.synthetic.samples"),  # old key
        (["--data.knn.train_samples", "-1"], "data.knn.train_samples must be"),
        (["--data.imbalance.ratio", "0.5"], "data.imbalance.ratio must be"),
        (["--data.longtail.thresholds", "[1, 2]"], "data.longtail.thresholds: few_threshold"),
        (["--data.images.max_pixels", "0"], "data.images.max_pixels must be"),
        (["--data.images.on_bad", "ignore"], "data.images.on_bad"),
        (["--data-arg", "knn.train_samples=-1"], "data.knn.train_samples must be"),
        (["--data.dataset", "folder", "--data.image_size", "16"], "data.root"),
        (["--data-arg", "imbalance=3"], "--data-arg 'imbalance=3'"),
    ],
)
def test_bad_data_arguments_are_one_line_errors(
    checkpoint: Path, capsys: pytest.CaptureFixture[str], args: list[str], culprit: str
) -> None:
    for command in (["eval", "knn", str(checkpoint)], ["diagnose", str(checkpoint)]):
        assert main([*command, *args]) == 2, command[0]
        line = whole_stderr_line(capsys)
        assert line.startswith(f"protogmm {command[0]}: error:") and culprit in line, line


def test_a_bad_command_line_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "knn"]) == 2
    assert "checkpoint" in whole_stderr_line(capsys)
    assert main(["eval", "kmeans", "x.ckpt"]) == 2
    assert "invalid choice" in whole_stderr_line(capsys)


def test_grouped_keys_parse_from_the_command_line_and_yaml(tmp_path: Path) -> None:
    parser = command_parser("protogmm eval", None)
    parser.add_argument("checkpoint", type=Path)
    argv = ["x.ckpt", *SYNTHETIC, "--data.knn.train_samples", "40", "--data.images.scan=true"]
    _, data = parse_command(parser, argv)
    assert data.given == {
        "dataset": "synthetic",
        "synthetic": {"samples": 64},
        "knn": {"train_samples": 40},
        "images": {"scan": True},
    }
    config = tmp_path / "data.yaml"
    config.write_text("dataset: synthetic\nsynthetic: {samples: 64, classes: 4}\n")
    _, from_file = parse_command(parser, ["x.ckpt", "--data", str(config)])
    datamodule = from_file.datamodule(Path("unused"))
    assert (datamodule.synthetic.samples, datamodule.synthetic.classes) == (64, 4)
    assert datamodule.hparams.synthetic == {
        "samples": 64,
        "classes": 4,
        "image_size": 16,
        "imbalance_ratio": 1.0,
    }


def test_the_flat_keys_of_earlier_versions_still_parse(tmp_path: Path) -> None:
    """Configs, scripts and documents written before the groups keep working."""
    parser = command_parser("protogmm eval", None)
    parser.add_argument("checkpoint", type=Path)
    grouped = {"dataset": "synthetic", "synthetic": {"samples": 64}, "knn": {"train_samples": 40}}
    argv = ["x.ckpt", "--data.dataset", "synthetic", "--data.synthetic_samples", "64"]
    assert parse_command(parser, [*argv, "--data.knn_train_samples=40"])[1].given == grouped
    assert parse_command(parser, [*argv, "--data-arg", "knn_train_samples=40"])[1].given == grouped
    config = tmp_path / "data.yaml"
    config.write_text("dataset: synthetic\nsynthetic_samples: 64\nknn_train_samples: 40\n")
    assert parse_command(parser, ["x.ckpt", "--data", str(config)])[1].given == grouped
    assert upgrade_data_argv(["--data.on_bad_image", "skip", "--data.scan_images=true"]) == [
        "--data.images.on_bad",
        "skip",
        "--data.images.scan=true",
    ]


def test_fit_reads_a_config_of_the_flat_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "old.yaml"
    config.write_text(
        "data:\n  dataset: synthetic\n  synthetic_samples: 64\n  imbalance_ratio: 2.0\n"
        "  longtail_thresholds: [0.5, 0.2]\n  longtail_thresholds_relative: true\n"
    )
    argv = ["fit", "--config", str(config), "--data.knn_test_samples", "9", "--print_config"]
    assert main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)["data"]
    assert printed["synthetic"]["samples"] == 64 and printed["imbalance"]["ratio"] == 2.0
    assert printed["longtail"] == {"thresholds": [0.5, 0.2], "relative": True}
    assert printed["knn"] == {"train_samples": 20000, "test_samples": 9}
    assert not set(MOVED_DATA_KEYS) & set(printed)
