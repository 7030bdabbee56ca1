"""Tests of reading prototype matrices from DINO / iBOT / DINOv2 / protogmm checkpoints."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from protogmm.diagnostics.external import describe_prototypes, load_prototypes

K, D = 12, 8


def weight_norm_parts(seed: int, unit_gain: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``g`` ``[K, 1]`` (or ones) and ``v`` ``[K, D]``."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.ones(K, 1) if unit_gain else torch.rand(K, 1, generator=gen) + 0.5
    v = torch.randn(K, D, generator=gen) * 3.0
    return g, v


def effective(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``g * v / ||v||`` row by row, written out in float64."""
    rows = [g[k, 0].double() * v[k].double() / v[k].double().norm() for k in range(v.shape[0])]
    return torch.stack(rows).float()


def backbone_entries(prefix: str) -> dict[str, torch.Tensor]:
    """A few 2-D backbone and MLP tensors that must not be mistaken for prototypes."""
    return {
        f"{prefix}backbone.cls_token": torch.zeros(1, 1, D),
        f"{prefix}backbone.blocks.0.attn.qkv.weight": torch.randn(3 * D, D),
        f"{prefix}head.mlp.0.weight": torch.randn(16, D),
        f"{prefix}head.mlp.0.bias": torch.randn(16),
    }


def save(tmp_path: Path, checkpoint: object, name: str = "checkpoint.pth") -> Path:
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


# ----------------------------------------------------------------------------- layouts


def test_facebookresearch_dino_student_and_teacher(tmp_path: Path) -> None:
    gs, vs = weight_norm_parts(0)
    gt, vt = weight_norm_parts(1)
    checkpoint = {
        "student": {
            **backbone_entries("module."),
            "module.head.last_layer.weight_g": gs,
            "module.head.last_layer.weight_v": vs,
        },
        "teacher": {
            **backbone_entries(""),
            "head.last_layer.weight_g": gt,
            "head.last_layer.weight_v": vt,
        },
        "optimizer": {"state": {0: {"momentum_buffer": vs.clone()}}, "param_groups": [{"lr": 0.1}]},
        "epoch": 100,
        "dino_loss": {"center": torch.zeros(1, K)},
    }
    found = load_prototypes(save(tmp_path, checkpoint))
    assert list(found) == ["student/head.last_layer", "teacher/head.last_layer"]
    torch.testing.assert_close(found["student/head.last_layer"], effective(gs, vs))
    torch.testing.assert_close(found["teacher/head.last_layer"], effective(gt, vt))
    assert all(m.dtype == torch.float32 and m.shape == (K, D) for m in found.values())


def test_ibot_patch_head_and_unit_gain_of_norm_last_layer(tmp_path: Path) -> None:
    g1, v1 = weight_norm_parts(2, unit_gain=True)  # norm_last_layer=True stores ones
    g2, v2 = weight_norm_parts(3)
    checkpoint = {
        "student": {
            "module.head.last_layer.weight_g": g1,
            "module.head.last_layer.weight_v": v1,
            "module.head.last_layer2.weight_g": g2,
            "module.head.last_layer2.weight_v": v2,
        }
    }
    found = load_prototypes(save(tmp_path, checkpoint))
    assert set(found) == {"student/head.last_layer", "student/head.last_layer2"}
    torch.testing.assert_close(found["student/head.last_layer"], effective(g1, v1))
    torch.testing.assert_close(found["student/head.last_layer2"], effective(g2, v2))
    norms = found["student/head.last_layer"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(K))


def test_weight_v_without_weight_g_has_unit_gain(tmp_path: Path) -> None:
    _, v = weight_norm_parts(4)
    found = load_prototypes(save(tmp_path, {"teacher": {"head.last_layer.weight_v": v}}))
    torch.testing.assert_close(found["teacher/head.last_layer"], effective(torch.ones(K, 1), v))


def test_dinov2_parametrizations_match_the_module_weight(tmp_path: Path) -> None:
    torch.manual_seed(0)
    dino = nn.utils.parametrizations.weight_norm(nn.Linear(D, K, bias=False))
    ibot = nn.utils.parametrizations.weight_norm(nn.Linear(D, K, bias=False))
    with torch.no_grad():
        dino.parametrizations.weight.original0.uniform_(0.5, 2.0)
        ibot.parametrizations.weight.original0.uniform_(0.5, 2.0)
    teacher = {
        f"{name}.last_layer.{key}": value
        for name, layer in (("dino_head", dino), ("ibot_head", ibot))
        for key, value in layer.state_dict().items()
    }
    assert "dino_head.last_layer.parametrizations.weight.original0" in teacher
    found = load_prototypes(save(tmp_path, {"teacher": teacher}))
    assert list(found) == ["teacher/dino_head.last_layer", "teacher/ibot_head.last_layer"]
    torch.testing.assert_close(found["teacher/dino_head.last_layer"], dino.weight.detach())
    torch.testing.assert_close(found["teacher/ibot_head.last_layer"], ibot.weight.detach())
    g = teacher["dino_head.last_layer.parametrizations.weight.original0"]
    v = teacher["dino_head.last_layer.parametrizations.weight.original1"]
    torch.testing.assert_close(found["teacher/dino_head.last_layer"], effective(g, v))


