"""Data sets derived from the embedded MNIST-5k, written as class folders (issue 16, item 4).

    scripts/dev python -m benchmarks.derived_datasets --out runs/data

Writes ``<out>/mnist5k-inverted`` (255 - pixel: white digits become black strokes on white)
and ``<out>/mnist5k-rotated`` (every digit turned 90 degrees), each as
``train/<class>/<n>.png`` and ``val/<class>/<n>.png`` with the embedded data's own split, so
a recipe can be checked on data it was not tuned on with the ``folder`` data set:

    protogmm fit --config CONFIG --data.dataset folder --data.root runs/data/mnist5k-inverted \\
        --data.image_size 28 --data.in_channels 1
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from protogmm.data.datasets import EmbeddedMNIST

#: name -> pixel transform of a ``[28, 28]`` uint8 image.
DERIVED: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mnist5k-inverted": lambda image: 255 - image,
    "mnist5k-rotated": lambda image: np.ascontiguousarray(np.rot90(image)),
}


def write_derived(out: Path, name: str) -> Path:
    """Write one derived data set under ``out / name``; returns its root."""
    root = out / name
    for split, folder in (("train", "train"), ("test", "val")):
        data = EmbeddedMNIST(split=split)
        for index, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
            path = root / folder / str(int(label)) / f"{index:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.asarray(image, dtype=np.uint8).reshape(28, 28)
            Image.fromarray(DERIVED[name](pixels), mode="L").save(path)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/data"))
    parser.add_argument("--names", nargs="+", default=list(DERIVED), choices=list(DERIVED))
    args = parser.parse_args()
    for name in args.names:
        print(write_derived(args.out, name))


if __name__ == "__main__":
    main()
