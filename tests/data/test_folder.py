"""Class-folder datasets: listing, decoding, broken files of each kind, one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from imagefiles import BROKEN_KINDS, break_file, encode, image_pixels, write_tree
from PIL import Image

from protogmm.data import (
    IMAGE_EXTENSIONS,
    BadImageError,
    ClassFolderImages,
    check_same_classes,
    decode_image,
)


def test_lists_classes_sorted_and_labels_by_folder(tmp_path: Path) -> None:
    write_tree(tmp_path, {"zebra": 2, "ant": 3, "moth": 1})
    ds = ClassFolderImages(tmp_path)
    assert ds.classes == ["ant", "moth", "zebra"]
    assert len(ds) == 6 and ds.num_classes == 3
    assert ds.labels.tolist() == [0, 0, 0, 1, 2, 2]
    for (path, label), expected in zip(ds.samples, ds.labels, strict=True):
        assert Path(path).parent.name == ds.classes[label] and label == expected


def test_items_decode_the_exact_pixels(tmp_path: Path) -> None:
    write_tree(tmp_path, {"a": 2, "b": 1})  # seeds 0, 1 (class a), 2 (class b)
    ds = ClassFolderImages(tmp_path)
    image, label = ds[2]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 1
    np.testing.assert_array_equal(np.asarray(image), image_pixels(2))
    gray, _ = ClassFolderImages(tmp_path, in_channels=1)[0]
    assert gray.mode == "L"
    np.testing.assert_array_equal(
        np.asarray(gray), np.asarray(Image.fromarray(image_pixels(0)).convert("L"))
    )
    assert ClassFolderImages(tmp_path, transform=lambda im: im.size)[0][0] == (8, 8)


def test_any_pillow_format_nested_folders_hidden_and_other_files(tmp_path: Path) -> None:
    (tmp_path / "a" / "deep" / "er").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    pixels = image_pixels(5)
    (tmp_path / "a" / "one.JPG").write_bytes(encode(pixels, "JPEG"))  # upper-case extension
    (tmp_path / "a" / "deep" / "er" / "two.gif").write_bytes(
        encode(pixels, "GIF")
    )  # not in torchvision's list
    (tmp_path / "a" / "three.bmp").write_bytes(encode(pixels, "BMP"))
    (tmp_path / "b" / "four.webp").write_bytes(encode(pixels, "WEBP"))
    (tmp_path / "b" / "notes.txt").write_text("not listed")  # not an image extension
    (tmp_path / "b" / "._four.webp").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden folder: not a class
    ds = ClassFolderImages(tmp_path)
    assert ds.classes == ["a", "b"]
    names = sorted(Path(p).name for p, _ in ds.samples)
    assert names == ["four.webp", "one.JPG", "three.bmp", "two.gif"]
    assert all(ds[i][0].size == (8, 8) for i in range(len(ds)))
    assert {".gif", ".jpg", ".png", ".tiff", ".webp"} <= IMAGE_EXTENSIONS
    assert not {".h5", ".mpg", ".txt"} & IMAGE_EXTENSIONS


@pytest.mark.parametrize("kind", BROKEN_KINDS)
@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_each_broken_kind_is_an_error_naming_the_file(tmp_path: Path, kind: str, ext: str) -> None:
    paths = write_tree(tmp_path, {"a": 2, "b": 2}, ext=ext)
    break_file(paths[1], kind)
    ds = ClassFolderImages(tmp_path)
    ds[0], ds[2], ds[3]  # the good files decode
    with pytest.raises(BadImageError) as caught:
        ds[1]
    message = str(caught.value)
    assert caught.value.path == str(paths[1]) and str(paths[1]) in message
    assert "\n" not in message
    expected = {
        "zero": "empty file (0 bytes)",
        "text": "not an image file Pillow can read",
        "truncated": "corrupt or truncated image data",
        "corrupt": "corrupt or truncated image data",
    }[kind]
    assert expected in message


def test_decode_image_converts_modes(tmp_path: Path) -> None:
    rgba = np.dstack([image_pixels(1), np.full((8, 8), 128, np.uint8)])
    (tmp_path / "x.png").write_bytes(encode(rgba, "PNG"))
    assert decode_image(tmp_path / "x.png", "RGB").mode == "RGB"
    np.testing.assert_array_equal(
        np.asarray(decode_image(tmp_path / "x.png", "RGB")), image_pixels(1)
    )


def test_missing_root_empty_root_and_empty_class_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="image folder not found: .*nowhere"):
        ClassFolderImages(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"no class folders in {tmp_path}"):
        ClassFolderImages(tmp_path)
    write_tree(tmp_path, {"a": 1})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError) as caught:
        ClassFolderImages(tmp_path)
    assert str(caught.value) == f"class folder {tmp_path / 'b'} holds no image files"


def test_class_mismatch_names_both_sides() -> None:
    check_same_classes(["a", "b"], "train", ["a", "b"], "val")
    with pytest.raises(ValueError) as caught:
        check_same_classes(["a", "b", "c"], "/d/train", ["a", "d"], "/d/val")
    assert str(caught.value) == (
        "class folders differ between /d/train and /d/val: only in /d/train: ['b', 'c'], "
        "only in /d/val: ['d']"
    )


def test_bad_channels() -> None:
    with pytest.raises(ValueError, match="in_channels"):
        ClassFolderImages(".", in_channels=2)
