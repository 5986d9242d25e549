"""Optimizers that use curvature: AdaHessian and its Lightning callback, the K-FAC preconditioner and its callback."""

from lightning_hessian._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "lightning_hessian.optim.adahessian": ["AdaHessian"],
    "lightning_hessian.optim.kfac": ["KFACPreconditioner"],
    "lightning_hessian.optim.kfac_callback": ["KFACCallback"],
    "lightning_hessian.optim.lightning": ["AdaHessianCallback"],
})
