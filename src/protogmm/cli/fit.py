"""``protogmm fit``: pretraining with LightningCLI (YAML configs, dotted overrides, resume).

Its command line is rewritten and its errors made one line by
:mod:`protogmm.cli.command_line`.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from protogmm.cli.command_line import (
    _CLASS_OPTIONS,
    ConfigError,
    _check_config_files,
    _class_names,
    _nested_nulls,
    _one_line,
)
from protogmm.cli.legacy_data import PARSER_MODE, upgrade_data_argv
from protogmm.training.datamodule import SSLDataModule
from protogmm.training.distributed import check_launch
from protogmm.training.module import PrototypicalSSL
from protogmm.training.reliability import NonFiniteError, check_resume_compatible
from protogmm.training.run_folder import claim_run_folder, resolve_checkpoint
from protogmm.training.run_logger import run_loggers
from protogmm.training.runner import TrainingStartLines, run_callbacks, with_atomic_checkpoints

#: The shipped YAML configs; ``default.yaml`` is every fit's first config file.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ProtoCLI(LightningCLI):
    """LightningCLI with the data's image geometry linked into the model and our run layout."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        """The model's image geometry from the data module, and the fit-only options.

        Args:
            parser: LightningCLI's parser (jsonargparse).
        """
        parser.link_arguments("data.in_channels", "model.in_channels", apply_on="instantiate")
        parser.link_arguments("data.image_size", "model.image_size", apply_on="instantiate")
        parser.add_argument(
            "--ckpt_path",
            type=Optional[str],  # noqa: UP045 (jsonargparse needs a typing object)
            default=None,
            help="checkpoint to resume from (e.g. RUN/checkpoints/last.ckpt)",
        )
        parser.add_argument(
            "--overwrite",
            type=bool,
            default=False,
            help="replace the run the folder holds (its files are removed first); without it "
            "a fit into a folder holding another run is refused",
        )
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int,
            default=0,
            help="also write last.ckpt every N steps (0: at epoch ends only); resumes exactly",
        )
        parser.add_argument(
            "--on_nonfinite",
            type=Literal["stop", "skip"],
            default="stop",
            help="a non-finite input batch or loss stops the run (default) or skips the step",
        )
        parser.add_argument(
            "--knn_every_n_epochs",
            type=int,
            default=1,
            help="the k-NN monitor's period in epochs (its bank: data.knn.train_samples)",
        )
        parser.add_argument(
            "--baseline_memory_mb",
            type=float,
            default=2048.0,
            help="the untrained-encoder and raw-pixel k-NN baselines run only if their "
            "features over the k-NN bank fit this many MB (else one log line says so)",
        )
        parser.add_argument(
            "--logger",
            type=Literal["csv", "tensorboard", "both"],
            default="csv",
            help="where the metrics go: metrics.csv in the run folder (default), TensorBoard "
            "event files in RUN/tensorboard/, or both (`protogmm compare` reads either)",
        )
        parser.add_argument(
            "--dense_every_n_steps",
            type=int,
            default=10,
            help="the collapse monitor's period in its first epoch (times ceil(K / 4096))",
        )

    def before_instantiate_classes(self) -> None:
        """Check the launch layout and point the default logger at the run directory."""
        trainer = self.config.trainer
        # Under torchrun the process layout must match the launcher's (one line if not).
        trainer.devices = check_launch(trainer.devices, trainer.num_nodes, trainer.accelerator)
        if trainer.logger in (None, True):
            # metrics.csv directly in the run directory (see training/runner.py)
            run_dir = trainer.default_root_dir or "runs/default"
            trainer.default_root_dir = run_dir
            trainer.logger = run_loggers(run_dir, self.config.logger)

    def instantiate_classes(self) -> None:
        """Build model, data and trainer; a class option's bad value is its own one line.

        Raises:
            ConfigError: an option of the host or the prototype kind out of its range,
                named by its full key (``model.prototypes.gmm.eta must be in ...``).
        """
        try:
            super().instantiate_classes()
        except ValueError:
            # jsonargparse reports a bad value of a class option as "Does not validate
            # against any of the Union subtypes" with every setting of the class, naming a
            # mixture option bare (``eta``); built by its own class, the option names its
            # full key, its range and the value in one line.
            _build_class_options(self.config)
            raise

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The trainer with the run's callbacks and atomic checkpoint writes.

        Args:
            **kwargs: LightningCLI's trainer arguments.
        """
        # The run's callbacks depend on fit options; checkpoints are written atomically.
        banner = TrainingStartLines()
        self.trainer_defaults["callbacks"] = [
            *run_callbacks(
                **{
                    name: self.config[name]
                    for name in inspect.signature(run_callbacks).parameters
                    if name in self.config
                }
            ),
            banner,
        ]
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins")
        kwargs["plugins"] = with_atomic_checkpoints(plugins)
        with banner.holding():
            return super().instantiate_trainer(**kwargs)


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """Silence a logger's INFO lines (e.g. "Seed set to 0") while the CLI builds the run."""
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _build_class_options(config: Namespace) -> None:
    """Build the host and the prototype kind from their options.

    Raises:
        ConfigError: an option out of its range, named by its full key, on one line.
    """
    for option, base in _CLASS_OPTIONS.items():
        value = config.get(option)
        if isinstance(value, Namespace):
            try:
                with warnings.catch_warnings():  # the model's own build warns
                    warnings.simplefilter("ignore")
                    base.build(value.as_dict(), option)
            except ValueError as error:
                raise ConfigError(" ".join(str(error).split())) from None