def test_dinov2_model_checkpoint_with_role_prefixed_keys(tmp_path: Path) -> None:
    gs, vs = weight_norm_parts(5)
    gt, vt = weight_norm_parts(6)
    model = {
        "student.dino_head.last_layer.weight_g": gs,
        "student.dino_head.last_layer.weight_v": vs,
        "teacher.dino_head.last_layer.weight_g": gt,
        "teacher.dino_head.last_layer.weight_v": vt,
    }
    found = load_prototypes(save(tmp_path, {"model": model, "iteration": 12499}))
    assert list(found) == ["student/dino_head.last_layer", "teacher/dino_head.last_layer"]
    torch.testing.assert_close(found["teacher/dino_head.last_layer"], effective(gt, vt))


def test_plain_last_layer_weight_is_read_as_stored(tmp_path: Path) -> None:
    weight = torch.randn(K, D, dtype=torch.float64)
    found = load_prototypes(save(tmp_path, {"head.last_layer.weight": weight, "head.x": weight}))
    assert list(found) == ["head.last_layer"]
    torch.testing.assert_close(found["head.last_layer"], weight.float())


def test_protogmm_state_dicts_are_normalised(tmp_path: Path) -> None:
    mean = torch.randn(K, D) * 0.3
    weight = torch.randn(K, D) * 5.0
    state_dict = {
        "gmm.mean": mean,
        "gmm.stat_sum": torch.randn(K, D),
        "gmm.var": torch.rand(K, D),
        "student.prototypes.weight": weight,
        "teacher.prototypes.weight": 2.0 * weight,
        "objective.center": torch.zeros(1, K),
    }
    found = load_prototypes(save(tmp_path, {"state_dict": state_dict, "epoch": 3}))
    assert list(found) == ["gmm", "student/prototypes", "teacher/prototypes"]
    torch.testing.assert_close(found["gmm"], mean / mean.norm(dim=1, keepdim=True))
    unit = weight / weight.norm(dim=1, keepdim=True)
    torch.testing.assert_close(found["student/prototypes"], unit)
    torch.testing.assert_close(found["teacher/prototypes"], unit)


def test_solo_learn_swav_weight_normalised_prototypes(tmp_path: Path) -> None:
    # solo-learn's SwAV: nn.utils.weight_norm(nn.Linear(d, K)) named "prototypes".
    g, v = weight_norm_parts(3)
    state_dict = {
        **backbone_entries(""),
        "prototypes.weight_g": g,
        "prototypes.weight_v": v,
    }
    found = load_prototypes(save(tmp_path, {"state_dict": state_dict}))
    assert list(found) == ["prototypes"]
    torch.testing.assert_close(found["prototypes"], effective(g, v))


@pytest.mark.parametrize("kind", ["joint", "decoupled", "partial"])
def test_protogmm_module_state_dict_gives_its_prototypes(tmp_path: Path, kind: str) -> None:
    from protogmm.training.module import PrototypicalSSL

    torch.manual_seed(0)
    model = PrototypicalSSL(
        prototypes=kind,
        in_channels=1,
        image_size=16,
        num_prototypes=32,
        hidden_dim=32,
        bottleneck_dim=16,
    )
    found = load_prototypes(save(tmp_path, {"state_dict": model.state_dict()}))
    if kind == "joint":
        assert list(found) == ["student/prototypes", "teacher/prototypes"]
        sets = model.prototype_sets
        expected = sets.student.prototypes().detach()
        torch.testing.assert_close(found["student/prototypes"], expected)
        torch.testing.assert_close(found["teacher/prototypes"], sets.teacher.prototypes().detach())
    elif kind == "decoupled":
        assert list(found) == ["gmm"]
        torch.testing.assert_close(found["gmm"], model.gmm.prototypes())
    else:  # partial: the teacher scores against the clustering layer, which must be read
        assert "clustering" in found
        torch.testing.assert_close(found["clustering"], model.prototype_vectors())


def test_name_collision_falls_back_to_the_full_path(tmp_path: Path) -> None:
    g, v = weight_norm_parts(7)
    checkpoint = {
        "teacher": {"dino_head.last_layer.weight_g": g, "dino_head.last_layer.weight_v": v},
        "model": {
            "teacher.dino_head.last_layer.weight_g": g,
            "teacher.dino_head.last_layer.weight_v": v,
        },
    }
    found = load_prototypes(save(tmp_path, checkpoint))
    assert list(found) == ["teacher/dino_head.last_layer", "model/teacher.dino_head.last_layer"]


