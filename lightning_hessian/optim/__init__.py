"""Optimizers that use curvature: AdaHessian and its Lightning callback, the K-FAC preconditioner and its callback."""

from lightning_hessian.optim.adahessian import AdaHessian
from lightning_hessian.optim.kfac import KFACPreconditioner
from lightning_hessian.optim.kfac_callback import KFACCallback
from lightning_hessian.optim.lightning import AdaHessianCallback

__all__ = ["AdaHessian", "AdaHessianCallback", "KFACCallback", "KFACPreconditioner"]
