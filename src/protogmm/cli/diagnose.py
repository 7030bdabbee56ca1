"""``protogmm diagnose``: unique prototypes over an ε sweep, usage, long tail, geometry plots."""

from __future__ import annotations

from pathlib import Path

import torch

from protogmm.cli.command_line import ConfigError
from protogmm.cli.data_arguments import command_parser, parse_command
from protogmm.cli.evaluate import check_data_fits
from protogmm.cli.processes import is_rank_zero, join_torchrun, leave
from protogmm.diagnostics import (
    DEFAULT_EPS,
    UsageAccumulator,
    angle_flatness,
    data_reference_curve,
    describe_prototypes,
    load_prototypes,
    plot_prototype_geometry,
    plot_unique_vs_eps,
    prototype_angles,
    unique_prototype_curve,
)
from protogmm.evaluation.longtail import longtail_markdown
from protogmm.reports import markdown_table
from protogmm.training.callbacks import pixels_long_tail, teacher_long_tail
from protogmm.training.checkpoints import load_module
from protogmm.training.datamodule import SSLDataModule
from protogmm.training.module import PrototypicalSSL

#: Embeddings scored against the prototypes at a time (a [chunk, K] posterior in memory).
USAGE_CHUNK = 512


def run_diagnose(argv: list[str]) -> int:
    """``protogmm diagnose CKPT``: unique prototypes over an ε sweep, usage, geometry plots.

    Reads protogmm's checkpoints and other projects' (DINO, iBOT, DINOv2 heads), weights
    only. With data arguments (protogmm checkpoints only: ``--data NAME`` or any of ``fit``'s
    ``--data.*``) it also measures prototype usage of the teacher's embeddings over the
    held-out split and, when the training classes are long-tailed (at least two of the many
    / medium / few groups), the per-group k-NN and linear accuracy and prototype diversity
    beside the untrained encoder and raw pixels. ``--data checkpoint`` rebuilds the data the
    checkpoint was trained on (``--data.*`` replace its stored values).
    """
    parser = command_parser("protogmm diagnose", run_diagnose.__doc__)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--eps", type=float, nargs="+", default=list(DEFAULT_EPS))
    parser.add_argument("--key", default=None, help="one prototype layer (default: all)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="plot folder (default: <checkpoint stem>-diagnose next to it)",
    )
    args, data = parse_command(parser, argv)
    for eps in args.eps:
        if not 0.0 < eps <= 2.0:  # a cosine distance between unit rows is at most 2
            raise ConfigError(f"--eps {eps:g}: each ε must be in (0, 2]")
    device = join_torchrun()  # under torchrun every process embeds its share of the data
    usage = None
    if data.requested:
        datamodule = data.datamodule(args.checkpoint)
        module = load_module(args.checkpoint)
        check_data_fits(module, datamodule, args.checkpoint)
        usage = usage_table(module, datamodule, device, args.eps)
    if not is_rank_zero():
        return leave()  # rank 0 reports
    found = load_prototypes(args.checkpoint, key=args.key)
    print(describe_prototypes(found))
    # An imperfect set (a NaN or all-zero row) is measured on its usable rows, said so in
    # its row of the table; one bad layer does not stop the report on the others.
    usable = {name: _usable_rows(matrix) for name, matrix in found.items()}
    found = {name: matrix[usable[name]] for name, matrix in found.items()}
    curves = {
        name: unique_prototype_curve(matrix, args.eps)
        for name, matrix in found.items()
        if matrix.shape[0] > 0
    }
    print(uniqueness_table(found, usable, curves, args.eps))
    if usage is not None:
        print(usage)
        print(long_tail_text(module, load_module(args.checkpoint, trained=False), datamodule))
    out = args.out or args.checkpoint.with_name(args.checkpoint.stem + "-diagnose")
    written = []
    if curves:
        sizes = {name: found[name].shape[0] for name in curves}
        written.append(plot_unique_vs_eps(curves, sizes, out / "unique_vs_eps.png"))
    # The angle density needs at least 3 prototypes (K = 1 or 2 has no geometry to plot).
    plottable = {n: m for n, m in found.items() if m.shape[0] >= 3}
    if plottable:
        written.append(plot_prototype_geometry(plottable, out / "prototype_geometry.png"))
    if written:
        print("plots: " + ", ".join(str(path) for path in written))
    return leave()


