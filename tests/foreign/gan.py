"""Lightning's GAN example style: manual optimization, two optimizers, ``training_step(self, batch)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn


class Generator(nn.Module):
    def __init__(self, latent_dim: int = 4, data_dim: int = 8):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(latent_dim, 16), nn.LeakyReLU(0.2), nn.Linear(16, data_dim), nn.Tanh())

    def forward(self, z):
        return self.model(z)


class Discriminator(nn.Module):
    def __init__(self, data_dim: int = 8):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(data_dim, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))

    def forward(self, img):
        return self.model(img)


class GAN(LightningModule):
    def __init__(self, latent_dim: int = 4, data_dim: int = 8, lr: float = 2e-3):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = Generator(latent_dim, data_dim)
        self.discriminator = Discriminator(data_dim)

    def forward(self, z):
        return self.generator(z)

    def adversarial_loss(self, y_hat, y):
        return F.binary_cross_entropy_with_logits(y_hat, y)

    def training_step(self, batch):
        imgs, _ = batch
        optimizer_g, optimizer_d = self.optimizers()
        z = torch.randn(imgs.shape[0], self.hparams.latent_dim).type_as(imgs)

        self.toggle_optimizer(optimizer_g)
        valid = torch.ones(imgs.size(0), 1).type_as(imgs)
        g_loss = self.adversarial_loss(self.discriminator(self(z)), valid)
        self.log("g_loss", g_loss, prog_bar=True)
        self.manual_backward(g_loss)
        optimizer_g.step()
        optimizer_g.zero_grad()
        self.untoggle_optimizer(optimizer_g)

        self.toggle_optimizer(optimizer_d)
        fake = torch.zeros(imgs.size(0), 1).type_as(imgs)
        real_loss = self.adversarial_loss(self.discriminator(imgs), valid)
        fake_loss = self.adversarial_loss(self.discriminator(self(z).detach()), fake)
        d_loss = (real_loss + fake_loss) / 2
        self.log("d_loss", d_loss, prog_bar=True)
        self.manual_backward(d_loss)
        optimizer_d.step()
        optimizer_d.zero_grad()
        self.untoggle_optimizer(optimizer_d)

    def configure_optimizers(self):
        lr = self.hparams.lr
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=lr, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
        return [opt_g, opt_d], []


def discriminator_loss(model, batch):
    """The discriminator's loss on real samples (label 1), as a ``loss_fn``: deterministic, unlike the step's."""
    imgs, _ = batch
    return F.binary_cross_entropy_with_logits(model.discriminator(imgs), torch.ones(imgs.shape[0], 1).type_as(imgs))


def gan_data(n: int = 128) -> torch.utils.data.TensorDataset:
    """'Images' on a ring in 8 dimensions, with dummy labels (as a torchvision dataset yields)."""
    g = torch.Generator().manual_seed(0)
    angle = 6.2832 * torch.rand(n, 1, generator=g)
    imgs = torch.cat([torch.cos(angle * k) for k in range(1, 5)] + [torch.sin(angle * k) for k in range(1, 5)], 1)
    return torch.utils.data.TensorDataset(0.5 * imgs, torch.zeros(n, dtype=torch.long))
