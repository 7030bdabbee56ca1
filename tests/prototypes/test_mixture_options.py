"""MixtureOptions: OnlineGMM's options, typed for the parser, with OnlineGMM's defaults."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from protogmm.prototypes import Decoupled, MixtureOptions, OnlineGMM
from protogmm.training.module import PrototypicalSSL


def test_online_gmm_takes_the_options_and_reports_them_as_its_settings() -> None:
    options = {field.name: field.default for field in dataclasses.fields(MixtureOptions)}
    assert set(OnlineGMM.SETTINGS) == set(options)
    defaults = OnlineGMM(4, 3).settings()
    for name, default in options.items():
        if name == "anneal_steps":  # None: the trainer sets it; alone, a mixture takes 1000
            assert default is None and defaults[name] == 1000
        else:
            assert defaults[name] == default, name
    by_options = OnlineGMM(4, 3, MixtureOptions(eta=0.9, top_k=2))
    by_keywords = OnlineGMM(4, 3, eta=0.9, top_k=2)
    over = OnlineGMM(4, 3, MixtureOptions(eta=0.5, top_k=2), eta=0.9)  # keywords win
    assert by_options.settings() == by_keywords.settings() == over.settings()
    assert OnlineGMM(4, 3, forgetting="none").mixing_eta == 1.0  # resolved, as before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"etaa": 0.9}, r"OnlineGMM: unknown option\(s\) 'etaa'; it takes covariance"),
        ({"eta": 1.5}, r"^eta must be in \(0.0, 1.0\], got 1.5$"),
        ({"covariance": "full"}, r"^covariance must be one of"),
        ({"top_k": 1}, r"^top_k must be"),
        ({"merge_overlap": 0.0}, r"^merge_overlap must be in \(0.0, 1.0\]"),
        ({"center_momentum": 1.0}, r"^center_momentum must be in \[0.0, 1.0\)"),
        ({"anneal_steps": -1}, r"^anneal_steps must be"),
    ],
)
def test_a_bad_option_is_one_line_naming_it(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OnlineGMM(4, 3, **options)
    if "etaa" not in options:  # the options themselves are checked where they are made
        with pytest.raises(ValueError, match=message):
            MixtureOptions(**options)
        with pytest.raises(ValueError, match=r"^model\.prototypes\.gmm\." + message[1:]):
            Decoupled(gmm=options)


def test_coerce_and_overrides() -> None:
    assert MixtureOptions.coerce(None) == MixtureOptions()
    options = MixtureOptions.coerce({"merge_overlap": None, "eta": 0.9})
    assert options.overrides() == {"merge_overlap": None, "eta": 0.9}
    assert MixtureOptions.coerce(options) is options
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
        assert saved == {"merge_overlap": None, "seed": 3, "top_k": 8}  # plain values
        assert model.gmm.merge_overlap is None
    # All defaults: only top_k, whose default changed (a checkpoint without it was dense).
    assert PrototypicalSSL(**tiny).hparams.prototypes["init_args"] == {"gmm": {"top_k": 8}}


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
