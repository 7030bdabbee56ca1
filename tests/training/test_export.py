"""`protogmm export`: the teacher backbone loads with strict=True where its library expects it,
gives the teacher's features, and the prototypes file gives diagnose the same sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import TINY_SHAPES, fit_tiny, tiny_data
from protogmm.cli import main
from protogmm.diagnostics import load_prototypes, unique_prototype_curve
from protogmm.training.checkpoints import load_module
from protogmm.training.export import export_module, load_exported_backbone, prototypes_path

pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def tiny_checkpoint(run_dir: Path, **model: object) -> Path:
    """The last checkpoint of a tiny run (mixture initialised on the first batch)."""
    fit_tiny(
        run_dir,
        TINY_SHAPES | {"gmm": {"init_samples": 0}} | model,
        tiny_data(num_local_crops=0),
    )
    return run_dir / "checkpoints" / "last.ckpt"


def teacher_features(checkpoint: Path, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_module(checkpoint).teacher["backbone"](images)


@pytest.mark.parametrize("prototypes", ["decoupled", "joint"])
def test_a_convnet_export_loads_strictly_and_gives_the_teachers_features(
    tmp_path: Path, prototypes: str
) -> None:
    checkpoint = tiny_checkpoint(
        tmp_path / "run", prototypes=prototypes, backbone_kwargs={"width": 8}
    )
    out = tmp_path / "export" / "encoder.safetensors"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    encoder = load_exported_backbone(out)
    images = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), teacher_features(checkpoint, images))
    with safe_open(str(out), framework="pt") as handle:
        assert "build_backbone('convnet'" in handle.metadata()["load"]
    # The prototypes file: the same sets diagnose reads from the checkpoint.
    exported = load_prototypes(prototypes_path(out))
    original = load_prototypes(checkpoint)
    name = "gmm" if prototypes == "decoupled" else "teacher/prototypes"
    torch.testing.assert_close(exported[name], original[name])
    assert unique_prototype_curve(exported[name], [0.1]) == unique_prototype_curve(
        original[name], [0.1]
    )
    assert main(["diagnose", str(prototypes_path(out)), "--out", str(tmp_path / "d")]) == 0


def test_a_resnet_export_loads_into_torchvisions_own_model(tmp_path: Path) -> None:
    import torchvision

    checkpoint = tiny_checkpoint(tmp_path / "run", backbone="resnet18")
    out = tmp_path / "resnet.safetensors"
    export_module(load_module(checkpoint), out)
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.conv1 = torch.nn.Conv2d(1, 64, 3, 1, 1, bias=False)  # the CIFAR stem, as recorded
    model.maxpool = torch.nn.Identity()
    model.load_state_dict(load_file(str(out)), strict=True)
    images = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), teacher_features(checkpoint, images))
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["stem"] == "cifar" and "torchvision.models.resnet18()" in metadata["load"]


def test_bad_outputs_and_inputs_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tiny_checkpoint(tmp_path / "run", backbone_kwargs={"width": 8})
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "encoder.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert (
        main(["export", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "e.safetensors")])
        == 2
    )
    assert "missing.ckpt" in capsys.readouterr().err
    export_module(load_module(checkpoint), tmp_path / "e.safetensors")
    with pytest.raises(ValueError, match="not a backbone exported by"):
        load_exported_backbone(prototypes_path(tmp_path / "e.safetensors"))


def test_a_timm_export_loads_into_timms_own_model(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    kwargs = {"img_size": 16, "patch_size": 4, "embed_dim": 24, "depth": 1, "num_heads": 2}
    checkpoint = tiny_checkpoint(
        tmp_path / "run", backbone="timm:vit_tiny_patch16_224", backbone_kwargs=kwargs
    )
    out = tmp_path / "vit.safetensors"
    export_module(load_module(checkpoint), out)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=1, **kwargs)
    model.load_state_dict(load_file(str(out)), strict=True)
    images = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), teacher_features(checkpoint, images))
    with safe_open(str(out), framework="pt") as handle:
        load = handle.metadata()["load"]
    assert load.startswith("timm.create_model('vit_tiny_patch16_224', num_classes=0")
