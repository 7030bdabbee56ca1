"""The host configs, `protogmm fit` with them, and `protogmm demo --host`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from helpers import run_cli
from protogmm import cli
from protogmm.cli import CONFIG_DIR, HOST_PRESETS, main
from protogmm.training.module import PrototypicalSSL

HOST_CONFIGS = [
    (host, kind) for host in ("dino", "ibot", "carp") for kind in ("joint", "decoupled")
]


def model_section(name: str) -> dict:
    return yaml.safe_load((CONFIG_DIR / name).read_text())["model"]


@pytest.mark.parametrize(("host", "kind"), HOST_CONFIGS)
def test_each_host_config_builds_its_model_and_matches_the_demo_preset(
    host: str, kind: str
) -> None:
    config = model_section(f"{host}_{kind}_mnist5k.yaml")
    merged = model_section("default.yaml") | config | {"in_channels": 1, "image_size": 28}
    model = PrototypicalSSL.from_hparams(merged)
    assert model.host.name == host and model.kind.name == kind
    assert (model.gmm is None) == (kind == "joint")
    # The demo and the config train the same model: same host class, same backbone.
    preset = PrototypicalSSL(
        **(HOST_PRESETS[host] | {"prototypes": kind, "in_channels": 1, "image_size": 28})
    )
    assert type(preset.host) is type(model.host)
    for key in ("backbone", "backbone_kwargs"):
        assert preset.hparams[key] == model.hparams[key], key


def test_fit_with_the_ibot_config_runs(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        "fit",
        "--config",
        str(CONFIG_DIR / "ibot_decoupled_mnist5k.yaml"),
        "--data.dataset",
        "synthetic",
        "--data.synthetic.samples",
        "32",
        "--data.batch_size",
        "16",
        "--model.num_prototypes",
        "16",
        "--model.hidden_dim",
        "16",
        "--model.bottleneck_dim",
        "8",
        "--model.backbone_kwargs",
        "{embed_dim: 16, depth: 1, num_heads: 2}",
        "--trainer.max_epochs",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(run_dir),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = (run_dir / "config.yaml").read_text()
    assert "class_path: protogmm.hosts.IBOT" in config and "mask_ratio:" in config
    assert "train/patch_loss" in (run_dir / "metrics.csv").read_text().splitlines()[0]


@pytest.mark.parametrize(
    ("args", "culprit"),
    [
        (["--model.host", "IBOT"], "model.host"),  # the default ConvNet has no patch tokens
        (["--model.host", "ibot"], "model.host"),  # the short name of before the classes
        (
            [
                "--model.backbone",
                "vit",
                "--model.host",
                "IBOT",
                "--model.host.mask_ratio",
                "[0.2, 1.0]",
            ],
            "model.host.mask_ratio",
        ),
        # a flat option of before the classes: where it went
        (["--model.ibot_mask_ratio", "[0.2, 1.0]"], "moved to model.host.mask_ratio"),
        (["--model.host", "SwAV"], "model.host: expected a class (CARP, DINO, IBOT"),
    ],
)  # (the other host options' errors are tested in-process in test_hosts.py)
def test_bad_host_options_are_one_line_errors_before_training(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    culprit: str,
) -> None:
    # In this process (parsing fails before anything runs); a child process per case cost
    # 5 s each. test_cli.py checks the same one-line path in a child process.
    monkeypatch.setattr(sys, "argv", ["protogmm"])
    run_dir = tmp_path / "run"
    assert main(["fit", *args, f"--trainer.default_root_dir={run_dir}"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and culprit in lines[0], lines
    assert not (run_dir / "metrics.csv").exists()


@pytest.mark.slow  # two short ViT runs with the k-NN monitor on MNIST-5k (~1 minute)
def test_demo_runs_the_chosen_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        cli,
        "demo_settings",
        lambda quick: {
            "max_epochs": 1,
            "data": {"max_train_samples": 64, "num_local_crops": 2, "batch_size": 32},
        },
    )
    out = tmp_path / "demo"
    code = main(["demo", "--host", "ibot", "--quick", "--out", str(out), "--num-prototypes", "64"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "ibot, joint prototypes" in printed and "| decoupled |" in printed
    assert (out / "collapse_over_training.png").exists()
    assert '"backbone": "vit"' in (out / "joint" / "summary.json").read_text()


@pytest.mark.parametrize("kind", ["joint", "decoupled"])
def test_the_long_horizon_configs_match_the_benchmark_that_measured_them(kind: str) -> None:
    from benchmarks.decoupling import ABLATIONS

    config = yaml.safe_load((CONFIG_DIR / f"dino_{kind}_mnist5k_long.yaml").read_text())
    # The budget of the BENCHMARKS.md section: 16 epochs, batch 32, K = 4096.
    assert config["trainer"]["max_epochs"] == 16 and config["data"]["batch_size"] == 32
    assert config["model"]["num_prototypes"] == 4096
    assert config["model"]["prototypes"]["class_path"] == kind.capitalize()
    if kind == "decoupled":
        # Measured as the section's "decoupled" row, i.e. with split and merge on (the
        # default), which the "no split and merge" row turns off.
        plain = ABLATIONS["no split and merge (plain online EM)"]["gmm"]
        assert plain == {"merge_overlap": None, "reseed_min_share": None}
        assert not set(plain) & set(config["model"]["prototypes"]["init_args"]["gmm"])
    merged = model_section("default.yaml") | config["model"]
    model = PrototypicalSSL.from_hparams(merged | {"in_channels": 1, "image_size": 28})
    assert (model.gmm is None) == (kind == "joint")
    if kind == "decoupled":
        assert model.gmm.merge_overlap == 0.5 and model.gmm.num_prototypes == 4096
