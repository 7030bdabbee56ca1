"""``protogmm eval``: frozen-encoder k-NN or linear probe beside the untrained encoder, pixels."""

from __future__ import annotations

from pathlib import Path

from protogmm.cli.data_arguments import command_parser, parse_command
from protogmm.cli.processes import is_rank_zero, join_torchrun, leave
from protogmm.evaluation import knn_accuracy, linear_probe
from protogmm.evaluation.features import extract_features_sharded
from protogmm.reports import markdown_table
from protogmm.training.checkpoints import load_module


def run_eval(argv: list[str]) -> int:
    """``protogmm eval knn|linear CKPT --data NAME``: frozen teacher-backbone evaluation.

    Prints the trained encoder beside the untrained one (same architecture, seed-0 init) and
    raw pixels, measured the same way. Under torchrun every process extracts its share of
    the features and rank 0 prints. The data arguments are ``fit``'s ``--data.*``
    (default MNIST-5k); ``--data checkpoint`` is the data the checkpoint was trained on.
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
    datamodule = data.datamodule(args.checkpoint)
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
