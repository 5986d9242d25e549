"""Reference MNIST-1D models: the CNN and MLP of the MNIST-1D benchmark setup."""

from __future__ import annotations

import torch
from torch import nn


class MNIST1DCNN(nn.Module):
    """Three strided 1-D convolutions and a linear head (about 5.2k parameters at 25 channels).

    Input: ``(N, length)`` or ``(N, 1, length)`` signals; output: ``(N, num_classes)`` logits.
    ``batch_norm=True`` inserts BatchNorm after every convolution (useful for BN-folding studies).

    >>> model = MNIST1DCNN()
    >>> model(torch.randn(8, 40)).shape, model(torch.randn(8, 1, 40)).shape
    (torch.Size([8, 10]), torch.Size([8, 10]))
    >>> sum(p.numel() for p in model.parameters())
    5210
    """

    def __init__(self, channels: int = 25, num_classes: int = 10, length: int = 40, batch_norm: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch, out_len = 1, length
        for kernel in (5, 3, 3):
            layers.append(nn.Conv1d(in_ch, channels, kernel, stride=2, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm1d(channels))
            layers.append(nn.ReLU())
            in_ch, out_len = channels, (out_len + 2 - kernel) // 2 + 1
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * out_len, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, x.shape[-1])  # no branch on x.dim(), so torch.fx can trace the model
        return self.classifier(self.features(x).flatten(1))


class MNIST1DMLP(nn.Module):
    """Two hidden layers of ``hidden`` ReLU units.

    >>> model = MNIST1DMLP(hidden=100)
    >>> model(torch.randn(8, 1, 40)).shape, sum(p.numel() for p in model.parameters())  # 40*100+100*100+100*10+210
    (torch.Size([8, 10]), 15210)
    """

    def __init__(self, hidden: int = 100, num_classes: int = 10, length: int = 40):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(length, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))
