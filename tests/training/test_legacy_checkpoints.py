"""Checkpoints of the flat layout (before the host and prototype-kind classes) still load.

Until issue 18 every option sat directly under ``model`` (``host: ibot``,
``ibot_patch_weight``, ``koleo_weight``) and the host's objectives were the module's own
(``objective.center``). Such a file is built here from today's module by undoing both, then
read back with ``load_module``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import TINY_MODEL, TINY_VIT
from protogmm.hosts import CARP, IBOT
from protogmm.prototypes import Decoupled, Joint
from protogmm.training.checkpoints import load_module
from protogmm.training.legacy_hparams import moved_option_hint, upgrade_model_hparams
from protogmm.training.module import PrototypicalSSL

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
