"""What the Hessian callbacks differentiate: the loss (by protocol) and a fixed probe set of samples."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence, Sized
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_hessian.checks import check_positive_int

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def cross_entropy_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The default loss for ``(x, y)`` batches."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            "the default Hessian loss needs (x, y) batches; for other batches pass loss_fn=... or define "
            "hessian_loss(batch) on the LightningModule"
        )
    x, y = batch
    return F.cross_entropy(model(x), y)


def resolve_loss_fn(pl_module: pl.LightningModule, loss_fn: LossFn | None) -> LossFn:
    """An explicit ``loss_fn``, else the module's ``hessian_loss(batch)``, else cross-entropy on ``(x, y)``.

    The returned function takes ``(model, batch)``; the model it is given is ``pl_module`` itself.
    """
    if loss_fn is not None:
        return loss_fn
    if callable(getattr(pl_module, "hessian_loss", None)):
        return lambda model, batch: model.hessian_loss(batch)
    return cross_entropy_loss


def draw_probe_indices(dataset_size: int, probe_size: int, seed: int) -> list[int]:
    """``probe_size`` distinct sample indices, the same for a given seed on every rank and every call."""
    check_positive_int(probe_size, "probe_size")
    if probe_size > dataset_size:
        raise ValueError(
            f"probe_size={probe_size} exceeds the {dataset_size} training samples: lower probe_size"
        )
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(dataset_size, generator=generator, device="cpu")[:probe_size].sort().values.tolist()


def probe_batches(
    dataset: Dataset,
    indices: Sequence[int],
    batch_size: int,
    collate_fn: Callable | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> list[Any]:
    """This rank's share of the probe samples, collated into batches (ranks split the indices evenly).

    Each sample is read with the random generators seeded by ``(seed, index)``, so a dataset that augments
    (random crops, flips) gives the same probe set on every call and every rank split, and training's random
    stream is left as it was.
    """
    check_positive_int(batch_size, "probe_batch_size")
    shard = list(indices[rank::world_size])
    # a private generator: iterating a DataLoader otherwise draws from the global RNG (training's stream)
    loader = DataLoader(Subset(_SeededSamples(dataset, seed), shard), batch_size=batch_size, shuffle=False,
                        collate_fn=collate_fn, generator=torch.Generator())
    return list(loader)


class _SeededSamples(Dataset):
    """``dataset[i]`` read with torch's, NumPy's and Python's generators seeded by ``(seed, i)``, then restored."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with isolate_rng(include_cuda=False):
            sample_seed = (self.seed * 1_000_003 + index) % 2**32
            torch.manual_seed(sample_seed)
            np.random.seed(sample_seed)
            random.seed(sample_seed)
            return self.dataset[index]


def prepare_batch(trainer: pl.Trainer, batch: Any, convert_input: bool = True) -> Any:
    """``batch`` as the training loop hands it to ``training_step``: the precision plugin's input conversion
    (e.g. ``bf16-true``, ``64-true``; ``convert_input=False`` skips it, for modules the precision plugin has not
    converted yet), the module's batch-transfer hooks and the move to its device. Random draws in those hooks
    (augmentation) do not advance the training's random stream."""
    with isolate_rng():
        if convert_input:
            batch = trainer.precision_plugin.convert_input(batch)
        batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=0)
        return trainer.strategy.batch_to_device(batch, dataloader_idx=0)


def train_dataset_of(trainer: pl.Trainer) -> tuple[Dataset, Callable | None]:
    """The training dataset and collate function the Trainer is using; outside ``fit`` (before one), those of the
    datamodule's ``train_dataloader`` (else the module's)."""
    loader = trainer.train_dataloader
    if loader is None and trainer.state.fn == TrainerFn.FITTING:
        trainer.fit_loop.setup_data()
        loader = trainer.train_dataloader
    elif loader is None:
        loader = (trainer.datamodule if trainer.datamodule is not None else trainer.lightning_module).train_dataloader()
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    elif isinstance(loader, dict):
        loader = next(iter(loader.values()))
    if not isinstance(loader, DataLoader):
        raise TypeError(f"cannot draw a probe set from a {type(loader).__name__}; pass probe batches explicitly")
    if not isinstance(loader.dataset, Sized):
        raise TypeError(f"cannot draw probe samples from an iterable-style dataset ({type(loader.dataset).__name__} "
                        "has no len()); pass probe batches explicitly (probe_data=...)")
    return loader.dataset, loader.collate_fn
