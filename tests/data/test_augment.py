"""DINO multi-crop and the evaluation transform: shapes, dtypes, randomness, validation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from protogmm.data import (
    IMAGENET_MEAN,
    MNIST_MEAN,
    MNIST_STD,
    MultiCropTransform,
    blur_kernel_size,
    eval_transform,
    normalization_stats,
)


def _gray(size: int = 28, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8))


def _rgb(size: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("image_size", "in_channels", "num_local", "local_size"),
    [(28, 1, 4, 12), (16, 1, 6, 8), (32, 3, 2, 14), (8, 1, 1, 8), (28, 1, 0, 12)],
)
def test_views_shapes_and_dtypes(
    image_size: int, in_channels: int, num_local: int, local_size: int
) -> None:
    transform = MultiCropTransform(image_size, in_channels=in_channels, num_local=num_local)
    assert transform.local_size == local_size  # default: max(8, round(3/7 * image_size))
    image = _gray() if in_channels == 1 else _rgb()
    views = transform(image)
    assert len(views) == 2 + num_local
    shapes = [tuple(v.shape) for v in views]
    assert shapes[:2] == [(in_channels, image_size, image_size)] * 2
    assert shapes[2:] == [(in_channels, local_size, local_size)] * num_local
    for v in views:
        assert type(v) is torch.Tensor  # plain tensors, not tv_tensors subclasses
        assert v.dtype == torch.float32 and bool(torch.isfinite(v).all())


def test_normalisation_is_applied() -> None:
    # A black image maps to (0 - mean) / std everywhere, whatever the crop.
    black = Image.fromarray(np.zeros((28, 28), dtype=np.uint8))
    transform = MultiCropTransform(28, solarize_prob=0.0)
    expected = (0.0 - MNIST_MEAN[0]) / MNIST_STD[0]
    for v in transform(black):
        torch.testing.assert_close(v, torch.full_like(v, expected))
    custom = MultiCropTransform(28, mean=(0.5,), std=(0.25,), solarize_prob=0.0)
    for v in custom(black):
        torch.testing.assert_close(v, torch.full_like(v, -2.0))


def test_views_differ_and_seed_reproduces() -> None:
    transform = MultiCropTransform(28, num_local=4)
    image = _gray(seed=1)
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(0)
    second = transform(image)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[2], first[3])
    third = transform(image)  # the generator moved on: new views
    assert not torch.equal(first[0], third[0])


def test_accepts_arrays_and_tensors_like_pil() -> None:
    transform = MultiCropTransform(28, num_local=1)
    image = _gray(seed=2)
    array = np.array(image)
    for other in (array, torch.from_numpy(array)[None], torch.from_numpy(array)[None] / 255.0):
        torch.manual_seed(5)
        from_pil = transform(image)
        torch.manual_seed(5)
        from_other = transform(other)
        for a, b in zip(from_pil, from_other, strict=True):
            torch.testing.assert_close(a, b, atol=0.05, rtol=0)


def test_wrong_channel_count_is_rejected() -> None:
    with pytest.raises(ValueError, match="channel"):
        MultiCropTransform(28, in_channels=1)(_rgb(28))
    with pytest.raises(ValueError, match="channel"):
        MultiCropTransform(28, in_channels=3)(_gray(28))


def test_options_switch_steps_off() -> None:
    # No randomness except the crop: flip, blur, solarize, jitter all off. A full-scale
    # crop of the whole image (scale and ratio ranges pinned) is then the image itself.
    transform = MultiCropTransform(
        28,
        num_local=0,
        global_scale=(1.0, 1.0),
        flip=False,
        blur_prob=(0.0, 0.0),
        solarize_prob=0.0,
    )
    for step in transform.global_views[0].transforms:
        if hasattr(step, "ratio"):
            step.ratio = (1.0, 1.0)
    image = _gray(seed=3)
    views = transform(image)
    expected = (torch.from_numpy(np.array(image)).float() / 255 - MNIST_MEAN[0]) / MNIST_STD[0]
    torch.testing.assert_close(views[0][0], expected, atol=1e-5, rtol=0)


def test_rgb_pipeline_has_colour_steps_and_grayscale_does_not() -> None:
    def names(t: MultiCropTransform) -> str:
        return repr(t.global_views[0])

    assert "ColorJitter" in names(MultiCropTransform(32, in_channels=3))
    assert "Grayscale" in names(MultiCropTransform(32, in_channels=3))
    assert "ColorJitter" not in names(MultiCropTransform(28, in_channels=1))
    assert "ColorJitter" not in names(MultiCropTransform(32, in_channels=3, color_jitter=0.0))
    # Solarisation only on the second global view (DINO).
    t = MultiCropTransform(28)
    assert "Solarize" not in repr(t.global_views[0]) and "Solarize" in repr(t.global_views[1])
    assert "Solarize" not in repr(t.local_view)


def test_blur_kernel_scales_with_crop() -> None:
    assert [blur_kernel_size(s) for s in (8, 12, 28, 64, 96, 224)] == [3, 3, 3, 7, 11, 23]
    assert all(blur_kernel_size(s) % 2 == 1 for s in range(1, 300))


def test_transform_pickles_for_dataloader_workers() -> None:
    transform = MultiCropTransform(28, num_local=2)
    clone = pickle.loads(pickle.dumps(transform))
    torch.manual_seed(1)
    a = transform(_gray())
    torch.manual_seed(1)
    b = clone(_gray())
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [
        ({"image_size": 7}, "image_size"),
        ({"image_size": 28, "local_size": 29}, "local_size"),  # crop larger than the image
        ({"image_size": 28, "local_size": 3}, "local_size"),
        ({"image_size": 28, "num_local": -1}, "num_local"),
        ({"image_size": 28, "in_channels": 2}, "in_channels"),
        ({"image_size": 28, "global_scale": (0.0, 1.0)}, "global_scale"),
        ({"image_size": 28, "global_scale": (0.5, 1.2)}, "global_scale"),
        ({"image_size": 28, "local_scale": (0.4, 0.05)}, "local_scale"),
        ({"image_size": 28, "local_scale": (0.1,)}, "local_scale"),
        ({"image_size": 28, "color_jitter": -0.1}, "color_jitter"),
        ({"image_size": 28, "grayscale_prob": 1.5}, "grayscale_prob"),
        ({"image_size": 28, "blur_prob": (1.0, 1.1)}, "blur_prob"),
        ({"image_size": 28, "blur_prob": 0.5}, "blur_prob"),
        ({"image_size": 28, "local_blur_prob": -0.1}, "local_blur_prob"),
        ({"image_size": 28, "blur_sigma": (2.0, 0.1)}, "blur_sigma"),
        ({"image_size": 28, "solarize_prob": 2.0}, "solarize_prob"),
        ({"image_size": 28, "mean": (0.1, 0.2)}, "mean"),
        ({"image_size": 28, "std": (0.0,)}, "std"),
    ],
)
def test_bad_arguments_name_the_culprit(kwargs: dict, culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit):
        MultiCropTransform(**kwargs)


def test_normalization_defaults() -> None:
    assert normalization_stats(1) == (MNIST_MEAN, MNIST_STD)
    assert normalization_stats(3)[0] == IMAGENET_MEAN
    with pytest.raises(ValueError, match="in_channels"):
        normalization_stats(4)


def test_eval_transform_is_deterministic_and_resizes() -> None:
    transform = eval_transform(28, 1)
    image = _gray(seed=4)
    out = transform(image)
    assert type(out) is torch.Tensor and out.shape == (1, 28, 28) and out.dtype == torch.float32
    expected = (torch.from_numpy(np.array(image)).float() / 255 - MNIST_MEAN[0]) / MNIST_STD[0]
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=0)  # same size: no resize
    torch.testing.assert_close(transform(image), out)
    # Larger or non-square images: shorter side resized, then centre-cropped.
    big = eval_transform(16, 3)(Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)))
    assert big.shape == (3, 16, 16)
    with pytest.raises(ValueError, match="channel"):
        transform(_rgb(28))
    with pytest.raises(ValueError, match="image_size"):
        eval_transform(0, 1)


def test_large_eval_crops_keep_dinos_256_to_224_margin() -> None:
    # A 256 px image whose outer 16 px are white: DINO's resize 256 -> centre crop 224 cuts
    # exactly that border away; small images are resized to the crop itself (no margin).
    pixels = np.full((256, 256, 3), 255, dtype=np.uint8)
    pixels[16:-16, 16:-16] = 0
    image = Image.fromarray(pixels)
    transform = eval_transform(224, 3, mean=(0.0,) * 3, std=(1.0,) * 3)
    out = transform(image)
    assert tuple(out.shape) == (3, 224, 224) and float(out.max()) == 0.0
    small = eval_transform(32, 3, mean=(0.0,) * 3, std=(1.0,) * 3)(image.resize((32, 32)))
    assert float(small.max()) > 0.9  # the border is kept at 32 px