class _ConfigCheckCLI(ProtoCLI):
    """Builds the host and the prototype kind only: what ``--print_config`` checks before
    printing (the parser checks types, not ranges). Not the data module, which looks for its
    files, nor the trainer, which looks for its devices: a cluster's recipe printed on a
    laptop has neither."""

    def before_instantiate_classes(self) -> None:
        """No launch layout to check and no logger: nothing runs."""

    def instantiate_classes(self) -> None:
        """The host and the prototype kind alone, from their options: the data module would
        look for its files, which need not be on the machine that prints the config."""
        _build_class_options(self.config)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """No trainer."""
        return None


def _build_cli(args: list[str], cli_class: type[ProtoCLI] = ProtoCLI) -> ProtoCLI | None:
    """Parse and build model, data and trainer; None after ``--help`` / ``--print_config``.

    Raises:
        ConfigError: the parser's or Lightning's complaint, on one line.
    """
    captured = io.StringIO()
    try:
        # Parsing and building print argparse's usage on error; keep only its message.
        seed_logger = logging.getLogger("lightning.fabric.utilities.seed")
        with contextlib.redirect_stderr(captured), _quiet(seed_logger):
            return cli_class(
                PrototypicalSSL,
                SSLDataModule,
                args=args,
                run=False,
                trainer_defaults={
                    "callbacks": [],  # set from the fit options in ProtoCLI.instantiate_trainer
                    "default_root_dir": "runs/default",
                    "log_every_n_steps": 1,
                    "num_sanity_val_steps": 0,
                },
                save_config_kwargs={"overwrite": True},
                seed_everything_default=0,
                parser_kwargs={
                    "prog": "protogmm fit",  # else the usage says "protogmm" (sys.argv[0])
                    "default_config_files": [str(CONFIG_DIR / "default.yaml")],
                    # YAML with the flat data keys of earlier configs moved into their groups
                    "parser_mode": PARSER_MODE,
                },
            )
    except SystemExit as exit_:
        if exit_.code in (0, None):  # --help / --print_config
            sys.stdout.write(captured.getvalue())
            return None
        raise ConfigError(_one_line(captured.getvalue())) from None
    except MisconfigurationException as error:  # e.g. more GPUs asked for than present
        raise ConfigError(" ".join(str(error).split())) from None


def run_fit(args: list[str]) -> int:
    """``protogmm fit``: parse and build with LightningCLI, then fit (resuming if asked).

    Args:
        args: the command line after ``fit``.

    Returns:
        0, or 3 when the non-finite guard stopped the run (its message on stderr).

    Raises:
        ConfigError: a bad command line or configuration (one line), before any step.
    """
    _check_config_files(args)
    # The flat --data.* keys of before the groups (documented commands, old scripts) still run.
    args = upgrade_data_argv(_nested_nulls(_class_names(args)))
    # (jsonargparse takes the flag's value only as ``--print_config=VALUE``.)
    printing = [arg for arg in args if arg.split("=", 1)[0] == "--print_config"]
    if printing and "--help" not in args and "-h" not in args:
        # jsonargparse prints before any class is built, so a value out of range would
        # print as if fine: build the host and the prototype kind first (nothing written).
        _build_cli([arg for arg in args if arg not in printing], _ConfigCheckCLI)
    cli = _build_cli(args)
    if cli is None:
        return 0
    run_dir = Path(cli.trainer.default_root_dir)
    ckpt_path = resolve_checkpoint(cli.config.ckpt_path, run_dir)
    if ckpt_path is not None and ckpt_path not in ("hpc", "registry"):
        # Before any process starts or any step runs: a checkpoint of another configuration
        # or process layout is a one-line error; other differences are one warning line.
        notes = check_resume_compatible(
            ckpt_path,
            cli.model.hparams,
            cli.datamodule.hparams,
            cli.trainer.world_size,
            trainer=cli.trainer,
        )
        if notes and rank_zero_only.rank == 0:
            print(
                "protogmm fit: resuming with changed settings, not an exact continuation: "
                + "; ".join(notes),
                file=sys.stderr,
            )
    lock = None
    if rank_zero_only.rank == 0:  # the other ranks write into the folder rank 0 claimed
        lock = claim_run_folder(run_dir, ckpt_path, overwrite=cli.config.overwrite)
    # Lightning's own launcher (--trainer.devices N without torchrun) starts the other ranks
    # by re-running this command line; main() shortened sys.argv, so give it back whole.
    sys.argv = [sys.argv[0], "fit", *args]
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    except NonFiniteError as error:
        rank = f" (rank {cli.trainer.global_rank})" if cli.trainer.world_size > 1 else ""
        print(f"protogmm fit{rank}: stopped: {error}", file=sys.stderr)
        return 3
    finally:
        if lock is not None:
            lock.release()
    return 0
