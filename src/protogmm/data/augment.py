"""Image transforms: DINO multi-crop for training, a deterministic one for evaluation.

Multi-crop (Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments" (SwAV), NeurIPS 2020; as used by DINO, Caron et al., "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021, ``DataAugmentationDINO`` in
facebookresearch/dino): two large "global" crops and several small "local" crops of each
image. DINO's recipe for 224 px ImageNet (global 224 px at scale (0.4, 1), local 96 px at
scale (0.05, 0.4)) is scaled here to any image size: the local side defaults to 3/7 of the
global one (96/224), and the blur kernel to about 10% of the crop side (SimCLR, Chen et al.
2020, Appendix A).

Randomness comes from torch's global generator (torchvision.transforms.v2), so
``torch.manual_seed`` makes the views reproducible; DataLoader workers get distinct seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from protogmm._checks import check_in_range, check_positive_int

__all__ = [
    "ConvertMode",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "MultiCropTransform",
    "blur_kernel_size",
    "eval_transform",
    "normalization_stats",
]

MNIST_MEAN: tuple[float, ...] = (0.1307,)
MNIST_STD: tuple[float, ...] = (0.3081,)
IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)


def _check_channels(in_channels: int) -> int:
    if isinstance(in_channels, bool) or in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
    return in_channels


def normalization_stats(
    in_channels: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel normalisation constants, defaulting to MNIST (1 channel) or ImageNet (3).

    Args:
        in_channels: 1 or 3.
        mean: one value per channel, or None for the default.
        std: one positive value per channel, or None for the default.

    Returns:
        ``(mean, std)`` as tuples of ``in_channels`` floats.
    """
    _check_channels(in_channels)
    default_mean, default_std = (
        (MNIST_MEAN, MNIST_STD) if in_channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    )
    mean = tuple(float(m) for m in (default_mean if mean is None else mean))
    std = tuple(float(s) for s in (default_std if std is None else std))
    if len(mean) != in_channels or not all(math.isfinite(m) for m in mean):
        raise ValueError(f"mean must hold {in_channels} finite value(s), got {mean!r}")
    if len(std) != in_channels or not all(math.isfinite(s) and s > 0 for s in std):
        raise ValueError(f"std must hold {in_channels} positive value(s), got {std!r}")
    return mean, std


def blur_kernel_size(crop_size: int) -> int:
    """Gaussian-blur kernel side for a crop: about 10% of it (SimCLR), odd, at least 3."""
    size = max(3, round(0.1 * crop_size))
    return size if size % 2 == 1 else size + 1


def _check_interval(
    name: str, value: Sequence[float], low: float, high: float
) -> tuple[float, float]:
    """A pair ``(a, b)`` with ``low < a <= b <= high``, else a ValueError naming it."""
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    if ok:
        a, b = value
        ok = all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in (a, b)
        )
        ok = ok and low < a <= b <= high
    if not ok:
        raise ValueError(
            f"{name} must be a pair (min, max) with {low} < min <= max <= {high}, got {value!r}"
        )
    return float(value[0]), float(value[1])


class ConvertMode:
    """PIL image -> the same image in PIL ``mode`` (``"L"`` or ``"RGB"``); no-op if it is.

    Lets a grayscale dataset feed an RGB model (channels repeated) and an RGB one a
    grayscale model (ITU-R 601-2 luma, Pillow's ``convert("L")``).
    """

    def __init__(self, mode: str) -> None:
        if mode not in ("L", "RGB"):
            raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
        self.mode = mode

    def __call__(self, image: Any) -> Any:
        return image if image.mode == self.mode else image.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode!r})"


