"""``protogmm eval``: frozen-encoder k-NN or linear probe beside the untrained encoder, pixels."""

from __future__ import annotations

import sys
from pathlib import Path

from protogmm.cli.command_line import ConfigError
from protogmm.cli.data_arguments import DataArguments, command_parser, parse_command
from protogmm.cli.processes import is_rank_zero, join_torchrun, leave
from protogmm.evaluation import knn_accuracy, linear_probe
from protogmm.evaluation.features import extract_features_sharded
from protogmm.reports import markdown_table
from protogmm.training.checkpoints import load_module
from protogmm.training.datamodule import SSLDataModule
from protogmm.training.module import PrototypicalSSL


def run_eval(argv: list[str]) -> int:
    """``protogmm eval knn|linear CKPT --data NAME``: frozen teacher-backbone evaluation.

    Prints the trained encoder beside the untrained one (same architecture, seed-0 init) and
    raw pixels, measured the same way. Under torchrun every process extracts its share of
    the features and rank 0 prints. The data arguments are ``fit``'s ``--data.*``;
    without any, the data the checkpoint was trained on (``--data checkpoint``).
    """
    parser = command_parser("protogmm eval", run_eval.__doc__)
    parser.add_argument("protocol", choices=("knn", "linear"))
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--epochs", type=int, default=100, help="linear probe epochs")
    args, data = parse_command(parser, argv)
    device = join_torchrun()  # under torchrun: every process extracts its shard
    trained = load_module(args.checkpoint)
    untrained = load_module(args.checkpoint, trained=False)
    if not data.requested:
        data = DataArguments(given={}, from_checkpoint=True)
    datamodule = data.datamodule(args.checkpoint)
    check_data_fits(trained, datamodule, args.checkpoint)
    train_loader, test_loader = datamodule.knn_dataloaders()
    rows = []
    for label, encoder in (
        ("trained", trained.teacher["backbone"]),
        ("untrained encoder", untrained.teacher["backbone"]),
        ("raw pixels", None),
    ):
        if encoder is not None:
            encoder.to(device)
        train_x, train_y = extract_features_sharded(encoder, train_loader, device)
        test_x, test_y = extract_features_sharded(encoder, test_loader, device)
        if not is_rank_zero():
            continue  # rank 0 classifies and prints
        if args.protocol == "knn":
            accuracy = knn_accuracy(
                train_x, train_y, test_x, test_y, k=args.k, temperature=args.temperature
            )
        else:
            accuracy = linear_probe(train_x, train_y, test_x, test_y, epochs=args.epochs)
        rows.append([label, f"{100 * accuracy:.1f}"])
    protocol = (
        f"k-NN (k={args.k}, T={args.temperature:g})"
        if args.protocol == "knn"
        else f"linear probe ({args.epochs} epochs)"
    )
    if is_rank_zero():
        print(markdown_table([f"{protocol} on {datamodule.hparams.dataset}", "top-1 %"], rows))
    return leave()


def check_data_fits(module: PrototypicalSSL, data: SSLDataModule, checkpoint: Path) -> None:
    """One line when the data's images have other channels than the checkpoint's encoder
    takes; a note on stderr when only their size differs (a ConvNet pools any size).

    Raises:
        ConfigError: the channels differ.
    """
    channels, size = module.hparams.in_channels, module.hparams.image_size
    if data.in_channels != channels:
        raise ConfigError(
            f"{checkpoint}: its encoder takes {channels}-channel images, data "
            f"{data.hparams.dataset!r} gives {data.in_channels}-channel ones: pass the data it "
            "was trained on (--data checkpoint, or fit's --data.* arguments)"
        )
    if data.image_size != size:
        print(
            f"note: {checkpoint} was trained at {size} px, the data gives {data.image_size} px",
            file=sys.stderr,
        )
