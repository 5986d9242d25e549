"""A generic image/signal classification LightningModule used by the recipes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy


class _MeanLoss(MeanMetric):
    """``MeanMetric`` whose update builds new states instead of writing into them (as torchmetrics' accuracy
    does): states that a ``trainer.validate`` made in inference mode stay usable in a later ``fit``."""

    def update(self, value: torch.Tensor, weight: int) -> None:
        self.mean_value = self.mean_value + value * weight
        self.weight = self.weight + weight


class ClassificationModule(LightningModule):
    """Train ``net`` with cross-entropy; log ``{train,val,test}/loss`` and ``/acc``.

    ``optimizer`` and ``scheduler`` are factories (``functools.partial`` or Hydra ``_partial_: true``):
    ``optimizer(params)`` and ``scheduler(optimizer)``. The scheduler steps once per epoch.
    ``hessian_loss(batch)`` is what the Hessian callbacks differentiate. ``num_classes`` sizes the accuracy
    metrics (the labels must lie in ``[0, num_classes)``).

    Under DDP the epoch values (``train/loss_epoch``, ``val/loss``, ``test/loss`` and the accuracies) are over
    every rank's samples: torchmetrics sums the per-sample losses and counts over the ranks, so they equal one
    process on the union of the shards. ``train/loss_step`` is the rank's own batch, as Lightning logs step
    values. Lightning's ``DistributedSampler`` pads an evaluation set that the ranks do not divide evenly
    with up to ``world_size - 1`` repeated samples (and warns); those count twice, as in the accuracy.

    Example::

        >>> from functools import partial
        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning_hessian.models import ClassificationModule, MNIST1DMLP
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(256, 40)
        >>> data = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=32)  # a learnable two-class task
        >>> module = ClassificationModule(MNIST1DMLP(hidden=32), optimizer=partial(torch.optim.Adam, lr=1e-2))
        >>> trainer = pl.Trainer(max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)
        >>> trainer.fit(module, data, data)
        >>> float(trainer.callback_metrics["val/acc"]) > 0.9
        True
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        num_classes: int = 10,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
        self.net = net
        self.optimizer_factory = optimizer or (lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))
        self.scheduler_factory = scheduler
        stages = ("train_", "val_", "test_")
        self.metrics = nn.ModuleDict({stage: MulticlassAccuracy(num_classes, average="micro") for stage in stages})
        self.losses = nn.ModuleDict({stage: _MeanLoss() for stage in stages})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def hessian_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def _shared_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric = self.metrics[stage + "_"]
        metric.update(logits, y)  # logged per epoch: no per-batch value to compute
        mean_loss = self.losses[stage + "_"]  # weighted by the batch size
        if stage == "train":
            mean_loss(loss.detach(), len(y))  # forward: also this batch's value, for train/loss_step
        else:
            mean_loss.update(loss.detach(), len(y))
        self.log(f"{stage}/loss", mean_loss, on_step=stage == "train", on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
