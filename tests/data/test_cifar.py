"""CIFAR-10/100 from local python pickles: layout, exact pixels, where-to-put-them errors."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from imagefiles import write_cifar
from PIL import Image

from protogmm.data import CIFARImages, cifar_folder, read_cifar_pickle


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
def test_reads_the_official_layout_with_exact_pixels(tmp_path: Path, variant: str) -> None:
    written = write_cifar(tmp_path, variant, per_file=4)
    train = CIFARImages(tmp_path, "train", variant)
    test = CIFARImages(tmp_path, "test", variant)
    batches = len(written["train"])
    assert len(train) == 4 * batches and len(test) == 4
    assert train.classes == written["classes"] and train.num_classes == len(written["classes"])
    assert train.labels.tolist() == [y for _, labels in written["train"] for y in labels]
    data, labels = written["test"][0]
    # Row i of 'data': 1024 red, then 1024 green, then 1024 blue values, row-major 32 x 32.
    for i in range(4):
        image, label = test[i]
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (32, 32)
        pixels = np.asarray(image)
        for channel in range(3):
            expected = data[i, 1024 * channel : 1024 * (channel + 1)].reshape(32, 32)
            np.testing.assert_array_equal(pixels[..., channel], expected)
        assert label == labels[i]
    assert (train.image_size, train.in_channels) == (32, 3)


def test_root_may_be_the_official_folder_itself(tmp_path: Path) -> None:
    written = write_cifar(tmp_path, "cifar10", per_file=2)
    assert cifar_folder(written["folder"], "cifar10") == written["folder"]
    assert len(CIFARImages(written["folder"], "test")) == 2


@pytest.mark.parametrize(
    ("variant", "folder"), [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")]
)
def test_missing_files_say_where_to_put_them(tmp_path: Path, variant: str, folder: str) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        CIFARImages(tmp_path, "train", variant)
    message = str(caught.value)
    assert f"expected {tmp_path / folder}/" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message
    assert f"extract it into {tmp_path}" in message and "never downloads" in message
    assert "\n" not in message


def test_one_missing_file_is_named(tmp_path: Path) -> None:
    written = write_cifar(tmp_path, "cifar10", per_file=2)
    os.remove(written["folder"] / "data_batch_3")
    with pytest.raises(FileNotFoundError, match=r"\(missing: data_batch_3\);"):
        CIFARImages(tmp_path)


def test_bad_content_names_the_file(tmp_path: Path) -> None:
    written = write_cifar(tmp_path, "cifar10", per_file=2)
    path = written["folder"] / "test_batch"
    with open(path, "wb") as handle:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, handle)
    with pytest.raises(
        ValueError,
        match=f"CIFAR file {path}: 'data' must be an \\[N, 3072\\] array, got \\(2, 100\\)",
    ):
        CIFARImages(tmp_path, "test")
    with open(path, "wb") as handle:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, handle)
    with pytest.raises(ValueError, match=f"CIFAR file {path}: 'labels' must lie in \\[0, 10\\)"):
        CIFARImages(tmp_path, "test")
    path.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=f"cannot read CIFAR file {path}"):
        CIFARImages(tmp_path, "test")


class _RunsCode:
    def __reduce__(self) -> tuple:
        return (os.getcwd, ())


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil"
    with open(path, "wb") as handle:
        pickle.dump({"data": _RunsCode()}, handle)
    with pytest.raises(ValueError, match="refusing to load the global posix.getcwd"):
        read_cifar_pickle(path)


def test_python2_era_numpy_core_pickles_load(tmp_path: Path) -> None:
    # The official files were written before NumPy 2 and name numpy.core.multiarray.
    payload = pickle.dumps({"data": np.arange(6, dtype=np.uint8)}, protocol=2)
    payload = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    (tmp_path / "old").write_bytes(payload)
    assert read_cifar_pickle(tmp_path / "old")["data"].tolist() == list(range(6))