class _AsUint8Image:
    """PIL image, uint8/float array or tensor -> uint8 ``tv_tensors.Image`` with a channel check.

    Working on uint8 makes solarisation's threshold (128, as PIL and DINO) meaningful for
    every input type; the channel check stops a 3-channel image from being silently
    broadcast against 1-channel normalisation constants.
    """

    def __init__(self, in_channels: int) -> None:
        self.in_channels = in_channels

    def __call__(self, image: Any) -> tv_tensors.Image:
        out = TF.to_dtype(TF.to_image(image), torch.uint8, scale=True)
        if out.ndim != 3 or out.shape[0] != self.in_channels:
            raise ValueError(
                f"image must have {self.in_channels} channel(s) as [C, H, W] "
                f"(in_channels={self.in_channels}), got shape {tuple(out.shape)}"
            )
        return out


class _ToFloatTensor:
    """uint8 image -> normalised float32 plain ``Tensor`` (no tv_tensors subclass downstream)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.finish = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def __call__(self, image: Tensor) -> Tensor:
        return self.finish(image).as_subclass(Tensor)


class MultiCropTransform:
    """DINO multi-crop: two global views, then ``num_local`` local views of one image.

    Per view, as ``DataAugmentationDINO`` (Caron et al. 2021; multi-crop from SwAV, Caron
    et al. 2020): random resized crop (bicubic, antialiased); horizontal flip (p = 0.5);
    for RGB only, colour jitter (brightness, contrast, saturation, hue =
    ``s, s, s/2, s/4`` with ``s = color_jitter``, applied with p = 0.8) and grayscale
    (p = ``grayscale_prob``); Gaussian blur with p = 1.0 / 0.1 on the two global views and
    0.5 on the local ones; solarisation (p = 0.2) on the second global view only; then
    conversion to float32 in [0, 1] and per-channel normalisation.

    Digits: a horizontal flip changes some digits' shape (2, 3, 7 read differently), yet it
    is DINO's default and is kept on; pass ``flip=False`` to study its effect.

    Args:
        image_size: side of the global views, >= 8.
        in_channels: 1 (grayscale) or 3 (RGB); input images must have this many channels.
        num_local: number of local views L, >= 0.
        global_scale: (min, max) area fraction of the global crops, in (0, 1].
        local_scale: (min, max) area fraction of the local crops, in (0, 1].
        local_size: side of the local views, 4 <= local_size <= image_size; default
            ``max(8, round(image_size * 3 / 7))`` (DINO's 96 / 224).
        flip: random horizontal flip.
        color_jitter: colour-jitter strength s >= 0 (RGB only; 0 disables it).
        grayscale_prob: probability of converting an RGB view to grayscale.
        blur_prob: blur probabilities of the first and second global views.
        local_blur_prob: blur probability of each local view.
        blur_sigma: (min, max) of the blur's standard deviation, in pixels.
        solarize_prob: solarisation probability of the second global view.
        mean: per-channel mean; default MNIST's (1 channel) or ImageNet's (3).
        std: per-channel standard deviation; default as ``mean``.

    Call it on a PIL image (or a uint8 / [0, 1] float [C, H, W] tensor or [H, W(, C)] array)
    to get ``2 + num_local`` float32 tensors: the global views ``[C, image_size,
    image_size]`` first, then the local ones ``[C, local_size, local_size]``.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int = 1,
        num_local: int = 4,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        local_size: int | None = None,
        flip: bool = True,
        color_jitter: float = 0.4,
        grayscale_prob: float = 0.2,
        blur_prob: tuple[float, float] = (1.0, 0.1),
        local_blur_prob: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize_prob: float = 0.2,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        check_positive_int("image_size", image_size, minimum=8)
        _check_channels(in_channels)
        check_positive_int("num_local", num_local, minimum=0)
        global_scale = _check_interval("global_scale", global_scale, 0.0, 1.0)
        local_scale = _check_interval("local_scale", local_scale, 0.0, 1.0)
        if local_size is None:
            local_size = max(8, round(image_size * 3 / 7))
        check_positive_int("local_size", local_size, minimum=4)
        if local_size > image_size:
            raise ValueError(
                f"local_size must be <= image_size={image_size} (local crops larger than the "
                f"global image), got {local_size!r}"
            )
        check_in_range("color_jitter", color_jitter, 0.0, math.inf)
        check_in_range("grayscale_prob", grayscale_prob, 0.0, 1.0)
        if not isinstance(blur_prob, (tuple, list)) or len(blur_prob) != 2:
            raise ValueError(f"blur_prob must be a pair of probabilities, got {blur_prob!r}")
        blur_prob = tuple(check_in_range("blur_prob", p, 0.0, 1.0) for p in blur_prob)
        check_in_range("local_blur_prob", local_blur_prob, 0.0, 1.0)
        blur_sigma = _check_interval("blur_sigma", blur_sigma, 0.0, math.inf)
        check_in_range("solarize_prob", solarize_prob, 0.0, 1.0)
        mean, std = normalization_stats(in_channels, mean, std)

        self.image_size = image_size
        self.in_channels = in_channels
        self.num_local = num_local
        self.local_size = local_size
        self.mean, self.std = mean, std
        self._prepare = _AsUint8Image(in_channels)
        finish = _ToFloatTensor(mean, std)

        def view(size: int, scale: tuple[float, float], blur: float, solarize: float) -> v2.Compose:
            steps: list[Any] = [
                v2.RandomResizedCrop(
                    size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True
                )
            ]
            if flip:
                steps.append(v2.RandomHorizontalFlip(p=0.5))
            if in_channels == 3 and color_jitter > 0:
                s = color_jitter
                jitter = v2.ColorJitter(brightness=s, contrast=s, saturation=s / 2, hue=s / 4)
                steps.append(v2.RandomApply([jitter], p=0.8))
            if in_channels == 3 and grayscale_prob > 0:
                steps.append(v2.RandomGrayscale(p=grayscale_prob))
            if blur > 0:
                gauss = v2.GaussianBlur(blur_kernel_size(size), sigma=blur_sigma)
                steps.append(gauss if blur >= 1 else v2.RandomApply([gauss], p=blur))
            if solarize > 0:
                steps.append(v2.RandomSolarize(threshold=128, p=solarize))
            steps.append(finish)
            return v2.Compose(steps)

        self.global_views = (
            view(image_size, global_scale, blur_prob[0], 0.0),
            view(image_size, global_scale, blur_prob[1], solarize_prob),
        )
        self.local_view = view(local_size, local_scale, local_blur_prob, 0.0)

    def __call__(self, image: Any) -> list[Tensor]:
        """Return the two global views, then the local views, of ``image``."""
        base = self._prepare(image)
        views = [t(base) for t in self.global_views]
        views.extend(self.local_view(base) for _ in range(self.num_local))
        return views

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, in_channels="
            f"{self.in_channels}, num_local={self.num_local}, local_size={self.local_size})"
        )


