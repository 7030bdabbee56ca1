"""Take a trained encoder out of a checkpoint: safetensors files another project loads.

``protogmm export CKPT --out FILE.safetensors`` writes two files:

* ``FILE.safetensors``: the teacher backbone (the encoder DINO evaluates and releases), under
  the names its own library uses, so it loads with ``strict=True`` into
  ``timm.create_model(name, num_classes=0)`` (``timm:<name>`` backbones), into torchvision's
  ResNet with ``fc = Identity()`` (``resnet18/34/50``; with the CIFAR stem, the stem swapped
  the same way first: the metadata says so), or into protogmm's own
  :func:`~protogmm.models.build_backbone` (``convnet``, ``vit``...). The file's metadata
  records the backbone, its arguments and the line that loads it;
  :func:`load_exported_backbone` does it.
* ``FILE.prototypes.safetensors``: the prototype sets as the checkpoint holds them (the
  mixture's buffers, the teacher's learned layers), which ``protogmm diagnose`` reads.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from protogmm.models import build_backbone
from protogmm.models.backbones import TimmBackbone, TorchvisionResNet
from protogmm.training.atomic_io import replace_atomically
from protogmm.training.module import PrototypicalSSL

__all__ = ["PROTOTYPE_PREFIXES", "export_module", "load_exported_backbone", "prototypes_path"]

#: State-dict entries that belong to prototype sets (what ``diagnose`` reads).
PROTOTYPE_PREFIXES = ("gmm.", "patch.gmm.", "teacher.prototypes.", "teacher.patch.", "clustering.")


def prototypes_path(out: str | os.PathLike[str]) -> Path:
    """``FILE.prototypes.safetensors`` beside ``FILE.safetensors``."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".safetensors") + ".prototypes.safetensors")


def _plain(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors, no shared storage (what safetensors accepts)."""
    return {name: value.detach().cpu().contiguous().clone() for name, value in state.items()}


def _backbone_export(module: PrototypicalSSL) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The teacher backbone's weights under its library's names, and how to load them."""
    hp = module.hparams
    backbone = module.teacher["backbone"]
    kwargs = dict(hp.backbone_kwargs or {})
    metadata = {
        "format": "protogmm-backbone/1",
        "backbone": str(hp.backbone),
        "backbone_kwargs": json.dumps(kwargs),
        "in_channels": str(hp.in_channels),
        "image_size": str(hp.image_size),
        "feature_dim": str(backbone.feature_dim),
    }
    if isinstance(backbone, TimmBackbone):
        name = str(hp.backbone).removeprefix("timm:")
        args = ", ".join(f"{k}={v!r}" for k, v in {**kwargs, "in_chans": hp.in_channels}.items())
        metadata["load"] = f"timm.create_model({name!r}, num_classes=0, {args})"
        return backbone.model.state_dict(), metadata
    if isinstance(backbone, TorchvisionResNet):
        small = bool(kwargs.get("small_images", True))
        metadata["stem"] = "cifar" if small else "imagenet"
        stem = (
            f"; m.conv1 = torch.nn.Conv2d({hp.in_channels}, 64, 3, 1, 1, bias=False)"
            "; m.maxpool = torch.nn.Identity()"
            if small
            else ""
        )
        metadata["load"] = (
            f"m = torchvision.models.{hp.backbone}(); m.fc = torch.nn.Identity(){stem}"
        )
        return backbone.model.state_dict(), metadata
    metadata["load"] = (
        f"protogmm.models.build_backbone({str(hp.backbone)!r}, in_channels={hp.in_channels}, "
        f"image_size={hp.image_size}, **{kwargs!r})"
    )
    return backbone.state_dict(), metadata


def export_module(module: PrototypicalSSL, out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write the teacher backbone and the prototype sets of ``module`` (see the module doc).

    Args:
        module: a trained module (e.g. :func:`protogmm.training.checkpoints.load_module`).
        out: the backbone file, ``*.safetensors``.

    Returns:
        The backbone file and the prototypes file, each written atomically (a temporary file,
        then a rename) with the usual umask-derived mode.

    Raises:
        ValueError: ``out`` does not end in ``.safetensors``.
    """
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: the file name must end in .safetensors")
    state, metadata = _backbone_export(module)
    prototypes = {
        name: value
        for name, value in module.state_dict().items()
        if name.startswith(PROTOTYPE_PREFIXES) and value.is_floating_point()
    }
    extra = {"format": "protogmm-prototypes/1", "prototypes": module.kind.name}
    # Written then renamed, with the mode of the run's other files (save_file's own is 0600).
    for path, tensors, meta in ((out, state, metadata), (prototypes_path(out), prototypes, extra)):
        replace_atomically(path, partial(_save_safetensors, _plain(tensors), metadata=meta))
    return out, prototypes_path(out)


def _save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' ``save_file`` (imported here: only an export needs the library)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)


def load_exported_backbone(path: str | os.PathLike[str]) -> nn.Module:
    """The encoder an exported backbone file describes, its weights loaded with ``strict=True``.

    ``timm:<name>`` backbones come back as the timm model itself, torchvision ResNets as the
    torchvision model (``fc = Identity()``), protogmm's own as :func:`build_backbone` builds
    them: what another project would use.

    Raises:
        ValueError: the file is not a protogmm backbone export (one line naming it).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata: dict[str, Any] = handle.metadata() or {}
    if metadata.get("format") != "protogmm-backbone/1":
        raise ValueError(f"{path}: not a backbone exported by `protogmm export`")
    name, kwargs = metadata["backbone"], json.loads(metadata["backbone_kwargs"])
    in_channels, image_size = int(metadata["in_channels"]), int(metadata["image_size"])
    wrapper = build_backbone(name, in_channels=in_channels, image_size=image_size, **kwargs)
    model = wrapper.model if isinstance(wrapper, (TimmBackbone, TorchvisionResNet)) else wrapper
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()
