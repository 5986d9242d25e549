"""CIFAR-style ResNets: ResNet-20 (He et al., 3 stages) and ResNet-18 (4 stages, 3x3 stem, no max-pool).

Residual additions and ReLUs are modules (``ResidualAdd``, ``nn.ReLU``) so that quantization can find and
replace them by module traversal.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualAdd(nn.Module):
    """``a + b`` as a module, so a quantizer can swap in a rescaling integer addition.

    >>> from lightning_hessian.quant import quantize_model
    >>> qmodel, _ = quantize_model(resnet20(width=4), 8)
    >>> type(resnet20(width=4).layers[0].add).__name__, type(qmodel.layers[0].add).__name__
    ('ResidualAdd', 'QuantResidualAdd')
    """

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        self.add = ResidualAdd()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(self.add(out, self.shortcut(x)))


class CifarResNet(nn.Module):
    """ResNet with a 3x3 stem, ``len(widths)`` stages of ``BasicBlock``s, global average pool, linear head.

    >>> model = resnet20()  # CifarResNet([3, 3, 3], [16, 32, 64])
    >>> len(model.layers), sum(p.numel() for p in model.parameters())
    (9, 272474)
    >>> model(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    def __init__(self, blocks: list[int], widths: list[int], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages, in_ch = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            for j in range(n):
                stages.append(BasicBlock(in_ch, w, stride=2 if (i > 0 and j == 0) else 1))
                in_ch = w
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def resnet20(num_classes: int = 10, width: int = 16) -> CifarResNet:
    """ResNet-20 for 32x32 inputs (0.27M parameters at ``width=16``)."""
    return CifarResNet([3, 3, 3], [width, 2 * width, 4 * width], num_classes)


def resnet18(num_classes: int = 10, width: int = 64) -> CifarResNet:
    """CIFAR-style ResNet-18 (11.2M parameters at ``width=64``)."""
    return CifarResNet([2, 2, 2, 2], [width, 2 * width, 4 * width, 8 * width], num_classes)