def uniqueness_table(
    found: dict[str, torch.Tensor],
    usable: dict[str, torch.Tensor],
    curves: dict[str, dict[float, int]],
    eps_values: list[float],
) -> str:
    """One row per prototype set: K, unique prototypes at each ε, angle-density flatness.

    Args:
        found: each set's usable rows, ``[K, d]``.
        usable: each set's mask of usable rows over all of its rows (to count the others).
        curves: each non-empty set's unique prototypes at each ε.
        eps_values: the ε columns.
    """
    header = ["prototypes", "K"] + [f"unique ε={eps:g}" for eps in eps_values] + ["angle TV"]
    rows = []
    for name, matrix in found.items():
        k, left_out = matrix.shape[0], int((~usable[name]).sum())
        size = f"{k} ({left_out} non-finite or zero rows left out)" if left_out else str(k)
        if k == 0:
            rows.append([name, size] + ["n/a"] * (len(eps_values) + 1))
            continue
        flatness = angle_flatness(prototype_angles(matrix)) if k >= 3 else float("nan")
        rows.append(
            [name, size]
            + [f"{curves[name][e]} ({100 * curves[name][e] / k:.1f}%)" for e in eps_values]
            + [f"{flatness:.2f}"]
        )
    return markdown_table(header, rows)


def _usable_rows(matrix: torch.Tensor) -> torch.Tensor:
    """``[K]`` mask of the finite, non-zero rows (Definition 2.1 needs a direction)."""
    return torch.isfinite(matrix).all(dim=1) & (matrix.abs().sum(dim=1) > 0)


def long_tail_text(module: PrototypicalSSL, untrained: PrototypicalSSL, data: SSLDataModule) -> str:
    """Per-group accuracy and prototype diversity, or why there is no per-group analysis.

    Args:
        module: the trained module.
        untrained: the same architecture untrained (the encoder baseline).
        data: the data measured on.
    """
    groups = data.frequency_groups()
    if not data.is_long_tailed():
        many, few = groups.many_threshold, groups.few_threshold
        return (
            f"long tail: every training class falls in one frequency group (many > {many:g}, "
            f"few < {few:g}; data.longtail.thresholds): no per-group analysis"
        )
    results = {
        "trained": teacher_long_tail(module, data),
        "untrained encoder": teacher_long_tail(untrained, data, with_prototypes=False),
        "raw pixels": pixels_long_tail(data),
    }
    return longtail_markdown(groups, results, num_prototypes=module.hparams.num_prototypes)


def usage_table(
    module: PrototypicalSSL,
    data: SSLDataModule,
    device: torch.device | str = "cpu",
    eps_values: list[float] | tuple[float, ...] = DEFAULT_EPS,
) -> str:
    """Prototype usage of the teacher's embeddings on the data's held-out split, and the
    data's own reference: Definition 2.1 over K of those embeddings drawn at random
    (:func:`~protogmm.diagnostics.data_reference_curve`), what K prototypes lying on the
    data would count at each ε.

    The teacher embeds with its BatchNorm layers on batch statistics, as it does in training
    when its embeddings are fitted and turned into targets; its running statistics, which
    evaluation uses, lag behind early in a run (:mod:`protogmm.evaluation.features`).

    Args:
        module: the trained module.
        data: the data measured on.
        device: where the teacher runs (under torchrun each process embeds its shard).
        eps_values: the ε columns of the reference.
    """
    dataset = data.hparams.dataset
    _, test_loader = data.knn_dataloaders()
    embeddings, _ = module.to(device).teacher_embeddings(test_loader, sharded=True)
    module.cpu()
    accumulator = UsageAccumulator(module.hparams.num_prototypes)
    # The host's teacher temperature (CARP: its block softmax's), as the targets use it.
    tau = getattr(module.host, "teacher_temperature", None) or module.host.temperature
    # Decoupled: the mixture's own usage (its posterior), not the targets' softmax.
    measured = "mixture posterior" if module.gmm is not None else "softmax of scores / τ"
    with torch.no_grad():
        for chunk in embeddings.split(USAGE_CHUNK):
            if module.gmm is not None:
                probs = module.gmm.responsibilities(chunk)
            else:
                probs = torch.softmax(module.teacher_prototype_set()(chunk) / tau, dim=1)
            accumulator.update(probs)
    usage = accumulator.compute()
    usage_text = markdown_table(
        [
            f"usage on {dataset} ({measured})",
            "ever chosen",
            "effective number exp(H)",
            "mean sample H",
        ],
        [
            [
                "held-out split",
                f"{usage['ever_chosen']:.0f} / {usage['num_prototypes']:.0f}",
                f"{usage['effective_number']:.1f}",
                f"{usage['mean_sample_entropy']:.2f}",
            ]
        ],
    )
    reference, drawn = data_reference_curve(
        embeddings, module.hparams.num_prototypes, list(eps_values)
    )
    reference_text = markdown_table(
        ["reference: teacher embeddings drawn at random", "rows"]
        + [f"unique ε={eps:g}" for eps in eps_values],
        [
            ["held-out split", str(drawn)]
            + [f"{reference[eps]} ({100 * reference[eps] / drawn:.1f}%)" for eps in eps_values]
        ],
    )
    return usage_text + "\n\n" + reference_text
