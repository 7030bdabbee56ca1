"""The ``protogmm`` command.

``protogmm fit --config FILE [--section.key value ...]``
    Pretrain with LightningCLI (YAML configs, dotted overrides, ``--ckpt_path`` to resume);
    multi-process with ``--trainer.devices N --trainer.strategy ddp`` or under ``torchrun``.
``protogmm demo [--quick] [--host dino|ibot|carp]``
    Joint vs decoupled prototypes of one host side by side on the embedded data: one table
    and one plot.
``protogmm diagnose CKPT [--eps ...] [--out DIR] [--data NAME|checkpoint] [--data.KEY VALUE ...]``
    Unique prototypes (Definition 2.1) over an ε sweep, usage, geometry plots; also for
    DINO / iBOT / DINOv2 checkpoints.
``protogmm eval knn|linear CKPT [--data NAME|checkpoint] [--data.KEY VALUE ...]``
    Frozen-encoder k-NN or linear probe, beside the untrained encoder and raw pixels.
``protogmm compare RUN_DIR...``
    One table and overlaid collapse-over-training plots across runs.
``protogmm export CKPT --out FILE.safetensors``
    The teacher backbone for timm / torchvision / protogmm (``strict=True``), and the
    prototype sets (``FILE.prototypes.safetensors``) for ``diagnose``.

``--data.KEY VALUE`` are ``fit``'s data arguments (``SSLDataModule``'s), in every command.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable

from protogmm.cli.compare import read_run, run_compare
from protogmm.cli.data_arguments import DataArguments
from protogmm.cli.demo import HOST_PRESETS, demo_settings, run_demo
from protogmm.cli.diagnose import long_tail_text, run_diagnose, usage_table
from protogmm.cli.evaluate import run_eval
from protogmm.cli.export import run_export
from protogmm.cli.fit import CONFIG_DIR, ConfigError, ProtoCLI, run_fit
from protogmm.reports import demo_table

__all__ = [
    "COMMANDS",
    "CONFIG_DIR",
    "HOST_PRESETS",
    "ConfigError",
    "DataArguments",
    "ProtoCLI",
    "demo_settings",
    "demo_table",
    "long_tail_text",
    "main",
    "read_run",
    "run_compare",
    "run_demo",
    "run_diagnose",
    "run_eval",
    "run_export",
    "run_fit",
    "usage_table",
]

COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "fit": run_fit,
    "demo": run_demo,
    "diagnose": run_diagnose,
    "eval": run_eval,
    "compare": run_compare,
    "export": run_export,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``protogmm`` console script.

    Args:
        argv: the command line after ``protogmm`` (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, 2 for a bad command line, configuration or file (one line on
        stderr), or the command's own (``fit``: 3 when the non-finite guard stopped it).
        Without a command: the help on stdout, and 2 (nothing ran; 0 for ``--help``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(
            f"protogmm: error: unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})",
            file=sys.stderr,
        )
        return 2
    sys.argv = sys.argv[:1]  # the sub-command parsers get argv explicitly
    # Lightning's pytree helper builds torch's LeafSpec, which this torch marks deprecated:
    # a line about Lightning's internals in every run that no user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ValueError, OSError) as error:
        # Bad configuration values (the bricks' one-line ValueErrors name the key and value),
        # before any training starts; a file-system error (disk full, permission denied,
        # read-only) names its file. PROTOGMM_DEBUG=1 shows the traceback.
        if os.environ.get("PROTOGMM_DEBUG"):
            raise
        print(f"protogmm {argv[0]}: error: {_error_line(error)}", file=sys.stderr)
        return 2


def _error_line(error: Exception) -> str:
    """One line for an error: an OSError's file and reason, or the (one-line) message."""
    if isinstance(error, OSError) and error.filename is not None:
        return f"{os.fsdecode(error.filename)}: {error.strerror or type(error).__name__}"
    return " ".join(str(error).split())
