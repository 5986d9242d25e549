"""Lightning's BoringModel style: batches are bare tensors, the loss is an MSE towards a constant target."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader, Dataset


class RandomDataset(Dataset):
    def __init__(self, size: int, length: int):
        self.len = length
        self.data = torch.randn(length, size, generator=torch.Generator().manual_seed(length))

    def __getitem__(self, index):
        return self.data[index]

    def __len__(self):
        return self.len


class BoringModel(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.layer(x)

    def loss(self, preds, labels=None):
        if labels is None:
            labels = torch.ones_like(preds)
        return torch.nn.functional.mse_loss(preds, labels)

    def step(self, batch):
        output = self(batch)
        return self.loss(output)

    def training_step(self, batch, batch_idx):
        return {"loss": self.step(batch)}

    def validation_step(self, batch, batch_idx):
        return {"x": self.step(batch)}

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.layer.parameters(), lr=0.1)
        lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
        return [optimizer], [lr_scheduler]

    def train_dataloader(self):
        return DataLoader(RandomDataset(8, 64), batch_size=16)

    def val_dataloader(self):
        return DataLoader(RandomDataset(8, 32), batch_size=16)


def boring_loss(model, batch):
    """The BoringModel's own loss, as a ``loss_fn`` for the Hessian callbacks."""
    return model.step(batch)
