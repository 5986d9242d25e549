"""lightning_hessian: second-order (Hessian) methods for PyTorch Lightning.

Callbacks for an existing Trainer (``HessianSpectrumCallback``, ``AdaptiveBatchSizeCallback``,
``AdversarialAugmentCallback``), Hessian-aware quantization (``HAWQModule``), AdaHessian, K-FAC
(``KFACCallback``), and the pure-torch core they stand on (``HessianOperator``, ``KFACOperator`` and the spectrum
algorithms, the attacks). The exports are lazy: importing the pure-torch core does not load Lightning.
"""

from lightning_hessian._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "lightning_hessian.attacks": ["boundary_thickness", "fgsm", "pgd", "robust_accuracy", "trust_region"],
    "lightning_hessian.callbacks": [
        "AdaptiveBatchSizeCallback", "AdversarialAugmentCallback", "BoundaryThicknessCallback",
        "HessianSpectrumCallback",
    ],
    "lightning_hessian.data": ["CIFAR10DataModule", "MNIST1DDataModule"],
    "lightning_hessian.hessian": [
        "HessianOperator", "KFACOperator", "SpectrumOptions", "hessian_diagonal", "hutchinson_trace",
        "measure_spectrum", "per_layer_top_eigenvalue", "per_layer_trace", "power_iteration", "spectral_density",
        "top_eigenvalues",
    ],
    "lightning_hessian.models": ["ClassificationModule"],
    "lightning_hessian.optim": ["AdaHessian", "AdaHessianCallback", "KFACCallback", "KFACPreconditioner"],
    "lightning_hessian.quant": [
        "FineTuneOptions", "HAWQModule", "InfeasibleBudgetError", "ProbeOptions", "QuantizationOptions",
        "SensitivityOptions", "allocate_bits", "export_onnx", "layer_sensitivity", "quantize_model", "to_integer_model",
    ],
})
__version__ = "0.1.0"
