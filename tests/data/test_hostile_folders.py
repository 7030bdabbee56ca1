"""Hostile class folders: symlink loops, 16-bit and float images, undecodable file names,
decompression bombs (issue 17, defects 6, 7, 8 and 10)."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from imagefiles import bomb_png, encode, image_pixels, png_bytes, write_tree
from PIL import Image, ImageFile
from torchvision.datasets.folder import make_dataset

from helpers import FOLDER_MODEL, fit_tiny
from protogmm.data import (
    BadImageError,
    ClassFolderImages,
    SkipBadImages,
    decode_image,
    drop_bad_images,
    scan_images,
)
from protogmm.data.bad_images import display_path
from protogmm.data.folder import MAX_IMAGE_PIXELS, list_class_files
from protogmm.training.callbacks import write_text_atomically
from protogmm.training.datamodule import SSLDataModule

# ---------------------------------------------------------------------------------------
# 6. Symlinks: followed, but never in a loop, and every real file listed once.


def real_class(path: str, root: Path) -> str:
    """The class folder a listed file really sits in (links resolved)."""
    return Path(os.path.realpath(path)).relative_to(os.path.realpath(root)).parts[0]


def test_symlink_loops_list_each_file_once_with_its_own_label(tmp_path: Path, caplog) -> None:
    root = tmp_path / "images"
    write_tree(root, {"a": 10, "b": 10})  # the 20 files
    (root / "b" / "deep").mkdir()
    os.symlink("..", root / "a" / "up")  # back to the image folder: every class again
    os.symlink(".", root / "b" / "self")  # to itself
    os.symlink("../..", root / "b" / "deep" / "back")  # to the image folder, two levels up
    os.symlink("../b", root / "a" / "to_b")  # class b's files under class a
    with caplog.at_level(logging.WARNING, logger="protogmm.data"):
        ds = ClassFolderImages(root)
    assert len(ds) == 20
    real = [os.path.realpath(p) for p, _ in ds.samples]
    assert len(set(real)) == 20
    assert all(real_class(p, root) == ds.classes[label] for p, label in ds.samples)
    assert ds.labels.tolist() == [0] * 10 + [1] * 10
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 4 and all("\n" not in line for line in warned)
    for link in ("a/up", "b/self", "b/deep/back", "a/to_b"):
        assert sum(str(root / link) in line for line in warned) == 1, link
    assert sum("a loop" in line for line in warned) == 3
    assert any(f"listed already as {root / 'b'}" in line for line in warned)


def test_a_symlink_loop_does_not_put_a_file_in_both_splits(tmp_path: Path) -> None:
    write_tree(tmp_path, {"a": 10, "b": 10})
    os.symlink("..", tmp_path / "a" / "up")  # the loop: 20 files were 820 samples
    data = SSLDataModule(dataset="folder", root=str(tmp_path), image_size=8, test_fraction=0.2)
    train, test = data.labelled_split("train"), data.labelled_split("test")
    train_files = {os.path.realpath(p) for p, _ in train.samples}
    test_files = {os.path.realpath(p) for p, _ in test.samples}
    assert len(train) + len(test) == 20 and len(train_files) + len(test_files) == 20
    assert not train_files & test_files


def test_links_out_of_the_folder_are_followed_once(tmp_path: Path, caplog) -> None:
    shared = tmp_path / "shared"
    write_tree(shared, {"x": 2})  # shared/x/img_000.png, img_001.png
    (tmp_path / "loose.png").write_bytes(encode(image_pixels(7), "PNG"))
    root = tmp_path / "images"
    write_tree(root, {"a": 1, "b": 1})
    os.symlink(shared / "x", root / "a" / "more")  # followed: 2 more images of class a
    os.symlink(shared / "x", root / "b" / "more")  # the same folder again: skipped
    os.symlink(tmp_path / "loose.png", root / "b" / "loose.png")  # a file link: followed
    os.symlink(root / "a" / "img_000.png", root / "b" / "copy.png")  # a listed file: skipped
    os.symlink(tmp_path / "elsewhere", root / "c")  # a class folder that is a link
    write_tree(tmp_path / "elsewhere", {"sub": 1})
    with caplog.at_level(logging.WARNING, logger="protogmm.data"):
        ds = ClassFolderImages(root)
    listed = [(os.path.relpath(p, root), label) for p, label in ds.samples]
    assert listed == [
        ("a/img_000.png", 0),
        ("a/more/img_000.png", 0),
        ("a/more/img_001.png", 0),
        ("b/img_000.png", 1),
        ("b/loose.png", 1),
        ("c/sub/img_000.png", 2),
    ]
    np.testing.assert_array_equal(np.asarray(ds[4][0]), image_pixels(7))
    warned = " | ".join(r.getMessage() for r in caplog.records)
    assert f"skipping folder link {root / 'b' / 'more'}" in warned
    assert f"first: {root / 'b' / 'copy.png'}" in warned


def test_listing_matches_torchvision_without_links(tmp_path: Path) -> None:
    for name, count in {"a": 3, "b_x": 2, "b": 2}.items():
        write_tree(tmp_path / name / "n" / "m", {"deep": count})
        write_tree(tmp_path, {name: count})
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    classes = ["a", "b", "b_x"]
    expected = make_dataset(str(tmp_path), {c: i for i, c in enumerate(classes)}, (".png",))
    assert list_class_files(tmp_path, classes) == expected
    assert ClassFolderImages(tmp_path).samples == expected


def test_hidden_folders_inside_class_folders_are_ignored(tmp_path: Path) -> None:
    write_tree(tmp_path, {"a": 1, "b": 1})
    write_tree(tmp_path / "a", {".ipynb_checkpoints": 2})
    assert len(ClassFolderImages(tmp_path)) == 2


def test_class_folder_links_to_the_root_or_to_each_other_are_errors(tmp_path: Path) -> None:
    write_tree(tmp_path, {"a": 1})
    os.symlink("a", tmp_path / "b")
    with pytest.raises(ValueError) as caught:
        ClassFolderImages(tmp_path)
    assert str(caught.value) == (
        f"class folders {tmp_path / 'a'} and {tmp_path / 'b'} are the same folder "
        f"({os.path.realpath(tmp_path / 'a')}): a link?"
    )
    os.remove(tmp_path / "b")
    os.symlink(".", tmp_path / "c")
    with pytest.raises(ValueError, match=f"^class folder {tmp_path / 'c'} is a link to .*itself$"):
        ClassFolderImages(tmp_path)


# ---------------------------------------------------------------------------------------
# 7. 16-bit and float images: scaled into 8 bits, never clipped to white or black.

GRADIENT_16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)


def test_16_bit_grayscale_png_is_a_gradient(tmp_path: Path) -> None:
    write_tree(tmp_path, {"b": 1})
    (tmp_path / "a").mkdir()
    Image.fromarray(GRADIENT_16).save(tmp_path / "a" / "g16.png")
    assert Image.open(tmp_path / "a" / "g16.png").mode == "I;16"
    ds = ClassFolderImages(tmp_path, in_channels=1)
    gray = np.asarray(ds[0][0])
    np.testing.assert_array_equal(gray, (GRADIENT_16 >> 8).astype(np.uint8))
    assert len(np.unique(gray)) == 256  # a gradient, not a constant (it was all 255)
    rgb = np.asarray(decode_image(tmp_path / "a" / "g16.png", "RGB"))
    np.testing.assert_array_equal(rgb, np.repeat(gray[..., None], 3, axis=2))


def test_16_bit_ppm_and_rgb_png(tmp_path: Path) -> None:
    # PGM with 16-bit samples opens in mode "I" (32-bit integers).
    (tmp_path / "g.pgm").write_bytes(b"P5 64 64 65535\n" + GRADIENT_16.astype(">u2").tobytes())
    assert Image.open(tmp_path / "g.pgm").mode == "I"
    np.testing.assert_array_equal(
        np.asarray(decode_image(tmp_path / "g.pgm", "L")), GRADIENT_16 >> 8
    )
    # 16-bit RGB: Pillow itself keeps the high byte; the rule for gray matches it.
    rgb16 = (np.arange(8 * 8 * 3).reshape(8, 8, 3) * 300).astype(">u2")
    (tmp_path / "c.png").write_bytes(png_bytes(8, 8, 16, 2, (row.tobytes() for row in rgb16)))
    np.testing.assert_array_equal(np.asarray(decode_image(tmp_path / "c.png", "RGB")), rgb16 >> 8)


def test_float_tiff_in_0_1_is_scaled_by_255(tmp_path: Path) -> None:
    values = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(values).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    gray = np.asarray(decode_image(tmp_path / "f.tif", "L"))
    np.testing.assert_array_equal(gray, np.rint(values * 255).astype(np.uint8))
    assert gray.min() == 0 and gray.max() == 255  # it was all 0 (and 1)


@pytest.mark.parametrize(
    ("values", "shown"),
    [
        (
            np.linspace(0, 1000, 16, dtype=np.float32),
            "float image (mode F) with values in [0, 1000]",
        ),
        (np.array([0.5] * 15 + [np.nan], np.float32), "float image (mode F) with values in [nan"),
        (
            np.arange(16, dtype=np.int32) * 10_000,
            "integer image (mode I) with values in [0, 150000]",
        ),
        (np.arange(16, dtype=np.int32) - 1, "integer image (mode I) with values in [-1, 14]"),
    ],
)
def test_out_of_range_float_and_integer_images_are_bad_images(
    tmp_path: Path, values: np.ndarray, shown: str
) -> None:
    path = tmp_path / "x.tif"
    Image.fromarray(values.reshape(4, 4)).save(path)
    with pytest.raises(BadImageError) as caught:
        decode_image(path, "RGB")
    message = str(caught.value)
    assert message.startswith(f"unreadable image {path}: {shown}") and "\n" not in message
    assert caught.value.path == str(path)


# ---------------------------------------------------------------------------------------
# 8. File names that are not UTF-8: shown safely in every message, log and report.

ODD_NAME = os.fsdecode(b"\xff\xfe.png")  # "\udcff\udcfe.png": bytes that are not UTF-8


def test_display_path() -> None:
    assert display_path(ODD_NAME) == "\\xff\\xfe.png"
    assert display_path(b"/d/\xff.png") == "/d/\\xff.png"
    assert display_path(Path("/d") / ODD_NAME) == "/d/\\xff\\xfe.png"
    assert display_path("/d/été/猫.png") == "/d/été/猫.png"  # valid names unchanged
    assert display_path("\ud800.png") == "\\ud800.png"  # not even a file name's escape


def test_an_undecodable_name_is_shown_safely_in_errors(tmp_path: Path) -> None:
    write_tree(tmp_path, {"a": 2, "b": 1})
    odd = tmp_path / "a" / ODD_NAME
    odd.write_text("not an image")
    ds = ClassFolderImages(tmp_path)
    bad = scan_images(ds, workers=1)
    assert [b.path for b in bad] == [str(odd)]  # the name that opens the file
    assert bad[0].reason == (
        f"unreadable image {tmp_path}/a/\\xff\\xfe.png: not an image file Pillow can read"
    )
    bad[0].reason.encode("utf-8")  # printable anywhere
    (tmp_path / "a" / "img_000.png").write_bytes(b"")
    (tmp_path / "a" / "img_001.png").write_bytes(b"")
    with pytest.raises(ValueError) as caught:
        drop_bad_images(ds, scan_images(ds, workers=1))
    str(caught.value).encode("utf-8")
    with pytest.raises(ValueError) as caught:
        SkipBadImages(ds)[2]
    assert "\\xff\\xfe.png" in str(caught.value)


def test_write_text_atomically_takes_any_name(tmp_path: Path) -> None:
    write_text_atomically(tmp_path / "report.md", f"skipped `{ODD_NAME}`\n")
    assert (tmp_path / "report.md").read_text(encoding="utf-8") == "skipped `\\udcff\\udcfe.png`\n"
    assert os.listdir(tmp_path) == ["report.md"]  # no temporary file left


def test_fit_reports_a_skipped_file_with_an_undecodable_name(tmp_path: Path) -> None:
    """The issue's run: ``images.scan=true``, ``images.on_bad=skip``, file ``b"\\xff\\xfe.png"``."""
    root = tmp_path / "data"
    write_tree(root / "train", {"a": 8, "b": 8}, size=12)
    write_tree(root / "val", {"a": 2, "b": 2}, size=12)
    (root / "train" / "a" / ODD_NAME).write_text("this is no image")
    data = SSLDataModule(
        dataset="folder",
        root=str(root),
        image_size=16,
        batch_size=8,
        num_local_crops=0,
        images={"scan": True, "on_bad": "skip"},
    )
    run_dir = tmp_path / "run"
    fit_tiny(run_dir, FOLDER_MODEL | {"prototypes": "joint"}, data)
    shown = f"{root}/train/a/\\xff\\xfe.png"
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["skipped_images"]["files"] == {"train": [shown]}
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert f"e.g. `{shown}`" in report
    assert not [name for name in os.listdir(run_dir) if name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------
# 10. Decompression bombs: refused from the header, before a pixel is decoded.


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any image decoded from now on fails the test."""

    def load(self: ImageFile.ImageFile) -> None:
        raise AssertionError(f"decoded {self.size}")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_small_file_declaring_a_huge_image_is_refused_undecoded(
    tmp_path: Path, no_decoding: None
) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(12_000, 12_000))  # the file: 1.4 GB once decoded
    assert path.stat().st_size < 20_000 and MAX_IMAGE_PIXELS < 12_000 * 12_000
    with pytest.raises(BadImageError) as caught:
        decode_image(path, "RGB")
    assert str(caught.value) == (
        f"unreadable image {path}: too large, 12000 x 12000 = 144,000,000 pixels, over the "
        "limit of 89,478,485 (a decompression bomb?); raise max_image_pixels to read it"
    )
    assert caught.value.path == str(path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pillows_own_bomb_error_is_a_bad_image(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(20_000, 20_000))  # over twice Pillow's limit: Pillow refuses
    with pytest.raises(BadImageError, match=f"^unreadable image {path}: too large \\(Image size"):
        decode_image(path, "L", max_image_pixels=None)


def test_the_pixel_limit_is_a_dataset_argument_and_the_policy_applies(tmp_path: Path) -> None:
    paths = write_tree(tmp_path, {"a": 2, "b": 2}, size=8)  # 64 pixels each
    big = tmp_path / "b" / "big.png"
    big.write_bytes(encode(image_pixels(5, size=9), "PNG"))  # 81 pixels
    ds = ClassFolderImages(tmp_path, max_image_pixels=64)
    bad = scan_images(ds, workers=2)
    assert [b.path for b in bad] == [str(big)]
    assert "too large, 9 x 9 = 81 pixels, over the limit of 64" in bad[0].reason
    assert drop_bad_images(ds, bad).tolist() == [0, 1, 3, 4]
    image, label = SkipBadImages(ds)[2]  # big.png, skipped for the next file of class b
    np.testing.assert_array_equal(np.asarray(image), image_pixels(2))
    assert label == 1 and Path(ds.samples[3][0]) == paths[2]
    assert ClassFolderImages(tmp_path, max_image_pixels=None)[2][0].size == (9, 9)
    assert ClassFolderImages(tmp_path)[2][0].size == (9, 9)  # the default limit is far above
    for wrong in (0, -1, 1.5, True, "64"):
        with pytest.raises(ValueError, match="max_image_pixels must be a positive integer"):
            ClassFolderImages(tmp_path, max_image_pixels=wrong)  # type: ignore[arg-type]


def test_png_bytes_helper_round_trips() -> None:
    image = Image.open(io.BytesIO(png_bytes(3, 2, 8, 0, [bytes([0, 1, 2]), bytes([3, 4, 5])])))
    np.testing.assert_array_equal(np.asarray(image), [[0, 1, 2], [3, 4, 5]])
