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
    f"{host}_vits16_imagenet_{kind}.yaml"
    for host in ("dino", "ibot")
    for kind in ("joint", "decoupled")
]


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
    model, data = recipe["model"], recipe["data"]
    assert model["host"]["class_path"] == host.upper()
    assert model["prototypes"]["class_path"] == kind.capitalize()
    assert model["backbone"] == "timm:vit_small_patch16_224"
    assert (data["image_size"], data["local_size"], data["num_local_crops"]) == (224, 96, 10)
    assert model["num_prototypes"] == (65536 if host == "dino" else 8192)
    tiny = {"embed_dim": 24, "depth": 1, "num_heads": 2}
    module = PrototypicalSSL(
        **(model | {"num_prototypes": 64, "hidden_dim": 32, "backbone_kwargs": tiny}),
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
    assert [tuple(v.shape) for v in views] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 10
