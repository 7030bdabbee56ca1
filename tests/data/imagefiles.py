"""Test helpers: small class-folder trees, broken image files and CIFAR pickles on disk."""

from __future__ import annotations

import io
import pickle
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image


def image_pixels(seed: int, size: int = 8, mode: str = "RGB") -> np.ndarray:
    """A deterministic random image: ``[size, size, 3]`` (RGB) or ``[size, size]`` (L)."""
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def encode(pixels: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, image_format)
    return buffer.getvalue()


def write_tree(root: Path, counts: dict[str, int], size: int = 8, ext: str = "png") -> list[Path]:
    """``root/<class>/img_<i>.<ext>`` with ``counts[class]`` random RGB images each.

    Pixel seeds are unique per file (class order, then i), so every file's content is known.
    """
    paths, seed = [], 0
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = root / name / f"img_{i:03d}.{ext}"
            fmt = "JPEG" if ext.lower() in ("jpg", "jpeg") else ext.upper()
            path.write_bytes(encode(image_pixels(seed, size), fmt))
            paths.append(path)
            seed += 1
    return paths


def break_file(path: Path, kind: str) -> None:
    """Replace ``path``'s content by a broken file of one kind (keeping its name)."""
    good = encode(image_pixels(999), "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    if kind == "zero":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is a text file renamed to look like an image\n")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "corrupt":
        # Zero a run of the compressed pixel stream: PNG's zlib stream breaks (JPEG decoders
        # accept such damage silently, so the corrupt case uses PNG).
        data = bytearray(encode(image_pixels(999), "PNG"))
        data[60:80] = bytes(20)
        path.write_bytes(bytes(data))
    else:
        raise ValueError(kind)


BROKEN_KINDS = ("zero", "text", "truncated", "corrupt")


def png_bytes(
    width: int, height: int, bit_depth: int, color_type: int, rows: Iterable[bytes]
) -> bytes:
    """A PNG file written by hand, for what Pillow cannot save (16-bit RGB, huge sizes).

    ``rows`` are the raw scanlines (big-endian samples, no filter byte); they are
    compressed as they come, so a huge image of zeros never sits in memory.
    ``color_type``: 0 grayscale, 2 RGB, 3 palette (a two-colour palette is written).
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(b"\x00" + row) for row in rows) + compressor.flush()
    palette = chunk(b"PLTE", bytes([0, 0, 0, 255, 255, 255])) if color_type == 3 else b""
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + palette
        + chunk(b"IDAT", data)
        + chunk(b"IEND", b"")
    )


def bomb_png(width: int, height: int) -> bytes:
    """A 1-bit PNG of zeros: a few KB on disk that declares ``width * height`` pixels."""
    row = bytes((width + 7) // 8)
    return png_bytes(width, height, 1, 0, (row for _ in range(height)))


def write_cifar(
    root: Path, variant: str, per_file: int = 6, num_classes: int | None = None
) -> dict:
    """Official-layout CIFAR pickles with random pixels; returns what was written."""
    rng = np.random.default_rng(0)
    if variant == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = {f"data_batch_{i}": "train" for i in range(1, 6)} | {"test_batch": "test"}
        meta, names_key, labels_key = "batches.meta", "label_names", "labels"
        num_classes = num_classes or 10
    else:
        folder = root / "cifar-100-python"
        files = {"train": "train", "test": "test"}
        meta, names_key, labels_key = "meta", "fine_label_names", "fine_labels"
        num_classes = num_classes or 100
    folder.mkdir(parents=True)
    names = [f"name_{c}" for c in range(num_classes)]
    with open(folder / meta, "wb") as handle:
        pickle.dump({names_key: names, "num_cases_per_batch": per_file}, handle)
    written: dict[str, list] = {"train": [], "test": []}
    for name, split in files.items():
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, per_file).tolist()
        content = {
            "data": data,
            labels_key: labels,
            "filenames": [f"{name}_{i}.png" for i in range(per_file)],
        }
        if variant == "cifar100":
            content["coarse_labels"] = [0] * per_file
        with open(folder / name, "wb") as handle:
            pickle.dump(content, handle, protocol=2)
        written[split].append((data, labels))
    return {"folder": folder, "classes": names, **written}
