"""Datamodules: MNIST-1D generated locally, CIFAR-10 from a local folder."""

from lightning_hessian.data.cifar10 import CIFAR10DataModule, load_cifar10
from lightning_hessian.data.mnist1d import MNIST1DDataModule, load_mnist1d

__all__ = ["CIFAR10DataModule", "MNIST1DDataModule", "load_cifar10", "load_mnist1d"]
