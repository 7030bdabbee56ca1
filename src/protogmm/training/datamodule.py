"""The Lightning data module: multi-crop training views and the k-NN monitor's splits.

Datasets (``data.dataset``):

- ``mnist5k``: the embedded MNIST-5k (no download), split train / test by
  ``test_fraction``;
- ``synthetic``: Gaussian-blob images with a long-tailed class profile (tests);
- ``folder``: class folders in torchvision's ImageFolder layout under ``data.root``. If
  ``root/train`` and ``root/val`` (or ``root/test``) exist they are the two splits (and must
  hold the same class folders); otherwise ``root``'s sub-folders are the classes and a
  seeded stratified split holds out ``test_fraction`` of each class;
- ``cifar10`` / ``cifar100``: the python-version pickles under ``data.root`` (official
  train / test split).

The training split can be subsampled to a long tail (``data.imbalance.ratio`` > 1,
:func:`protogmm.data.long_tail_subset`); the held-out split stays as it is (balanced for
the benchmarks), as in CIFAR-LT and ImageNet-LT. The k-NN monitor's memory bank is the
(long-tailed) training split. The per-class counts of the training split are written to
``class_counts.json`` in the run directory (:class:`protogmm.training.callbacks.RunReport`).

Unreadable image files (``folder`` only; the other datasets are arrays) follow
``data.images.on_bad`` and ``data.images.scan``: see :mod:`protogmm.data.bad_images`. Files on disk
(``folder``, CIFAR) are listed, and scanned when asked, as the data module is built, so
layout errors and unreadable files stop a run before its trainer starts.

The arguments, some in small groups (``data.synthetic.*``, ``data.imbalance.*``,
``data.images.*``, ``data.longtail.*``, ``data.knn.*``), are defined and checked by
:mod:`protogmm.training.data_settings`, the splits built by
:mod:`protogmm.training.data_splits` and ``class_counts.json`` assembled by
:mod:`protogmm.training.class_counts`; the data module ties them to Lightning.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision.transforms import Compose

from protogmm._checks import check_choice
from protogmm.data import (
    ConvertMode,
    LabelledSubset,
    MultiCropTransform,
    SkipBadImages,
    TransformedDataset,
    eval_transform,
    hash_order,
    long_tail_subset,
)
from protogmm.data.longtail import LongTailSubset
from protogmm.evaluation.longtail import FrequencyGroups, frequency_groups
from protogmm.training.atomic_io import read_checkpoint
from protogmm.training.class_counts import class_counts, class_counts_json
from protogmm.training.data_position import resume_loader, training_loader
from protogmm.training.data_settings import (  # noqa: F401 (DATASETS: imported from here)
    DATA_GROUPS,
    DATASETS,
    FILE_DATASETS,
    DatasetName,
    ImageReading,
    Imbalance,
    KnnBank,
    LongTailGroups,
    SyntheticData,
    check_data_settings,
    group_value,
    plain_group,
)
from protogmm.training.data_splits import base_splits
from protogmm.training.legacy_hparams import upgrade_data_hparams

#: The k-NN monitor keeps both eval-transformed splits in memory up to this size (float32):
#: MNIST-5k takes 16 MB, CIFAR-10 at 32 px 737 MB; ImageNet is streamed.
KNN_CACHE_BYTES = 1 << 30
#: An evaluation batch holds at most this many input values (16 M: 64 MB of float32).
EVAL_BATCH_VALUES = 1 << 24


class SSLDataModule(L.LightningDataModule):
    """Labelled images as multi-crop views for pretraining, plus eval views for k-NN.

    Labels are never used by training; the held-out split feeds the online k-NN monitor and
    the splits' labels the long-tail analysis of the run report.

    Args:
        dataset: ``"mnist5k"`` (embedded, no download), ``"synthetic"``, ``"folder"``,
            ``"cifar10"`` or ``"cifar100"`` (see the module docstring).
        batch_size: images per step (per device).
        num_workers: DataLoader worker processes.
        num_local_crops: L, local crops per image (plus 2 global crops).
        global_scale: RandomResizedCrop area range of the global crops.
        local_scale: RandomResizedCrop area range of the local crops.
        local_size: local crop size in pixels (default: 3/7 of the image size, as 96/224).
        flip: random horizontal flips.
        max_train_samples: pretrain on only the first N training images (0: all); the
            k-NN memory bank keeps the whole training split. For quick runs.
        seed: split, subsampling and shuffling seed (the data order is a function of seed
            and epoch).
        root: the folder of ``folder`` and ``cifar10`` / ``cifar100`` data.
        image_size: side of the global crops and evaluation images; default the dataset's
            (28 MNIST-5k, ``synthetic.image_size``, 32 CIFAR); required for ``folder``.
        in_channels: 1 (grayscale) or 3 (RGB); default the dataset's (1 for MNIST-5k and
            synthetic, 3 for CIFAR and folders); images are converted to it.
        test_fraction: held-out share of each class (MNIST-5k, single-folder ``folder``).
        synthetic: the synthetic dataset (:class:`SyntheticData`: ``samples``, ``classes``,
            ``image_size``, ``imbalance_ratio``).
        imbalance: long-tail subsampling of the training split (:class:`Imbalance`:
            ``ratio``, ``n_max``, ``class_order``).
        images: unreadable and oversized image files (:class:`ImageReading`: ``on_bad``,
            ``scan``, ``max_pixels``).
        longtail: the run report's frequency groups (:class:`LongTailGroups`:
            ``thresholds``, ``relative``).
        knn: the k-NN bank (:class:`KnnBank`: ``train_samples``, ``test_samples``).

    Each group may also be given as a mapping of its options (those that differ from the
    defaults); the hyperparameters hold every group as such a plain mapping.
    """

    def __init__(
        self,
        dataset: DatasetName = "mnist5k",
        batch_size: int = 128,
        num_workers: int = 0,
        num_local_crops: int = 4,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        local_size: int | None = None,
        flip: bool = False,
        max_train_samples: int = 0,
        seed: int = 0,
        root: str | None = None,
        image_size: int | None = None,
        in_channels: int | None = None,
        test_fraction: float = 0.2,
        # Frozen values, never mutated: a shared default is safe.
        synthetic: SyntheticData = SyntheticData(),  # noqa: B008
        imbalance: Imbalance = Imbalance(),  # noqa: B008
        images: ImageReading = ImageReading(),  # noqa: B008
        longtail: LongTailGroups = LongTailGroups(),  # noqa: B008
        knn: KnnBank = KnnBank(),  # noqa: B008
    ) -> None:
        super().__init__()
        self.synthetic = group_value(SyntheticData, synthetic)
        self.imbalance = group_value(Imbalance, imbalance)
        self.images = group_value(ImageReading, images)
        self.longtail = group_value(LongTailGroups, longtail)
        self.knn = group_value(KnnBank, knn)
        self.save_hyperparameters(ignore=list(DATA_GROUPS))
        # The groups as plain mappings: checkpoints stay readable with weights_only=True.
        self.save_hyperparameters({name: plain_group(getattr(self, name)) for name in DATA_GROUPS})
        # Checked as passed (None where the dataset decides), then the resolved values are
        # stored, not None: Lightning merges these hparams with the model's, which get the
        # same values (linked by the CLI), and refuses keys whose values differ.
        image_size, in_channels = check_data_settings(self.hparams)
        self.save_hyperparameters({"image_size": image_size, "in_channels": in_channels})
        self.image_size, self.in_channels = image_size, in_channels
        self.image_mode = "L" if in_channels == 1 else "RGB"
        try:
            self.train_transform = MultiCropTransform(
                self.image_size,
                in_channels=self.in_channels,
                num_local=num_local_crops,
                global_scale=tuple(global_scale),
                local_scale=tuple(local_scale),
                local_size=local_size,
                flip=flip,
            )
        except ValueError as error:
            raise ValueError(f"data: {error}") from None
        self._eval_transform = eval_transform(self.image_size, self.in_channels)
        self._splits: dict[str, Dataset] = {}
        self._scan_skipped: dict[str, list[str]] = {}
        self._knn_cache: list[TensorDataset] | None = None
        self._restored_skips: dict[str, list[str]] = {}
        self._resume_state: dict[str, Any] | None = None
        self.long_tail_subset: LongTailSubset | None = None
        if dataset in FILE_DATASETS:
            # List (and scan) the files now: a missing folder, mismatched classes or an
            # unreadable file is then a one-line error before the trainer is even built.
            self.labelled_split("train")

    @classmethod
    def from_hparams(cls, hparams: Mapping[str, Any]) -> SSLDataModule:
        """A data module from its hyperparameters in either layout: today's, or the flat one
        of checkpoints and configs before the groups (``synthetic_samples``, ...;
        :func:`~protogmm.training.legacy_hparams.upgrade_data_hparams`). Keys that are no
        argument (e.g. Lightning's own) are left out."""
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        upgraded = upgrade_data_hparams(hparams)
        return cls(**{key: value for key, value in upgraded.items() if key in accepted})

    # ------------------------------------------------------------------ datasets
    def labelled_split(self, split: str) -> Any:
        """The labelled ``"train"`` (long-tailed if asked) or ``"test"`` split, cached.

        Untransformed (PIL images); with ``images.on_bad="skip"`` wrapped in
        :class:`protogmm.data.SkipBadImages`.
        """
        check_choice("split", split, ("train", "test"))
        if not self._splits:
            splits = base_splits(self.hparams, self.in_channels, self._scan_skipped)
            hp, imbalance = self.hparams, self.imbalance
            if imbalance.active:
                train = splits["train"]
                self.long_tail_subset = long_tail_subset(
                    train.labels,
                    imbalance.ratio,
                    num_classes=len(train.classes),
                    n_max=imbalance.n_max,
                    class_order=imbalance.class_order,
                    seed=hp.seed,
                    class_names=list(train.classes),
                )
                splits["train"] = LabelledSubset(train, self.long_tail_subset.indices)
            if self.images.on_bad == "skip" and hp.dataset == "folder":
                splits = {name: SkipBadImages(ds) for name, ds in splits.items()}
            self._splits = splits
        return self._splits[split]

    def _with_transform(self, dataset: Dataset, transform: Any) -> Dataset:
        if self.hparams.dataset == "folder":  # decoded straight into the right mode
            return TransformedDataset(dataset, transform)
        return TransformedDataset(dataset, Compose([ConvertMode(self.image_mode), transform]))

    def setup(self, stage: str | None = None) -> None:
        train = self.labelled_split("train")
        self.labelled_split("test")  # unreadable files and class mismatches fail before fit
        if self.hparams.max_train_samples:
            train = LabelledSubset(train, range(min(self.hparams.max_train_samples, len(train))))
        self.train_set = self._with_transform(train, self.train_transform)
        self.pretraining_labels = np.asarray(train.labels)

    def train_dataloader(self) -> StatefulDataLoader:
        # Whole batches of a (seed, epoch) permutation, this rank's shard under DDP
        # (DistributedSampler's split); a torchdata StatefulDataLoader, whose state Lightning
        # checkpoints, so a mid-epoch resume continues with the next batch
        # (training/data_position.py).
        world_size = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        per_process = len(self.train_set) // world_size
        if per_process < self.hparams.batch_size:
            # Whole batches only (drop_last): the run would take no step and report success.
            raise ValueError(
                f"data.batch_size: {self.hparams.batch_size} images per step exceed the "
                f"{per_process} training images each of the {world_size} process(es) gets "
                f"({self.hparams.dataset}, {len(self.train_set)} images): no step would run; "
                "lower data.batch_size"
            )
        loader = training_loader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            seed=self.hparams.seed,
            rank=rank,
            world_size=world_size,
        )
        if self._resume_state is not None:
            resume_loader(loader, self._resume_state)
            self._resume_state = None
        return loader

    def resume_training_loader(self, state: dict[str, Any]) -> None:
        """Start the next training loader at a checkpoint's loader state (a resume:
        :class:`~protogmm.training.data_position.DataPosition` hands it over)."""
        self._resume_state = state

    def knn_splits(self) -> tuple[Dataset, Dataset]:
        """The k-NN bank and queries: labelled (train, held-out) splits, untransformed, each
        at most ``knn.train_samples`` / ``knn.test_samples`` images (a seeded subset)."""
        bounded = []
        for split, limit in (("train", self.knn.train_samples), ("test", self.knn.test_samples)):
            data = self.labelled_split(split)
            if limit and len(data) > limit:
                order = hash_order(len(data), self.hparams.seed + 1)[:limit]
                data = LabelledSubset(data, np.sort(order).tolist())
            bounded.append(data)
        return bounded[0], bounded[1]

    def knn_image_bytes(self) -> int:
        """Bytes of the k-NN bank and queries as float32 images (the raw-pixel features)."""
        return sum(map(len, self.knn_splits())) * 4 * self.in_channels * self.image_size**2

    def knn_dataloaders(self) -> tuple[DataLoader, DataLoader]:
        """Eval-transformed (train, held-out) loaders of :meth:`knn_splits`.

        The eval transform is deterministic, so when both splits fit
        :data:`KNN_CACHE_BYTES` as float32 they are decoded and transformed once and kept
        in memory: the monitor reads them three times before the first step (untrained
        encoder, pixels) and once per epoch (on MNIST-5k this was 40 % of the quick demo).
        Larger banks are streamed from disk at every evaluation.
        """
        splits = [self._with_transform(data, self._eval_transform) for data in self.knn_splits()]
        if self._knn_cache is None and self.knn_image_bytes() <= KNN_CACHE_BYTES:
            self._knn_cache = [TensorDataset(*self._decoded(split)) for split in splits]
        if self._knn_cache is not None:
            splits = self._knn_cache
        return tuple(self._eval_loader(split) for split in splits)

    def _eval_loader(self, split: Dataset) -> DataLoader:
        # Its own generator: an iterator draws a base seed when it starts, and from the global
        # RNG that draw would make training depend on how often the monitor evaluates (a
        # resumed run evaluates at other moments than the uninterrupted one).
        workers = 0 if isinstance(split, TensorDataset) else self.hparams.num_workers
        return DataLoader(
            split,
            batch_size=self.eval_batch_size(),
            num_workers=workers,
            shuffle=False,
            generator=torch.Generator(),
        )

    def eval_batch_size(self) -> int:
        """Images per evaluation batch: 512, or fewer so that a batch holds at most
        :data:`EVAL_BATCH_VALUES` input values (at 224 px RGB: 111 images; 512 of them put a
        ConvNet's activations at 7 GB on CPU)."""
        values = self.in_channels * self.image_size**2
        return max(1, min(512, EVAL_BATCH_VALUES // values))

    def _decoded(self, split: Dataset) -> tuple[Tensor, Tensor]:
        """Every (image, label) of ``split`` as two stacked tensors."""
        loader = self._eval_loader(split)
        images, labels = zip(*loader, strict=True)
        return torch.cat(images), torch.cat([torch.as_tensor(y).long() for y in labels])

    # ------------------------------------------------------------------ long tail
    def train_class_counts(self) -> list[int]:
        """Training images per class (after long-tail subsampling and dropped files)."""
        return class_counts(self.labelled_split("train"))

    def frequency_groups(self) -> FrequencyGroups:
        """The training classes split many / medium / few by ``longtail.thresholds``."""
        many, few = self.longtail.thresholds
        return frequency_groups(
            self.train_class_counts(), many, few, relative=self.longtail.relative
        )

    def is_long_tailed(self) -> bool:
        """True when the frequency groups put the classes in at least two groups.

        The per-group analysis compares groups, so it is run (report, ``diagnose``) only
        then: balanced data (MNIST-5k) or a mild imbalance within one group is skipped.
        """
        return len(self.frequency_groups().non_empty()) >= 2

    def class_counts_record(self) -> dict[str, Any]:
        """What ``class_counts.json`` holds: the training split's per-class counts."""
        return class_counts_json(
            self.hparams,
            self.labelled_split("train"),
            self.labelled_split("test"),
            groups=self.frequency_groups(),
            long_tail=self.long_tail_subset,
            pretraining_labels=getattr(self, "pretraining_labels", None),
        )

    # ------------------------------------------------------------------ unreadable files
    def skipped_images(self) -> dict[str, list[str]]:
        """Paths of the files skipped so far (scan and first touch), by split, sorted."""
        skipped: dict[str, set[str]] = {}
        for split, paths in (*self._scan_skipped.items(), *self._restored_skips.items()):
            skipped.setdefault(split, set()).update(paths)
        for split, dataset in self._splits.items():
            if isinstance(dataset, SkipBadImages):
                skipped.setdefault(split, set()).update(dataset.skipped_paths())
        return {split: sorted(paths) for split, paths in skipped.items() if paths}

    def skip_flags(self) -> dict[str, torch.Tensor]:
        """The first-touch skip flags of each split (to combine across DDP ranks)."""
        return {
            split: torch.from_numpy(np.isin(np.arange(len(ds)), ds.skipped_indices()))
            for split, ds in self._splits.items()
            if isinstance(ds, SkipBadImages)
        }

    def mark_skipped(self, split: str, flags: torch.Tensor) -> None:
        """Record first-touch skips found elsewhere (another DDP rank)."""
        dataset = self._splits.get(split)
        if isinstance(dataset, SkipBadImages):
            dataset.mark_skipped(torch.nonzero(flags).flatten().tolist())

    def state_dict(self) -> dict[str, Any]:
        # Files skipped before a checkpoint stay counted after resuming from it.
        return {"skipped_images": self.skipped_images()} if self.skipped_images() else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_skips = {k: list(v) for k, v in state_dict.get("skipped_images", {}).items()}


def datamodule_from_checkpoint(path: str | Path, **overrides: Any) -> SSLDataModule:
    """The data module a ``protogmm fit`` checkpoint was trained with (weights-only read).

    Lightning stores the data module's arguments in the checkpoint
    (``datamodule_hyper_parameters``), in either layout (the flat one of before the groups
    is upgraded); ``overrides`` replace some (e.g. ``root`` when the data moved), a group's
    mapping only the options it names (``synthetic={"samples": 64}``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the checkpoint holds no data-module arguments.
    """
    checkpoint = read_checkpoint(path)
    stored = checkpoint.get(SSLDataModule.CHECKPOINT_HYPER_PARAMS_KEY)
    if not stored:
        raise ValueError(f"{path}: holds no data-module arguments; pass --data NAME instead")
    return SSLDataModule.from_hparams(
        merge_data_settings(upgrade_data_hparams(stored), upgrade_data_hparams(overrides))
    )


def merge_data_settings(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` on top; a group given as a mapping on both sides is merged
    option by option (a group's value, e.g. :class:`SyntheticData`, replaces it whole)."""
    merged = dict(base)
    for key, value in overrides.items():
        if key in DATA_GROUPS and isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            value = {**base[key], **value}
        merged[key] = value
    return merged
