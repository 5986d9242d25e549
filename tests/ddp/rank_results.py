"""Per-rank results of the multi-process tests: each rank saves its own file, the test loads them all."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist


def save_rank(results: Any, folder: str | Path, rank: int) -> None:
    """Save one rank's results (tensors and Python primitives) for :func:`load_ranks`."""
    torch.save(results, Path(folder) / f"rank{rank}.pt")


def load_ranks(folder: str | Path, world: int) -> list[Any]:
    """Every rank's saved results, in rank order."""
    return [torch.load(Path(folder) / f"rank{rank}.pt", weights_only=True) for rank in range(world)]


def close_process_group() -> None:
    """End a worker's process group once every rank is done. The barrier lets gloo's threads finish releasing the
    last collectives' tensors first: destroying the group while one of them waits for the GIL (a DDP reducer
    dropping the group's last reference on the main thread, which holds it) deadlocks the rank at exit."""
    dist.barrier()
    dist.destroy_process_group()


class SaveRankResults(pl.Callback):
    """At the end of fit, every rank saves ``results(trainer, pl_module)`` for :func:`load_ranks`."""

    def __init__(self, folder: str | Path, results: Callable[[pl.Trainer, pl.LightningModule], Any]):
        self.folder = folder
        self.results = results

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        save_rank(self.results(trainer, pl_module), self.folder, trainer.global_rank)
