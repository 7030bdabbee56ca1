"""Checkpoints of the flat layouts (before the host and prototype-kind classes, and before
the data module's option groups) still load, compare and resume.

Until issue 18 every option sat directly under ``model`` (``host: ibot``,
``ibot_patch_weight``, ``koleo_weight``) and the host's objectives were the module's own
(``objective.center``). Such a file is built here from today's module by undoing both, then
read back with ``load_module``. Likewise every data option sat directly under ``data``
(``synthetic_samples``, ``knn_train_samples``): today's checkpoint is flattened back.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from helpers import TINY_FIT, TINY_MODEL, TINY_VIT, tiny_data
from protogmm.cli import main
from protogmm.hosts import CARP, IBOT
from protogmm.prototypes import Decoupled, Joint
from protogmm.training.checkpoints import load_module
from protogmm.training.data_settings import DATA_GROUPS
from protogmm.training.datamodule import datamodule_from_checkpoint
from protogmm.training.legacy_hparams import (
    MOVED_DATA_KEYS,
    checkpoint_model_hparams,
    moved_option_hint,
    upgrade_data_hparams,
    upgrade_model_hparams,
)
from protogmm.training.module import PrototypicalSSL
from protogmm.training.resume_check import check_resume_compatible, comparable_settings

#: The tiny iBOT model in the flat layout, as a checkpoint of before the classes held it:
#: every option, those of other hosts and kinds included (they had no effect).
FLAT_IBOT = (
    TINY_MODEL
    | TINY_VIT
    | {
        "host": "ibot",
        "prototypes": "joint",
        "ibot_patch_weight": 0.5,
        "ibot_mask_probability": 1.0,
        "koleo_weight": 0.1,
        "teacher_temperature": 0.07,
        "carp_block_size": 128,
        "gmm": None,
        "targets": "host",
    }
)


def old_checkpoint(path: Path, flat: dict, module: PrototypicalSSL) -> Path:
    """``module``'s weights under the old names, with ``flat`` as its hyperparameters."""
    state = {key.removeprefix("host."): value.clone() for key, value in module.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": flat}, path)
    return path


def test_a_flat_checkpoint_loads_into_the_classes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = PrototypicalSSL.from_hparams(FLAT_IBOT)
    with torch.no_grad():
        module.host.objective.center.fill_(0.25)  # a trained centre, not the initial zeros
    path = old_checkpoint(tmp_path / "old.ckpt", FLAT_IBOT, module)
    assert "objective.center" in torch.load(path, weights_only=True)["state_dict"]

    loaded = load_module(path)
    assert isinstance(loaded.host, IBOT) and isinstance(loaded.kind, Joint)
    assert (loaded.host.patch_weight, loaded.host.mask_probability) == (0.5, 1.0)
    assert loaded.host.teacher_temperature == 0.07 and loaded.kind.koleo_weight == 0.1
    assert torch.equal(loaded.host.objective.center, module.host.objective.center)
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_upgrade_keeps_only_the_options_of_the_chosen_classes() -> None:
    upgraded = upgrade_model_hparams(FLAT_IBOT)
    assert upgraded["host"] == {
        "class_path": "protogmm.hosts.IBOT",
        "init_args": {
            "patch_weight": 0.5,
            "mask_probability": 1.0,
            "teacher_temperature": 0.07,
        },
    }
    assert upgraded["prototypes"] == {
        "class_path": "protogmm.prototypes.Joint",
        "init_args": {"koleo_weight": 0.1},
    }
    assert not {"carp_block_size", "gmm", "targets", "koleo_weight"} & set(upgraded)
    assert upgrade_model_hparams(upgraded) == upgraded  # today's layout: unchanged
    carp = upgrade_model_hparams({"host": "carp", "carp_block_size": 8, "gmm": {"eta": 0.9}})
    assert carp["host"]["init_args"] == {"block_size": 8}
    assert carp["prototypes"]["init_args"] == {"gmm": {"eta": 0.9}}


@pytest.mark.parametrize(
    ("host", "kind"), [(CARP(block_size=8), Decoupled(anneal_fraction=0.2)), (IBOT(), Joint())]
)
def test_todays_spec_rebuilds_the_same_classes(host: object, kind: object) -> None:
    model = TINY_MODEL | (TINY_VIT if isinstance(host, IBOT) else {})
    module = PrototypicalSSL(**model, host=host, prototypes=kind)
    again = PrototypicalSSL(**dict(module.hparams))  # the checkpoint's plain values
    assert again.hparams == module.hparams
    assert type(again.host) is type(host) and again.host.init_args() == host.init_args()
    # One host object given to two runs is not shared: its objectives hold per-run state.
    twin = PrototypicalSSL(**model, host=host, prototypes=kind)
    assert twin.host is not module.host and twin.host.objective is not module.host.objective


def test_a_moved_option_names_its_new_place() -> None:
    assert moved_option_hint("ibot_patch_weight") == (
        "model.ibot_patch_weight moved to model.host.patch_weight (with model.host IBOT)"
    )
    assert "model.host.seed (with model.host IBOT or CARP)" in moved_option_hint("host_seed")
    assert moved_option_hint("lr") is None


# ---------------------------------------------------------------------- the data settings
def flat_data(grouped: dict) -> dict:
    """A data module's hyperparameters as checkpoints held them before the groups."""
    flat = {key: value for key, value in grouped.items() if key not in DATA_GROUPS}
    for old, (group, option) in MOVED_DATA_KEYS.items():
        flat[old] = grouped[group][option]
    return flat


def test_upgrade_moves_the_flat_data_keys_into_their_groups() -> None:
    old = {"batch_size": 8, "synthetic_samples": 64, "knn_test_samples": 10, "scan_images": True}
    assert upgrade_data_hparams(old) == {
        "batch_size": 8,
        "synthetic": {"samples": 64},
        "knn": {"test_samples": 10},
        "images": {"scan": True},
    }
    today = {"batch_size": 8, "synthetic": {"samples": 64}}
    assert upgrade_data_hparams(today) == today
    # A group given beside a flat key of its own: the group's option wins.
    both = {"synthetic_samples": 64, "synthetic_classes": 4, "synthetic": {"samples": 32}}
    assert upgrade_data_hparams(both) == {"synthetic": {"classes": 4, "samples": 32}}
    assert set(MOVED_DATA_KEYS) <= set(flat_data(dict(tiny_data().hparams)))


def test_a_flat_data_checkpoint_loads_compares_and_resumes(
    tmp_path: Path, tiny_run: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    source = tiny_run("decoupled") / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(source, weights_only=True)
    grouped = dict(checkpoint["datamodule_hyper_parameters"])
    assert grouped["synthetic"] == {
        "samples": 64,
        "classes": 10,
        "image_size": 16,
        "imbalance_ratio": 1.0,
    }
    checkpoint["datamodule_hyper_parameters"] = flat_data(grouped)
    path = tmp_path / "flat-data.ckpt"
    torch.save(checkpoint, path)

    # Loads: the same data module as from today's layout.
    loaded = datamodule_from_checkpoint(path)
    assert dict(loaded.hparams) == dict(datamodule_from_checkpoint(source).hparams)
    assert loaded.synthetic.samples == 64 and loaded.knn.train_samples == 20000
    overridden = datamodule_from_checkpoint(path, knn={"test_samples": 7})
    assert (overridden.knn.train_samples, overridden.knn.test_samples) == (20000, 7)

    # Compares: equal to today's layout, a changed option named by its grouped key.
    model = checkpoint["hyper_parameters"]
    assert check_resume_compatible(path, model, grouped, world_size=1) == []
    changed = grouped | {"knn": grouped["knn"] | {"train_samples": 40}}
    notes = check_resume_compatible(path, model, changed, world_size=1)
    assert notes == ["data.knn.train_samples: 20000 -> 40"]
    merged_flat, merged = model | flat_data(grouped), model | grouped  # hparams.yaml: both
    assert comparable_settings(merged_flat) == comparable_settings(merged)
    assert comparable_settings(merged)["synthetic.samples"] == 64

    # Resumes through the command line with no note of changed data settings (the trainer's
    # differ: the tiny run was not made by `fit`, and this resume trains a second epoch;
    # nor did it clip gradients, which fit's defaults do).
    run_dir = tmp_path / "run"
    args = [*TINY_FIT, "--data.num_local_crops=0", "--trainer.max_epochs=2"]
    args += ["--model.clip_grad=null"]
    args += [f"--trainer.default_root_dir={run_dir}", f"--ckpt_path={path}"]
    assert main(["fit", *args]) == 0
    warning = capsys.readouterr().err
    assert "changed settings" in warning and "trainer.max_epochs: 1 -> 2" in warning
    assert "data." not in warning and "model." not in warning.replace("model.schedule_steps", "")
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 8
    assert resumed["datamodule_hyper_parameters"]["synthetic"] == grouped["synthetic"]


def test_a_mixture_saved_before_top_k_was_the_default_keeps_the_dense_update(
    tmp_path: Path, tiny_run: Callable[[str], Path]
) -> None:
    """top_k's default went from None (dense) to 8: today's checkpoints save it; one saved
    without it was dense, loads dense, and refuses to resume into a truncated run."""
    source = tiny_run("decoupled") / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(source, weights_only=True)
    model = checkpoint["hyper_parameters"]
    assert model["prototypes"]["init_args"]["gmm"] == {"top_k": 8}
    assert load_module(source).gmm.top_k == 8

    before = {**model, "prototypes": {**model["prototypes"], "init_args": {}}}
    checkpoint["hyper_parameters"] = before
    path = tmp_path / "before.ckpt"
    torch.save(checkpoint, path)
    assert load_module(path).gmm.top_k is None
    with pytest.raises(ValueError, match=r"model\.prototypes\.gmm is \{'top_k': None\} in the"):
        check_resume_compatible(path, model, None, world_size=1)
    dense = {**model, "prototypes": Decoupled(gmm={"top_k": None}).spec()}
    assert check_resume_compatible(path, dense, None, world_size=1) == []

    # The flat layout (before the classes) was older still: dense too.
    flat = checkpoint_model_hparams({"gmm": {"eta": 0.9}})
    assert flat["prototypes"]["init_args"]["gmm"] == {"eta": 0.9, "top_k": None}
    assert checkpoint_model_hparams({"prototypes": "joint"})["prototypes"]["init_args"] == {}
