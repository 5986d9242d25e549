"""Reference models used by the recipes, tests and benchmarks (the plain ``nn.Module`` ones need no Lightning)."""

from lightning_hessian._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "lightning_hessian.models.classification": ["ClassificationModule"],
    "lightning_hessian.models.mnist1d": ["MNIST1DCNN", "MNIST1DMLP"],
    "lightning_hessian.models.resnet": ["CifarResNet", "ResidualAdd", "resnet18", "resnet20"],
    "lightning_hessian.models.transformer": ["MNIST1DTransformer"],
})
