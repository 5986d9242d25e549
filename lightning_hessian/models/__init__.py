"""Reference models used by the recipes, tests and benchmarks."""

from lightning_hessian.models.classification import ClassificationModule
from lightning_hessian.models.mnist1d import MNIST1DCNN, MNIST1DMLP
from lightning_hessian.models.resnet import CifarResNet, ResidualAdd, resnet18, resnet20
from lightning_hessian.models.transformer import MNIST1DTransformer

__all__ = ["ClassificationModule", "MNIST1DCNN", "MNIST1DMLP", "MNIST1DTransformer", "CifarResNet", "ResidualAdd",
           "resnet18", "resnet20"]
