"""CIFAR-10 from a local ``cifar-10-batches-py`` folder (the standard Python-pickle release)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_hessian.checks import check_positive_int
from lightning_hessian.data.sampling import EpochShuffleSampler

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
_TEST_FILES = ["test_batch"]


def _find_batches_dir(data_dir: str | os.PathLike) -> Path:
    root = Path(data_dir).expanduser()
    for candidate in (root, root / "cifar-10-batches-py"):
        if all((candidate / name).is_file() for name in _TRAIN_FILES + _TEST_FILES):
            return candidate
    raise FileNotFoundError(
        f"no CIFAR-10 found at data_dir={str(root)!r}: expected the folder 'cifar-10-batches-py' (with "
        f"data_batch_1..5 and test_batch) there or inside it; set data.data_dir to the folder that holds it"
    )


def _read_batches(folder: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        images.append(torch.as_tensor(entry[b"data"], dtype=torch.uint8).reshape(-1, 3, 32, 32))
        labels.append(torch.as_tensor(entry[b"labels"], dtype=torch.int64))
    return torch.cat(images), torch.cat(labels)


def load_cifar10(data_dir: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(x_train, y_train, x_test, y_test)`` with uint8 images of shape ``(N, 3, 32, 32)``."""
    folder = _find_batches_dir(data_dir)
    return (*_read_batches(folder, _TRAIN_FILES), *_read_batches(folder, _TEST_FILES))


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32, standardised per channel with the CIFAR-10 statistics."""
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


class _AugmentedImages(Dataset):
    """Random 4-pixel-padded 32x32 crops and horizontal flips (the standard CIFAR augmentation), on normalised
    images: the padding is black, as when the raw image is padded before normalising."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, padding: int = 4):
        self.images, self.labels, self.padding = images, labels, padding
        self.black = (-torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD)).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample ``key``: an index (crop and flip from the global RNG), or ``(index, seed)`` from a keyed
        :class:`EpochShuffleSampler` (from that seed: the same in a resumed epoch, in any worker)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        image = self.images[index]
        p = self.padding
        padded = self.black.expand(3, 32 + 2 * p, 32 + 2 * p).clone()
        padded[:, p : p + 32, p : p + 32] = image
        top, left = torch.randint(0, 2 * p + 1, (2,), generator=generator).tolist()
        image = padded[:, top : top + 32, left : left + 32]
        if torch.rand((), generator=generator) < 0.5:
            image = image.flip(-1)
        return image, self.labels[index]


class CIFAR10DataModule(LightningDataModule):
    """CIFAR-10 from ``data_dir`` (the ``cifar-10-batches-py`` folder or its parent); nothing is downloaded.

    ``num_train`` / ``num_test`` take the first samples of each split (for quick runs); ``augment``
    applies random crops and flips to training images; the training order and the augmentation depend on
    ``(seed, epoch)`` only, so a resumed run sees what an uninterrupted one would. Validation and test loaders use
    ``eval_batch_size``; ``num_workers`` is each loader's worker count.

    Example::

        dm = CIFAR10DataModule(data_dir="~/datasets", batch_size=128)
        trainer.fit(model, datamodule=dm)
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        eval_batch_size: int = 500,
        num_train: int | None = None,
        num_test: int | None = None,
        augment: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        check_positive_int(batch_size, "batch_size")
        check_positive_int(eval_batch_size, "eval_batch_size")
        for name, value in (("num_train", num_train), ("num_test", num_test)):
            if value is not None:
                check_positive_int(value, name)
        self.data_dir, self.batch_size, self.eval_batch_size = data_dir, batch_size, eval_batch_size
        self.num_train, self.num_test, self.augment, self.num_workers = num_train, num_test, augment, num_workers
        self.seed = seed
        mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
        self.input_range = (tuple((-mean / std).tolist()), tuple(((1 - mean) / std).tolist()))  # per channel
        self.train_set = self.test_set = None

    def prepare_data(self) -> None:
        _find_batches_dir(self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y, x_test, y_test = load_cifar10(self.data_dir)
        for name, value, size in (("num_train", self.num_train, len(x)), ("num_test", self.num_test, len(x_test))):
            if value is not None and value > size:
                raise ValueError(f"{name}={value} exceeds the {size} samples of the split in {self.data_dir}")
        x, y = x[: self.num_train], y[: self.num_train]
        x_test, y_test = x_test[: self.num_test], y_test[: self.num_test]
        x, x_test = normalize_images(x), normalize_images(x_test)
        self.train_set = _AugmentedImages(x, y) if self.augment else TensorDataset(x, y)
        self.test_set = TensorDataset(x_test, y_test)

    def train_dataloader(self) -> DataLoader:
        if self.batch_size > len(self.train_set):
            raise ValueError(f"batch_size={self.batch_size} exceeds the {len(self.train_set)} training samples")
        sampler = EpochShuffleSampler(len(self.train_set), self.seed, keyed=self.augment)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.eval_batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
