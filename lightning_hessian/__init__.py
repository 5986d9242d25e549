"""lightning_hessian: second-order (Hessian) methods for PyTorch Lightning."""

from lightning_hessian.data import CIFAR10DataModule, MNIST1DDataModule
from lightning_hessian.models import ClassificationModule

__all__ = ["CIFAR10DataModule", "ClassificationModule", "MNIST1DDataModule"]
__version__ = "0.1.0"