#: Evaluation crops of at least this many pixels keep DINO's 256 -> 224 resize margin.
EVAL_MARGIN_MIN_SIZE = 96


def eval_transform(
    image_size: int,
    in_channels: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> v2.Compose:
    """Deterministic transform for feature extraction (k-NN, linear probe).

    Resize the shorter side and centre-crop a square of ``image_size``, then float32 in
    [0, 1] and the same normalisation as training. From :data:`EVAL_MARGIN_MIN_SIZE` px on,
    the resize keeps DINO's margin (``eval_knn.py``: shorter side 256, crop 224, i.e.
    ``round(image_size * 256 / 224)``); smaller images, which cannot spare it, are resized
    to ``image_size`` itself.

    Returns:
        A callable mapping a PIL image (or uint8 / float tensor) to a float32
        ``[in_channels, image_size, image_size]`` tensor.
    """
    check_positive_int("image_size", image_size)
    mean, std = normalization_stats(in_channels, mean, std)
    return v2.Compose(
        [
            _AsUint8Image(in_channels),
            v2.Resize(
                round(image_size * 256 / 224) if image_size >= EVAL_MARGIN_MIN_SIZE else image_size,
                interpolation=v2.InterpolationMode.BICUBIC,
                antialias=True,
            ),
            v2.CenterCrop(image_size),
            _ToFloatTensor(mean, std),
        ]
    )
