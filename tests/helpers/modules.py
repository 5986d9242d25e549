"""Small models and data the test modules share: HAWQ's four-class CNN problem, a tiny Conv1d+Linear sensitivity
problem, and the spectrum callback's small Lightning module with BatchNorm and dropout."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lightning_hessian.models import MNIST1DCNN, ClassificationModule

N_TRAIN = 96

LAYERS = ["net.features.0", "net.features.2", "net.features.4", "net.classifier"]
TRAINER = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False)


def four_class_data(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 40, generator=g)
    return x, (x[:, :20].sum(1) > 0).long() + 2 * (x[:, 20:].sum(1) > 0).long()


def float_module(seed: int = 0) -> ClassificationModule:
    torch.manual_seed(seed)
    return ClassificationModule(MNIST1DCNN(channels=6, num_classes=4), optimizer=partial(torch.optim.Adam, lr=3e-3),
                                num_classes=4)


def tiny_model() -> nn.Module:
    """Conv1d (9 weights) + tanh + Linear (48 weights): smooth, so the Hessian blocks are not degenerate."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 3, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 4)).double()


def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 1, 9, generator=g, dtype=torch.float64), torch.randint(0, 4, (32,), generator=g)


class TinyModule(pl.LightningModule):
    """A small MLP with BatchNorm and dropout (so mode, buffers and RNG all matter)."""

    def __init__(self, lr: float = 0.05, batch_norm: bool = True):
        super().__init__()
        norm = nn.BatchNorm1d(8) if batch_norm else nn.Identity()
        self.net = nn.Sequential(nn.Linear(6, 8), norm, nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 3))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def tiny_dataset(seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN, 6, generator=g)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long())


def clocked_module(monkeypatch, product_cost: Callable[[], float], step_seconds: float = 0.1) -> type[TinyModule]:
    """The probe budget on a fake clock: a Hessian-vector product costs ``product_cost()`` seconds per probe sample
    and a training step of the returned TinyModule subclass ``step_seconds``."""
    from lightning_hessian.callbacks import budget
    from lightning_hessian.hessian.operator import HessianOperator, sample_count

    clock = {"t": 0.0}
    monkeypatch.setattr(budget, "now", lambda: clock["t"])
    matmat = HessianOperator.matmat

    def timed(op, V):
        clock["t"] += product_cost() * V.shape[0] * sum(sample_count(b) for b in op._batches)
        return matmat(op, V)

    monkeypatch.setattr(HessianOperator, "matmat", timed)

    class Clocked(TinyModule):
        def training_step(self, batch, batch_idx):
            clock["t"] += step_seconds
            return super().training_step(batch, batch_idx)

    return Clocked
