"""MNIST-1D, generated locally with the ``mnist1d`` package and cached as ``.npz``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.seed import isolate_rng
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.checks import check_positive_int
from lightning_hessian.data.sampling import EpochShuffleSampler


def _cache_path(data_dir: str | os.PathLike, num_train: int, num_test: int, seed: int) -> Path:
    return Path(data_dir) / f"mnist1d_{num_train}_{num_test}_seed{seed}.npz"


def _check_sizes(num_train: int, num_test: int) -> None:
    check_positive_int(num_train, "num_train")
    check_positive_int(num_test, "num_test")
    if (num_train + num_test) % 10:
        total = num_train + num_test
        raise ValueError(f"num_train + num_test must be a multiple of 10 (one share per class), got {total}")


def load_mnist1d(
    num_train: int = 4000, num_test: int = 1000, seed: int = 42, data_dir: str | os.PathLike = "data"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(x_train, y_train, x_test, y_test)``: float32 signals of length 40 and int64 labels.

    The first call generates the split with ``mnist1d.data.make_dataset`` (the published generator and
    defaults, standardised) and caches it; later calls load the cache. ``num_train + num_test`` must be a
    multiple of 10 (the generator draws the same number of samples per class).
    """
    _check_sizes(num_train, num_test)
    path = _cache_path(data_dir, num_train, num_test, seed)
    if not path.exists():
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        args.num_samples = num_train + num_test
        args.train_split = num_train / args.num_samples
        args.seed = seed
        with isolate_rng(include_cuda=False):  # the generator seeds NumPy's and Python's global RNGs
            raw = make_dataset(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, x=raw["x"], y=raw["y"], x_test=raw["x_test"], y_test=raw["y_test"])
        os.replace(tmp, path)
    with np.load(path) as f:
        # the generator rounds its split point down (1500/1100 gives 1499/1101): split the samples exactly
        x = torch.as_tensor(np.concatenate([f["x"], f["x_test"]]), dtype=torch.float32)
        y = torch.as_tensor(np.concatenate([f["y"], f["y_test"]]), dtype=torch.int64)
    return x[:num_train], y[:num_train], x[num_train:], y[num_train:]


class MNIST1DDataModule(LightningDataModule):
    """MNIST-1D as ``(x, y)`` batches, ``x`` of shape ``(batch, 40)``.

    ``val_size`` samples are held out of the training split for validation; with ``val_size=0`` (default)
    validation runs on the test split, as in the MNIST-1D benchmark, which has no validation split.
    ``batch_size`` is a plain attribute so schedules may change it between epochs. ``seed`` generates the
    data; the training order depends on ``(shuffle_seed, epoch)`` only (``shuffle_seed`` defaults to
    ``seed``), so a run resumed from a checkpoint replays the same batches. Validation and test loaders use
    ``eval_batch_size``; ``num_workers`` is each loader's worker count.

    Example::

        >>> import tempfile
        >>> from lightning_hessian.data import MNIST1DDataModule
        >>> dm = MNIST1DDataModule(data_dir=tempfile.mkdtemp(), num_train=400, num_test=100, batch_size=100)
        >>> dm.prepare_data()  # generates the set once (mnist1d), cached in data_dir
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), tuple(y.shape), len(dm.train_dataloader())
        ((100, 40), (100,), 4)
    """

    def __init__(
        self,
        data_dir: str = "data",
        num_train: int = 4000,
        num_test: int = 1000,
        val_size: int = 0,
        batch_size: int = 100,
        eval_batch_size: int = 1000,
        seed: int = 42,
        num_workers: int = 0,
        shuffle_seed: int | None = None,
    ):
        super().__init__()
        _check_sizes(num_train, num_test)
        check_positive_int(batch_size, "batch_size")
        check_positive_int(eval_batch_size, "eval_batch_size")
        if not 0 <= val_size < num_train:
            raise ValueError(f"val_size must be in [0, num_train={num_train}), got {val_size}")
        self.data_dir, self.num_train, self.num_test, self.seed = data_dir, num_train, num_test, seed
        self.val_size, self.batch_size, self.eval_batch_size = val_size, batch_size, eval_batch_size
        self.num_workers, self.shuffle_seed = num_workers, seed if shuffle_seed is None else shuffle_seed
        self.input_range = (-float("inf"), float("inf"))
        self.train_set = self.val_set = self.test_set = None

    def prepare_data(self) -> None:
        load_mnist1d(self.num_train, self.num_test, self.seed, self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y, x_test, y_test = load_mnist1d(self.num_train, self.num_test, self.seed, self.data_dir)
        self.input_range = (float(min(x.min(), x_test.min())), float(max(x.max(), x_test.max())))
        n_fit = len(x) - self.val_size
        self.train_set = TensorDataset(x[:n_fit], y[:n_fit])
        self.test_set = TensorDataset(x_test, y_test)
        self.val_set = TensorDataset(x[n_fit:], y[n_fit:]) if self.val_size else self.test_set

    def train_dataloader(self) -> DataLoader:
        if self.batch_size > len(self.train_set):
            raise ValueError(
                f"batch_size={self.batch_size} exceeds the {len(self.train_set)} training samples: "
                "lower batch_size or raise num_train"
            )
        sampler = EpochShuffleSampler(len(self.train_set), self.shuffle_seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.eval_batch_size, num_workers=self.num_workers)
