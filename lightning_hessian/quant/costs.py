"""What each quantizable layer costs: parameter counts and MACs of a model, turned into size and BOPS tables.

These are the ``costs[resource][layer][bits]`` tables :func:`~lightning_hessian.quant.allocation.allocate_bits`
takes, HAWQ-V3's budgets between two uniform precisions, and the float baselines for reports. Layers are
the ones ``quantize_model`` swaps (:func:`~lightning_hessian.quant.swap.quantizable_layers`), named by
their module path.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import torch
from torch import nn

from lightning_hessian.checks import check_choice
from lightning_hessian.modes import training_mode
from lightning_hessian.quant.quantizers import MIN_BITS, validate_bit_choices, validate_bits
from lightning_hessian.quant.swap import quantizable_layers, require_unpacked

FLOAT_BITS = 32
_UNITS = {"bits": 1, "bytes": 8}


@dataclass(frozen=True)
class LayerStats:
    """One quantizable layer: weight elements ``params`` (the ``n_i`` that is quantized), ``bias``
    elements (kept in 32 bits), and multiply-accumulates per sample ``macs`` in one forward pass.

    >>> model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 2))
    >>> stats = layer_stats(model, torch.randn(5, 1, 10))
    >>> stats["0"]  # per sample: 4 channels x 8 outputs x 3 taps
    LayerStats(kind='Conv1d', params=12, bias=4, macs=96)
    >>> stats["3"]
    LayerStats(kind='Linear', params=64, bias=2, macs=64)
    """

    kind: str
    params: int
    bias: int
    macs: int


def layer_stats(
    model: nn.Module, example_input: Any, layers: Iterable[str] | None = None,
    forward: Callable[[nn.Module, Any], object] | None = None,
) -> dict[str, LayerStats]:
    """Parameter counts and per-sample MACs of the quantizable layers, from one forward pass.

    Args:
        model: any ``nn.Module``; its layers are those of
            :func:`~lightning_hessian.quant.swap.quantizable_layers`.
        example_input: a batch the model accepts: a tensor, a tuple/list of positional arguments or a
            dict of keyword arguments; its first tensor's leading dimension is the batch size.
        layers: module paths to keep (default: every quantizable layer).
        forward: ``forward(model, example_input)`` runs the pass instead of ``model(example_input)``, e.g. a
            ``loss_fn(model, batch)`` for a module without ``forward`` (a LightningModule whose step holds the
            loss) or with dict batches; ``example_input`` is then whatever it takes.

    MACs count the weight multiplications (``output elements x in_channels / groups x kernel size``
    for convolutions, ``output elements x in_features`` for linear layers, 0 for an embedding's gather), summed
    over every call of the layer and divided by the batch size. The model's train/eval modes and buffers are left as
    they were (the pass runs in eval mode without gradients).
    """
    require_unpacked(model, "layer_stats")
    modules = dict(model.named_modules())
    found = {name: modules[name] for name in quantizable_layers(model)}
    if not found:
        raise ValueError(
            f"model {type(model).__name__} has no quantizable layer (nn.Conv1d, nn.Conv2d or nn.Linear itself, "
            "not a subclass) to cost"
        )
    if layers is not None:
        if isinstance(layers, str):
            raise TypeError(f"layers must be a list of module paths, got the string {layers!r}")
        layers = list(layers)
        unknown = [name for name in layers if name not in found]
        if unknown:
            raise ValueError(f"layers: {unknown} are not quantizable layers of the model; choose from {list(found)}")
        found = {name: found[name] for name in layers}
    batch = _example_batch_size(example_input)
    totals = dict.fromkeys(found, 0)
    called: set[str] = set()

    def hook(name: str):
        def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            called.add(name)
            if isinstance(module, nn.Embedding):  # a gather: no multiplication
                per_output = 0
            elif isinstance(module, nn.Linear):
                per_output = module.in_features
            else:
                per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            totals[name] += output.numel() * per_output

        return count

    handles = [module.register_forward_hook(hook(name)) for name, module in found.items()]
    try:
        with training_mode(model, False), torch.no_grad():
            if forward is not None:
                forward(model, example_input)
            elif isinstance(example_input, Mapping):
                model(**example_input)
            elif isinstance(example_input, (tuple, list)):
                model(*example_input)
            else:
                model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    unused = [name for name in totals if name not in called]
    if unused:
        warnings.warn(
            f"layers {unused} did not run in the forward pass of example_input; their MACs are 0", stacklevel=2
        )
    return {
        name: LayerStats(
            type(module).__name__,
            module.weight.numel(),
            module.bias.numel() if getattr(module, "bias", None) is not None else 0,
            totals[name] // batch,
        )
        for name, module in found.items()
    }


def layer_costs(
    model: nn.Module,
    example_input: Any,
    layers: Iterable[str] | None = None,
    bit_choices: Iterable[int] = (2, 4, 8),
    activation_bits: int | None = None,
    size_unit: str = "bits",
) -> dict[str, dict[str, dict[int, float]]]:
    """``{"size": size_costs(...), "bops": bops_costs(...)}`` for the model's quantizable layers."""
    stats = layer_stats(model, example_input, layers)
    return {
        "size": size_costs(stats, bit_choices, size_unit),
        "bops": bops_costs(stats, bit_choices, activation_bits),
    }


def size_costs(
    stats: Mapping[str, LayerStats], bit_choices: Iterable[int] = (2, 4, 8), unit: str = "bits"
) -> dict[str, dict[int, float]]:
    """``size[layer][b] = params * b`` weight bits (or ``/ 8`` bytes with ``unit="bytes"``)."""
    bits, divisor = validate_bit_choices(bit_choices), _unit(unit)
    return {name: {b: s.params * b / divisor for b in bits} for name, s in stats.items()}


def bops_costs(
    stats: Mapping[str, LayerStats], bit_choices: Iterable[int] = (2, 4, 8), activation_bits: int | None = None
) -> dict[str, dict[int, float]]:
    """HAWQ-V3's bit operations ``bops[layer][b] = MACs * b * b_a`` per sample.

    ``activation_bits=None`` pairs each weight width with the same activation width (HAWQ-V3's
    W4A4/W8A8 mixed setting); an integer fixes the activations (e.g. 8 for W*A8).
    """
    bits = validate_bit_choices(bit_choices)
    a = _check_activation_bits(activation_bits)
    return {name: {b: float(s.macs * b * (a or b)) for b in bits} for name, s in stats.items()}


def budget_between(
    costs_resource: Mapping[str, Mapping[int, float]], fraction: float, low_bits: int = 4, high_bits: int = 8
) -> float:
    """HAWQ-V3's budget: ``fraction`` of the way from every layer at ``low_bits`` to every layer at ``high_bits``.

    ``costs_resource`` is one resource's table, e.g. ``costs["size"]``; ``fraction`` 0 gives the
    all-``low_bits`` cost and 1 the all-``high_bits`` cost.
    """
    if not isinstance(fraction, Real) or not 0 <= fraction <= 1:
        raise ValueError(
            f"fraction must be in [0, 1] (0: all {low_bits}-bit, 1: all {high_bits}-bit), got {fraction!r}"
        )
    for bits in (low_bits, high_bits):
        missing = [name for name, table in costs_resource.items() if bits not in table]
        if missing:
            raise ValueError(f"costs_resource has no {bits}-bit cost for layers {missing}; add {bits} to bit_choices")
    low = math.fsum(table[low_bits] for table in costs_resource.values())
    high = math.fsum(table[high_bits] for table in costs_resource.values())
    return low + fraction * (high - low)


def model_size(stats: Mapping[str, LayerStats], bits: Mapping[str, int] | None = None, unit: str = "bits") -> float:
    """Storage of the quantizable layers: weights at ``bits[layer]`` (32 when absent), biases at 32 bits.

    ``bits=None`` gives the float (32-bit) size for reports.
    """
    bits = bits or {}
    check_layer_bits(stats, bits)
    total = sum(s.params * bits.get(name, FLOAT_BITS) + s.bias * FLOAT_BITS for name, s in stats.items())
    return total / _unit(unit)


def model_bops(
    stats: Mapping[str, LayerStats], bits: Mapping[str, int] | None = None, activation_bits: int | None = None
) -> float:
    """Per-sample bit operations ``sum MACs * b_w * b_a`` of the quantizable layers.

    Layers absent from ``bits`` (all of them for ``bits=None``) count as float: ``b_w = b_a = 32``.
    ``activation_bits`` as in :func:`bops_costs`.
    """
    bits = bits or {}
    check_layer_bits(stats, bits)
    a = _check_activation_bits(activation_bits)
    total = 0
    for name, s in stats.items():
        if name in bits:
            total += s.macs * bits[name] * (a or bits[name])
        else:
            total += s.macs * FLOAT_BITS * FLOAT_BITS
    return float(total)


def _example_batch_size(example_input: Any) -> int:
    values = example_input.values() if isinstance(example_input, Mapping) else example_input
    if isinstance(values, torch.Tensor):
        values = [values]
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] > 0:
            return value.shape[0]
    raise ValueError(
        "example_input must be a batched tensor, a tuple/list or a dict holding one "
        f"(its leading dimension is the batch size), got {type(example_input).__name__}"
    )


def _check_activation_bits(activation_bits: int | None) -> int | None:
    a = activation_bits
    if a is not None and (not isinstance(a, Integral) or isinstance(a, bool) or not MIN_BITS <= a <= FLOAT_BITS):
        raise ValueError(
            f"activation_bits must be None (same as the weights) or an integer in {MIN_BITS}..{FLOAT_BITS}, got {a!r}"
        )
    return activation_bits


def check_layer_bits(stats: Mapping[str, LayerStats], bits: Mapping[str, int]) -> None:
    """``bits`` names layers of ``stats`` only, each with a width in 2..8."""
    unknown = [name for name in bits if name not in stats]
    if unknown:
        raise ValueError(f"bits names layers {unknown} that stats does not have; stats has {list(stats)}")
    for name, b in bits.items():
        validate_bits(b, f"bits[{name!r}]")


def _unit(unit: str) -> int:
    return _UNITS[check_choice(unit, "unit", _UNITS)]
