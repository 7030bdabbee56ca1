"""The paper-scale recipes: each parses, names a real backbone, and builds its model and data
module (at a tiny size: the same keys and values, a small ViT and K)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from protogmm.cli import CONFIG_DIR
from protogmm.training.datamodule import SSLDataModule
from protogmm.training.module import PrototypicalSSL

RECIPES = [
    f"{host}_{backbone}_imagenet_{kind}.yaml"
    for host, backbone in (("dino", "vits16"), ("ibot", "vits16"), ("carp", "resnet50"))
    for kind in ("joint", "decoupled")
]
#: Per host: the paper's backbone, local crops, K, and the tiny stand-ins it is built with
#: here (a K that the host's blocks divide).
EXPECTED = {
    "dino": ("timm:vit_small_patch16_224", 10, 65536, 64),
    "ibot": ("timm:vit_small_patch16_224", 10, 8192, 64),
    "carp": ("timm:resnet50", 6, 65536, 1024),
}


@pytest.mark.parametrize("name", RECIPES)
def test_a_recipe_parses_and_builds_at_a_tiny_size(name: str, tmp_path: Path) -> None:
    printed = subprocess.run(
        [
            sys.executable,
            "-m",
            "protogmm.cli",
            "fit",
            "--config",
            str(CONFIG_DIR / name),
            "--print_config",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert printed.returncode == 0, printed.stderr[-2000:]
    recipe = yaml.safe_load((CONFIG_DIR / name).read_text())
    host, _, _, kind = name.removesuffix(".yaml").split("_")
    backbone, local_crops, num_prototypes, tiny_k = EXPECTED[host]
    model, data = recipe["model"], recipe["data"]
    assert model["host"]["class_path"] == host.upper()
    assert model["prototypes"]["class_path"] == kind.capitalize()
    assert model["backbone"] == backbone
    assert (data["image_size"], data["local_size"], data["num_local_crops"]) == (
        224,
        96,
        local_crops,
    )
    assert model["num_prototypes"] == num_prototypes
    tiny = {"embed_dim": 24, "depth": 1, "num_heads": 2} if "vit" in backbone else {}
    module = PrototypicalSSL(
        **(model | {"num_prototypes": tiny_k, "hidden_dim": 32, "backbone_kwargs": tiny}),
        in_channels=3,
        image_size=32,
    )
    assert (module.gmm is None) == (kind == "joint") and module.host.name == host
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for index in range(2):
                pixels = np.full((40, 40, 3), 60 * index + (label == "b") * 100, np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")
    datamodule = SSLDataModule(**(data | {"root": str(tmp_path), "num_workers": 0}))
    datamodule.setup("fit")
    views, _ = datamodule.train_set[0]
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * local_crops
    optimizer = module.configure_optimizers()
    assert type(optimizer).__name__ == ("Lars" if host == "carp" else "AdamW")
