"""Test helpers that recipe subprocesses load through Hydra (``+callbacks.x._target_=tests.recipe_callbacks...``)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_hessian.callbacks.adaptive_batch import AdaptiveBatchSizeCallback
from lightning_hessian.callbacks.spectrum import HessianSpectrumCallback


class KillAtStep(Callback):
    """SIGKILL this process after optimizer step ``step``: no cleanup, like a preempted node."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class DumpRankState(Callback):
    """At the end of fit, save this rank's parameters, topology and the Hessian callbacks' decisions."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        spectrum = [c for c in trainer.callbacks if isinstance(c, HessianSpectrumCallback)]
        abs_ = [c for c in trainer.callbacks if isinstance(c, AdaptiveBatchSizeCallback)]
        state = {
            "params": {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "output_dir": trainer.default_root_dir,
            "spectrum": [h["eigenvalues"] for h in spectrum[0].history] if spectrum else None,
            "batch_sizes": [h["batch_size"] for h in abs_[0].history] if abs_ else None,
            "next_batch_size": abs_[0].batch_size if abs_ else None,
        }
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.dirpath / f"rank_{trainer.global_rank}.pt")


class PoisonAtStep(Callback):
    """Fill the module's first parameter with NaN after optimizer step ``step``: the next loss is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))
