"""Lightning's LightningCLI examples style: an autoencoder and a backbone image classifier, configured from YAML."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split


class Backbone(nn.Module):
    def __init__(self, in_dim: int = 16, hidden_dim: int = 32, num_classes: int = 4):
        super().__init__()
        self.l1 = nn.Linear(in_dim, hidden_dim)
        self.l2 = nn.Linear(hidden_dim, num_classes)

    def forward(self, x):
        x = x.view(x.size(0), -1)
        x = torch.relu(self.l1(x))
        return self.l2(x)


class LitClassifier(LightningModule):
    def __init__(self, backbone: nn.Module | None = None, learning_rate: float = 0.05):
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone if backbone is not None else Backbone()

    def forward(self, x):
        return self.backbone(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        y_hat = self(x)
        loss = F.cross_entropy(y_hat, y)
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("valid_loss", F.cross_entropy(self(x), y), on_step=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.learning_rate)


class LitAutoEncoder(LightningModule):
    """``forward`` returns the embedding (wider than the number of classes): the default cross-entropy would
    type-check against the labels and be wrong, so only the module's code (``mse_loss``) tells it apart."""

    def __init__(self, in_dim: int = 16, hidden_dim: int = 12, embed_dim: int = 8):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, embed_dim))
        self.decoder = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, in_dim))

    def forward(self, x):
        return self.encoder(x)

    def training_step(self, batch, batch_idx):
        return self._common_step(batch, batch_idx, "train")

    def validation_step(self, batch, batch_idx):
        self._common_step(batch, batch_idx, "val")

    def _common_step(self, batch, batch_idx, stage: str):
        x, _ = batch
        x_hat = self.decoder(self.encoder(x))
        loss = F.mse_loss(x, x_hat)
        self.log(f"{stage}_loss", loss, on_step=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class BlobsDataModule(LightningDataModule):
    """Four Gaussian blobs in 16 dimensions: ``(x, y)`` batches of float inputs and integer labels."""

    def __init__(self, batch_size: int = 32, num_samples: int = 256):
        super().__init__()
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(0)
        centers = 2 * torch.randn(4, 16, generator=g)
        y = torch.randint(4, (num_samples,), generator=g)
        x = centers[y] + torch.randn(num_samples, 16, generator=g)
        self.train_set, self.val_set = random_split(TensorDataset(x, y), [num_samples - 64, 64],
                                                    generator=torch.Generator().manual_seed(1))

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size)


def classification_loss(model, batch, label_smoothing=0.0):
    """The classifier's loss as a ``loss_fn``; no annotations, as such functions are usually written."""
    x, y = batch
    return F.cross_entropy(model(x), y, label_smoothing=label_smoothing)


smoothed_classification_loss = partial(classification_loss, label_smoothing=0.1)


def small_fgsm(model, x, y):
    """An attack for ``AdversarialAugmentCallback(attack=...)``, named in YAML by its dotted path."""
    from lightning_hessian import fgsm

    return fgsm(model, x, y, eps=0.05)


def reconstruction_loss(model, batch):
    """The autoencoder's loss as a ``loss_fn`` (LightningCLI names it by this dotted path; no annotations)."""
    x, _ = batch
    return F.mse_loss(x, model.decoder(model.encoder(x)))
