"""MixtureOptions: OnlineGMM's options, typed for the parser, with OnlineGMM's defaults."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from protogmm.prototypes import Decoupled, MixtureOptions, OnlineGMM
from protogmm.training.module import PrototypicalSSL


def test_every_option_of_online_gmm_with_its_default() -> None:
    parameters = inspect.signature(OnlineGMM.__init__).parameters
    options = {field.name: field.default for field in dataclasses.fields(MixtureOptions)}
    assert set(options) == set(parameters) - {"self", "num_prototypes", "dim"}
    for name, default in options.items():
        if name == "anneal_steps":  # None: the trainer sets it from its schedule
            assert default is None and parameters[name].default == 1000
        else:
            assert parameters[name].default == default, name


def test_coerce_and_overrides() -> None:
    assert MixtureOptions.coerce(None) == MixtureOptions()
    options = MixtureOptions.coerce({"merge_overlap": None, "eta": 0.9})
    assert options.overrides() == {"merge_overlap": None, "eta": 0.9}
    assert MixtureOptions.coerce(options) is options
    assert "anneal_steps" not in MixtureOptions().gmm_kwargs()
    assert MixtureOptions(anneal_steps=5).gmm_kwargs()["anneal_steps"] == 5
    with pytest.raises(ValueError, match=r"model.gmm: unknown option\(s\) 'reseed_after'"):
        MixtureOptions.coerce({"reseed_after": 100})


def test_the_module_takes_options_or_a_mapping_and_saves_the_overrides() -> None:
    tiny = {"backbone_kwargs": {"width": 4}, "num_prototypes": 8, "hidden_dim": 8}
    by_options = PrototypicalSSL(
        prototypes=Decoupled(gmm=MixtureOptions(merge_overlap=None, seed=3)), **tiny
    )
    by_mapping = PrototypicalSSL(
        prototypes=Decoupled(gmm={"merge_overlap": None, "seed": 3}), **tiny
    )
    for model in (by_options, by_mapping):
        saved = model.hparams.prototypes["init_args"]["gmm"]
        assert saved == {"merge_overlap": None, "seed": 3}  # plain values
        assert model.gmm.merge_overlap is None
    # All defaults: nothing saved, as before.
    assert PrototypicalSSL(**tiny).hparams.prototypes["init_args"] == {}


def test_fit_lists_and_validates_the_options(tmp_path: Path) -> None:
    def fit(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "protogmm.cli", "fit", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=300,
        )

    help_text = fit("--model.prototypes.help", "Decoupled").stdout
    for field in dataclasses.fields(MixtureOptions):
        assert f"--model.prototypes.gmm.{field.name}" in help_text
    bad = fit("--model.prototypes.gmm.covariance", "spherical", "--trainer.max_epochs", "1")
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "gmm.covariance" in lines[0], bad.stderr
