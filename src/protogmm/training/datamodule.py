"""The Lightning data module: multi-crop training views and the k-NN monitor's splits."""

from __future__ import annotations

from typing import Literal

import lightning as L
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from protogmm._checks import check_choice, check_in_range, check_positive_int
from protogmm.data import EmbeddedMNIST, MultiCropTransform, SyntheticImages, eval_transform

DatasetName = Literal["mnist5k", "synthetic"]


class SSLDataModule(L.LightningDataModule):
    """Labelled images as multi-crop views for pretraining, plus eval views for k-NN.

    Labels are never used by training; the held-out split feeds the online k-NN monitor.

    Args:
        dataset: ``"mnist5k"`` (the embedded MNIST-5k, no download) or ``"synthetic"``.
        batch_size: images per step (per device).
        num_workers: DataLoader worker processes.
        num_local_crops: L, local crops per image (plus 2 global crops).
        global_scale: RandomResizedCrop area range of the global crops.
        local_scale: RandomResizedCrop area range of the local crops.
        local_size: local crop size in pixels (default: 3/7 of the image size, as 96/224).
        flip: random horizontal flips.
        max_train_samples: use only the first N training images (0: all); for quick runs.
        synthetic_samples: size of the synthetic dataset.
        synthetic_classes: classes of the synthetic dataset.
        synthetic_image_size: image size of the synthetic dataset.
        synthetic_imbalance_ratio: long-tail ratio rho of the synthetic dataset.
        seed: split and shuffling seed (the data order is a function of seed and epoch).
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
        synthetic_samples: int = 512,
        synthetic_classes: int = 10,
        synthetic_image_size: int = 16,
        synthetic_imbalance_ratio: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_choice("data.dataset", dataset, ("mnist5k", "synthetic"))
        check_positive_int("data.batch_size", batch_size)
        check_positive_int("data.num_workers", num_workers, minimum=0)
        check_positive_int("data.num_local_crops", num_local_crops, minimum=0)
        check_positive_int("data.max_train_samples", max_train_samples, minimum=0)
        check_in_range("data.synthetic_imbalance_ratio", synthetic_imbalance_ratio, 1.0, 1e6)
        self.save_hyperparameters()
        if dataset == "mnist5k":
            self.in_channels, self.image_size = 1, 28
        else:
            self.in_channels, self.image_size = 1, synthetic_image_size
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

    def _dataset(self, split: str, transform: object) -> Dataset:
        hp = self.hparams
        if hp.dataset == "mnist5k":
            return EmbeddedMNIST(split=split, seed=hp.seed, transform=transform)
        # The synthetic "test" split is a second draw of the same class templates.
        return SyntheticImages(
            num_samples=hp.synthetic_samples if split == "train" else hp.synthetic_samples // 2,
            num_classes=hp.synthetic_classes,
            image_size=hp.synthetic_image_size,
            imbalance_ratio=hp.synthetic_imbalance_ratio,
            seed=hp.seed,
            sample_seed=hp.seed + (0 if split == "train" else 1),
            transform=transform,
        )

    def setup(self, stage: str | None = None) -> None:
        train = self._dataset("train", self.train_transform)
        if self.hparams.max_train_samples:
            from torch.utils.data import Subset

            train = Subset(train, range(min(self.hparams.max_train_samples, len(train))))
        self.train_set = train

    def train_dataloader(self) -> DataLoader:
        # A sampler whose order is a function of (seed, epoch) only, so that a resumed run
        # sees the same batches as the uninterrupted one (Lightning calls set_epoch).
        # Under DDP each rank takes its own shard (DistributedSampler's usual split).
        world_size = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        sampler = DistributedSampler(
            self.train_set,
            num_replicas=world_size,
            rank=rank,
            shuffle=True,
            seed=self.hparams.seed,
            drop_last=True,
        )
        return DataLoader(
            self.train_set,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            num_workers=self.hparams.num_workers,
            drop_last=True,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def knn_dataloaders(self) -> tuple[DataLoader, DataLoader]:
        """Eval-transformed (train, held-out) loaders for the k-NN monitor."""
        return tuple(
            DataLoader(
                self._dataset(split, self._eval_transform),
                batch_size=512,
                num_workers=self.hparams.num_workers,
                shuffle=False,
            )
            for split in ("train", "test")
        )
