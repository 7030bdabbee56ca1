"""``protogmm export``: the trained encoder and prototypes as safetensors files."""

from __future__ import annotations

from pathlib import Path

from protogmm.cli.command_line import CommandParser
from protogmm.training.checkpoints import load_module
from protogmm.training.export import export_module


def run_export(argv: list[str]) -> int:
    """``protogmm export CKPT --out FILE.safetensors``: the teacher backbone, loadable with
    ``strict=True`` by timm, torchvision or protogmm (the file's metadata says how), and
    ``FILE.prototypes.safetensors`` with the prototype sets for ``protogmm diagnose``."""
    parser = CommandParser(prog="protogmm export", description=run_export.__doc__)
    parser.add_argument("checkpoint", type=Path, help="a protogmm fit checkpoint")
    parser.add_argument("--out", type=Path, required=True, help="the backbone file, *.safetensors")
    args = parser.parse_args(argv)
    backbone, prototypes = export_module(load_module(args.checkpoint), args.out)
    print(f"backbone: {backbone}\nprototypes: {prototypes}")
    return 0
