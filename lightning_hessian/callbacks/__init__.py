"""Lightning callbacks: thin adapters that pick the data, manage modes and ranks, call the core and log."""

from lightning_hessian.callbacks.adaptive_batch import AdaptiveBatchSizeCallback
from lightning_hessian.callbacks.adversarial import AdversarialAugmentCallback
from lightning_hessian.callbacks.spectrum import HessianSpectrumCallback
from lightning_hessian.callbacks.thickness import BoundaryThicknessCallback

__all__ = ["AdaptiveBatchSizeCallback", "AdversarialAugmentCallback", "BoundaryThicknessCallback",
           "HessianSpectrumCallback"]
