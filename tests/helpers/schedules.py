"""A tiny fit for the batch-size schedules: 128 separable samples, a module that records each step's rows and LR, and
a way to script the probed eigenvalues."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_hessian.callbacks.hessian_probe import HessianProbe

N = 128


class Data(pl.LightningDataModule):
    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size
        x = torch.randn(N, 5, generator=torch.Generator().manual_seed(0))
        self.data = TensorDataset(x, (x.sum(1) > 0).long())

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


class Module(pl.LightningModule):
    """``milestones``: halve the LR there (MultiStepLR); ``scheduler``: ``optimizer -> lr_scheduler`` instead."""

    def __init__(self, milestones=None, scheduler=None):
        super().__init__()
        self.net = nn.Linear(5, 2)
        self.milestones, self.scheduler = milestones, scheduler
        self.seen = []  # (epoch, batch rows, lr) per training step

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((self.current_epoch, len(y), self.trainer.optimizers[0].param_groups[0]["lr"]))
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        if self.scheduler is not None:
            return {"optimizer": opt, "lr_scheduler": self.scheduler(opt)}
        if not self.milestones:
            return opt
        return [opt], [torch.optim.lr_scheduler.MultiStepLR(opt, self.milestones, gamma=0.5)]


def scripted_record(value: float) -> SimpleNamespace:
    """What ``HessianProbe.measure`` returns, for a converged top eigenvalue ``value`` (one product)."""
    return SimpleNamespace(eigenvalues=[value], eigen=SimpleNamespace(converged=True), hvps=1)


def script_probe(monkeypatch, eigenvalue) -> None:
    """Make every probe measure ``eigenvalue(epoch)`` (the probe set is still found and checked)."""
    monkeypatch.setattr(HessianProbe, "measure",
                        lambda self, module, **_: scripted_record(eigenvalue(module.current_epoch)))
