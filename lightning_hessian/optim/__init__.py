"""Optimizers that use the Hessian: AdaHessian and its Lightning callback."""

from lightning_hessian.optim.adahessian import AdaHessian
from lightning_hessian.optim.lightning import AdaHessianCallback

__all__ = ["AdaHessian", "AdaHessianCallback"]
