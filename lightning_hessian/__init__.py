"""lightning_hessian: second-order (Hessian) methods for PyTorch Lightning.

Callbacks for an existing Trainer (``HessianSpectrumCallback``, ``AdaptiveBatchSizeCallback``,
``AdversarialAugmentCallback``), Hessian-aware quantization (``HAWQModule``), AdaHessian, K-FAC
(``KFACCallback``), and the pure-torch core they stand on (``HessianOperator``, ``KFACOperator`` and the spectrum
algorithms, the attacks).
"""

from lightning_hessian.attacks import boundary_thickness, fgsm, pgd, robust_accuracy, trust_region
from lightning_hessian.callbacks import (
    AdaptiveBatchSizeCallback,
    AdversarialAugmentCallback,
    BoundaryThicknessCallback,
    HessianSpectrumCallback,
)
from lightning_hessian.data import CIFAR10DataModule, MNIST1DDataModule
from lightning_hessian.hessian import (
    HessianOperator,
    KFACOperator,
    SpectrumOptions,
    hessian_diagonal,
    hutchinson_trace,
    measure_spectrum,
    per_layer_top_eigenvalue,
    per_layer_trace,
    power_iteration,
    spectral_density,
    top_eigenvalues,
)
from lightning_hessian.models import ClassificationModule
from lightning_hessian.optim import AdaHessian, AdaHessianCallback, KFACCallback, KFACPreconditioner
from lightning_hessian.quant import (
    HAWQModule,
    InfeasibleBudgetError,
    allocate_bits,
    export_onnx,
    layer_sensitivity,
    quantize_model,
    to_integer_model,
)

__all__ = [
    "AdaHessian", "AdaHessianCallback", "AdaptiveBatchSizeCallback", "AdversarialAugmentCallback",
    "CIFAR10DataModule", "ClassificationModule", "HAWQModule", "HessianOperator", "HessianSpectrumCallback",
    "InfeasibleBudgetError", "KFACCallback", "KFACOperator", "KFACPreconditioner", "MNIST1DDataModule",
    "SpectrumOptions", "allocate_bits", "export_onnx", "fgsm", "hessian_diagonal", "hutchinson_trace",
    "layer_sensitivity", "measure_spectrum", "per_layer_top_eigenvalue", "per_layer_trace", "pgd",
    "power_iteration", "quantize_model", "robust_accuracy", "spectral_density", "to_integer_model",
    "top_eigenvalues", "trust_region",
    "BoundaryThicknessCallback", "boundary_thickness",
]
__version__ = "0.1.0"
