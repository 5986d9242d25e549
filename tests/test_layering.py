"""The layering DESIGN.md states holds at run time: the pure-torch core loads no Lightning, and the lazy package
exports resolve to what they name."""

import importlib
import subprocess
import sys

import pytest

CORE = [
    "lightning_hessian.hessian", "lightning_hessian.attacks", "lightning_hessian.quant.quantizers",
    "lightning_hessian.quant.allocation", "lightning_hessian.quant.costs", "lightning_hessian.quant.swap",
    "lightning_hessian.quant.layers", "lightning_hessian.quant.folding", "lightning_hessian.quant.measurement_cache",
    "lightning_hessian.quant.integer", "lightning_hessian.quant.export", "lightning_hessian.quant.sensitivity",
    "lightning_hessian.quant.distill", "lightning_hessian.quant.report", "lightning_hessian.optim.adahessian",
    "lightning_hessian.optim.kfac", "lightning_hessian.models.mnist1d", "lightning_hessian.models.resnet",
    "lightning_hessian.landscape", "lightning_hessian.checks", "lightning_hessian.modes",
    "lightning_hessian.distributed", "lightning_hessian.quant.attention", "lightning_hessian.models.transformer",
    "lightning_hessian.hessian.summary", "lightning_hessian.no_trace", "lightning_hessian.quant.hawq_options",
]
LAZY_PACKAGES = ["lightning_hessian", "lightning_hessian.quant", "lightning_hessian.optim", "lightning_hessian.models"]


def test_importing_the_core_leaves_lightning_unloaded():
    code = (f"import sys\nfor m in {CORE!r}: __import__(m)\n"
            "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'lightning.pytorch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_every_lazy_export_resolves_to_the_object_its_module_defines(package):
    module = importlib.import_module(package)
    assert module.__all__ and set(module.__all__) <= set(dir(module))
    for name in module.__all__:
        value = getattr(module, name)
        owner = getattr(value, "__module__", None)  # classes and functions; constants (e.g. FOLLOW) have none
        assert owner is None or getattr(importlib.import_module(owner), name) is value, name
    with pytest.raises(AttributeError, match="no attribute 'not_an_export'"):
        module.not_an_export  # noqa: B018
