"""First use of the `protogmm` command: what a newcomer types gets a run or one line.

Each test was red before its fix (the audit's finding is noted per test): null on the
command line for the mixture's options, short errors naming the full key, the config file
and nothing else, one-line errors from every command, and the names of each command's own
options and usage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from helpers import TINY_FIT, fit_error_line, run_cli
from protogmm.cli import COMMANDS, main
from protogmm.training.run_folder import LOCK_NAME

GMM = "--model.prototypes.gmm"


def printed_gmm(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    """The mixture's options of ``protogmm fit ARGS --print_config``, as parsed."""
    assert main(["fit", *args, "--print_config"]) == 0, capsys.readouterr().err
    config = yaml.safe_load(capsys.readouterr().out)
    return config["model"]["prototypes"]["init_args"]["gmm"]


def error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Every non-blank line the command wrote to stderr."""
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ------------------------------------------------------ 1: null for an Optional option
@pytest.mark.parametrize(
    ("args", "option"),
    [
        ([f"{GMM}.top_k", "null"], "top_k"),
        ([f"{GMM}.top_k=null"], "top_k"),
        ([f"{GMM}.top_k", "~"], "top_k"),
        ([f"{GMM}.mixing_eta", "0.9", f"{GMM}.mixing_eta", "null"], "mixing_eta"),
        ([f"{GMM}.merge_overlap", "null"], "merge_overlap"),
    ],
)
def test_null_on_the_command_line_sets_an_optional_mixture_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], option: str
) -> None:
    # Before: exit 2, "Parser key "gmm.top_k": Does not validate against any of the Union
    # subtypes" (jsonargparse re-parsed the null as the text "None").
    config = tmp_path / "config.yaml"
    config.write_text("model: {prototypes: {class_path: Decoupled, init_args: {gmm: {eta: 0.5}}}}")
    gmm = printed_gmm(capsys, "--config", str(config), *args)
    assert gmm[option] is None
    assert gmm["eta"] == 0.5  # the mixture's other options given stay


def test_top_k_null_trains_the_dense_update_and_fit_still_reports_its_devices(
    tmp_path: Path,
) -> None:
    # Before: refused at parse time (see above), so the dense update of the README and of
    # the resume hint for old checkpoints could not be asked for on the command line.
    run_dir = tmp_path / "run"
    result = run_cli(
        "fit",
        *TINY_FIT,
        "--data.num_local_crops=0",
        "--trainer.max_epochs=1",
        f"{GMM}.top_k",
        "null",
        f"--trainer.default_root_dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((run_dir / "summary.json").read_text())["gmm"]["top_k"] is None
    # Lightning's device lines come when training starts (item 4), its cloud tips never.
    assert "GPU available:" in result.stderr and "💡" not in result.stderr


def test_none_is_not_null_and_says_what_is_expected(capsys: pytest.CaptureFixture[str]) -> None:
    # Before: a message cut off after "Errors:", naming neither the type nor the value.
    assert main(["fit", f"{GMM}.top_k", "none", "--print_config"]) == 2
    assert error_lines(capsys) == [
        "protogmm fit: error: model.prototypes.gmm.top_k: expected an integer or null, got 'none'"
    ]


# -------------------------------------------------- 2: bad values name their full key
@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("eta", "5", "model.prototypes.gmm.eta must be in (0.0, 1.0], got 5.0"),
        ("eta", "-1", "model.prototypes.gmm.eta must be in (0.0, 1.0], got -1.0"),
        ("top_k", "0", "model.prototypes.gmm.top_k must be an integer >= 2, got 0"),
        ("chunk_size", "0", "model.prototypes.gmm.chunk_size must be an integer >= 1, got 0"),
        ("merge_overlap", "2", "model.prototypes.gmm.merge_overlap must be in (0.0, 1.0], got 2.0"),
        ("var_floor", "-1", "model.prototypes.gmm.var_floor must be in (0.0, inf], got -1.0"),
    ],
)
def test_a_bad_mixture_option_is_one_short_line_naming_its_full_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, expected: str
) -> None:
    # Before: ~1000 characters, "Does not validate against any of the Union subtypes ...",
    # every setting of the class, and the option named bare ("eta must be in ...").
    run_dir = tmp_path / "run"
    args = [f"{GMM}.{option}", value, f"--trainer.default_root_dir={run_dir}"]
    assert main(["fit", *args]) == 2
    assert error_lines(capsys) == [f"protogmm fit: error: {expected}"]
    assert not run_dir.exists()


# ------------------------------------------------------- 3: a config file is named
@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("garbage\n", "expected a YAML mapping of keys"),
        ("- 1\n- 2\n", "expected a YAML mapping of keys"),
        ("trainer: [\n", "not valid YAML"),
    ],
)
def test_a_config_file_that_is_not_a_mapping_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, problem: str
) -> None:
    # Before: "Unexpected config: garbage", without the file's name.
    config = tmp_path / "notes.txt"
    config.write_text(text)
    assert main(["fit", "--config", str(config)]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"protogmm fit: error: --config {config}: ")
    assert problem in lines[0]


# ------------------------------- 4: an error after the trainer is built is the only line
@pytest.mark.parametrize("damage", ["not a checkpoint", "truncated"])
def test_a_bad_checkpoint_is_the_only_line_on_stderr(
    tmp_path: Path, tiny_run: Callable[[str], Path], damage: str
) -> None:
    # Before: Lightning's "GPU available", "TPU available" and "💡 Tip" lines came first.
    checkpoint = tmp_path / "bad.ckpt"
    if damage == "truncated":
        last = (tiny_run("decoupled") / "checkpoints" / "last.ckpt").read_bytes()
        checkpoint.write_bytes(last[: len(last) // 2])
    else:
        checkpoint.write_text("garbage\n")
    line = fit_error_line(tmp_path, *TINY_FIT, f"--ckpt_path={checkpoint}")
    assert line.startswith("protogmm fit: error: ") and str(checkpoint) in line


# ---------------------------- 5, 6: every command's parse error is one line, no usage
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["demo", "--quick", "--bogus"], "protogmm demo: error: unrecognized arguments: --bogus"),
        (["compare"], "protogmm compare: error: the following arguments are required: runs"),
        (
            ["export", "x.ckpt"],
            "protogmm export: error: the following arguments are required: --out",
        ),
        (
            ["frobnicate"],
            f"protogmm: error: unknown command 'frobnicate' (choose from {', '.join(COMMANDS)})",
        ),
    ],
)
def test_a_bad_command_line_is_one_line_without_the_usage(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    # Before: argparse's usage block first (2-4 lines); for an unknown command the whole
    # help on stdout and a line without the "protogmm:" prefix.
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if line.strip()] == [expected]
    assert captured.out == ""


def test_protogmm_alone_prints_the_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing ran: the help on stdout, exit 2 (argparse's status for a missing command), so
    # a script with an empty command does not pass; --help itself is 0.
    assert main([]) == 2
    captured = capsys.readouterr()
    assert "protogmm fit --config FILE" in captured.out and captured.err == ""
    assert main(["--help"]) == 0


# -------------------------------- 7: a refused demo names the demo's own options
def test_a_demo_into_a_folder_holding_a_demo_names_the_demo_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: "... resume it (--ckpt_path ...), write elsewhere (--trainer.default_root_dir),
    # or replace it (--overwrite true)": fit's options, which demo does not take.
    out = tmp_path / "demo"
    (out / "joint").mkdir(parents=True)
    (out / "joint" / "summary.json").write_text("{}")
    assert main(["demo", "--quick", "--out", str(out)]) == 2
    assert error_lines(capsys) == [
        f"protogmm demo: error: run folder {out / 'joint'} holds a run already: write "
        "elsewhere (--out) or replace it (--overwrite)"
    ]
    assert (out / "joint" / "summary.json").read_text() == "{}"
    # A folder in use by another run (here: this process) names --out too.
    busy = tmp_path / "busy"
    (busy / "joint").mkdir(parents=True)
    (busy / "joint" / LOCK_NAME).write_text(f"{os.uname().nodename} {os.getpid()}\n")
    assert main(["demo", "--quick", "--out", str(busy)]) == 2
    (line,) = error_lines(capsys)
    assert "write elsewhere (--out)" in line and "default_root_dir" not in line


# --------------------------------------------------- 9: fit's usage names the command
def test_fit_help_names_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    # Before: "usage: protogmm [-c CONFIG] ..." (the program's name without the command).
    assert main(["fit", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: protogmm fit [-c CONFIG]")


# ------------------------------------------- --print_config checks the values it prints
def test_print_config_refuses_a_value_out_of_range_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    root = f"--trainer.default_root_dir={run_dir}"
    assert main(["fit", f"{GMM}.eta", "5", root, "--print_config"]) == 2
    assert error_lines(capsys) == [
        "protogmm fit: error: model.prototypes.gmm.eta must be in (0.0, 1.0], got 5.0"
    ]
    assert capsys.readouterr().out == ""
    assert main(["fit", f"{GMM}.eta", "5", root, "--print_config=skip_null"]) == 2
    assert len(error_lines(capsys)) == 1
    assert main(["fit", f"{GMM}.eta", "0.5", root, "--print_config"]) == 0
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["model"]["prototypes"]["init_args"]["gmm"]["eta"] == 0.5
    assert captured.err.strip() == ""  # no banner: no trainer is built to check
    assert not run_dir.exists()


def test_a_trainer_built_for_the_demo_holds_lightnings_lines_until_training_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from protogmm.training.runner import TrainingStartLines, build_trainer

    with caplog.at_level("INFO", logger="lightning.pytorch.utilities.rank_zero"):
        trainer = build_trainer(tmp_path / "run", max_epochs=1, enable_progress_bar=False)
    assert not [r for r in caplog.records if "available" in r.getMessage()]
    banner = next(c for c in trainer.callbacks if isinstance(c, TrainingStartLines))
    with caplog.at_level("INFO", logger="lightning.pytorch.utilities.rank_zero"):
        banner.on_train_start(trainer, None)  # type: ignore[arg-type]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("GPU available:") for m in messages)
    assert not any(m.startswith("💡") for m in messages)