def test_key_selects_one_layer_and_lists_names_when_absent(tmp_path: Path) -> None:
    g, v = weight_norm_parts(8)
    path = save(
        tmp_path,
        {
            "student": {"head.last_layer.weight_g": g, "head.last_layer.weight_v": v},
            "teacher": {"head.last_layer.weight_g": g, "head.last_layer.weight_v": v},
        },
    )
    found = load_prototypes(path, key="teacher/head.last_layer")
    assert list(found) == ["teacher/head.last_layer"]
    with pytest.raises(ValueError, match=r"'nope'.*student/head\.last_layer"):
        load_prototypes(path, key="nope")


def test_nan_rows_are_let_through(tmp_path: Path) -> None:
    weight = torch.randn(K, D)
    weight[3] = float("nan")
    found = load_prototypes(save(tmp_path, {"head.last_layer.weight": weight}))
    assert torch.isnan(found["head.last_layer"][3]).all()
    assert "1 non-finite rows" in describe_prototypes(found)


# ------------------------------------------------------------------------------ errors


@dataclasses.dataclass
class RunConfig:
    lr: float = 0.1


@pytest.mark.parametrize(
    "extra",
    [RunConfig(), argparse.Namespace(arch="vit_small", config=RunConfig())],
    ids=["dataclass", "namespace-holding-a-dataclass"],
)
def test_pickled_objects_are_refused(tmp_path: Path, extra: object) -> None:
    g, v = weight_norm_parts(9)
    checkpoint = {
        "student": {"head.last_layer.weight_g": g, "head.last_layer.weight_v": v},
        "args": extra,
    }
    path = save(tmp_path, checkpoint)
    with pytest.raises(ValueError, match="non-tensor objects") as info:
        load_prototypes(path)
    message = str(info.value)
    assert str(path) in message and "RunConfig" in message  # names what was refused
    assert "\n" not in message


def test_dino_full_checkpoint_with_a_namespace_of_plain_values_is_read(tmp_path: Path) -> None:
    # facebookresearch/dino's full checkpoints: the arguments as an argparse.Namespace.
    g, v = weight_norm_parts(11)
    checkpoint = {
        "teacher": {"head.last_layer.weight_g": g, "head.last_layer.weight_v": v},
        "args": argparse.Namespace(arch="vit_small", out_dim=11, lr=0.0005, crops=[2, 10]),
    }
    path = save(tmp_path, checkpoint)
    found = load_prototypes(path)
    torch.testing.assert_close(found["teacher/head.last_layer"], effective(g, v))


def test_allow_listed_namespace_is_read(tmp_path: Path) -> None:
    g, v = weight_norm_parts(10)
    checkpoint = {
        "teacher": {"head.last_layer.weight_g": g, "head.last_layer.weight_v": v},
        "args": argparse.Namespace(arch="vit_small"),
    }
    path = save(tmp_path, checkpoint)
    with torch.serialization.safe_globals([argparse.Namespace]):
        found = load_prototypes(path)
    torch.testing.assert_close(found["teacher/head.last_layer"], effective(g, v))


def test_no_prototype_layer_lists_candidates(tmp_path: Path) -> None:
    state_dict = {f"encoder.layer{i}.weight": torch.randn(4, 4) for i in range(30)}
    state_dict["encoder.bias"] = torch.randn(4)
    path = save(tmp_path, {"state_dict": state_dict})
    with pytest.raises(ValueError, match="no prototype layer") as info:
        load_prototypes(path)
    message = str(info.value)
    assert str(path) in message
    assert "state_dict/encoder.layer0.weight [4, 4]" in message
    assert "encoder.layer25.weight" not in message and "(and 10 more)" in message
    assert "encoder.bias" not in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        load_prototypes(path)


def test_corrupt_file_is_a_one_line_value_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pth") as info:
        load_prototypes(path)
    assert "\n" not in str(info.value)


def test_mismatched_gain_shape_names_the_layer(tmp_path: Path) -> None:
    _, v = weight_norm_parts(11)
    checkpoint = {"head.last_layer.weight_g": torch.ones(K + 1, 1), "head.last_layer.weight_v": v}
    with pytest.raises(ValueError, match=r"weight_g of head\.last_layer"):
        load_prototypes(save(tmp_path, checkpoint))


def test_describe_lists_name_k_and_d() -> None:
    text = describe_prototypes({"gmm": torch.zeros(5, 3), "teacher/prototypes": torch.zeros(7, 2)})
    assert text.splitlines() == ["gmm: K=5, d=3", "teacher/prototypes: K=7, d=2"]
    assert describe_prototypes({}) == "no prototype layers"
    with pytest.raises(ValueError, match=r"found\['x'\]"):
        describe_prototypes({"x": torch.zeros(3)})
