"""``HAWQModule``'s settings in four groups, each checked when it is built (``__post_init__``).

``ProbeOptions`` say what the sensitivities and activation ranges are measured on (the probe set and the loss),
``SensitivityOptions`` how the sensitivity is measured, ``QuantizationOptions`` which quantized network is planned
(fixed bits or budgets, activation bits, weight groups) and ``FineTuneOptions`` how it is fine-tuned. Every field is
also a flat keyword of ``HAWQModule`` of the same name (``bits=``, ``metric=``, the Hydra keys of ``conf/``), and
:func:`merge_options` turns either form into the groups. The checks that need the wrapped module (layer names, a
BatchNorm layer, a ``forward``) run when ``HAWQModule`` is built.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from numbers import Real
from typing import Any

import torch

from lightning_hessian.checks import check_choice, check_number, check_positive_int, check_seed
from lightning_hessian.hessian.operator import LossFn
from lightning_hessian.hessian.trace import MIN_TRACE_SAMPLES
from lightning_hessian.quant.allocation import SOLVERS
from lightning_hessian.quant.distill import distill_data
from lightning_hessian.quant.quantizers import FOLLOW, validate_act_bits, validate_bit_choices, validate_bits
from lightning_hessian.quant.sensitivity import METRICS

RESOURCES = ("size", "bops")
CALIBRATIONS = ("data", "distilled")  # where the probe set comes from: real samples, or ZeroQ's distilled inputs
_SET_BY_HAWQ = ("model", "input_shape", "num_samples", "seed", "device")  # distill_data arguments HAWQModule passes


@dataclass
class ProbeOptions:
    """The probe set the sensitivities and activation ranges are measured on, and the loss (``HAWQModule(probe=)``).

    >>> ProbeOptions(calibration="distilled", example_input=torch.zeros(2, 3, 32, 32), probe_size=64).input_shape
    (3, 32, 32)

    Args:
        calibration: ``"data"`` (``probe_data``, or ``probe_size`` training samples drawn with ``seed``) or
            ``"distilled"`` (ZeroQ, no data: ``probe_size`` inputs distilled from the module's BatchNorm statistics).
        probe_data: the probe batches (a list of batches or a DataLoader) for ``calibration="data"``.
        probe_size: number of probe samples (drawn from the training data, or distilled).
        probe_batch_size: size of the probe batches.
        seed: seed of the probe draw, of the distillation and of the Hutchinson probes.
        loss_fn: ``loss_fn(module, batch)`` for the Hessian; ``None``: ``module.hessian_loss`` or cross-entropy
            on ``(x, y)`` batches.
        example_input: an input of the module for the size/BOPS costs; ``None``: from the first probe batch.
        input_shape: one input sample's shape for ``"distilled"``; ``None``: that of a tensor ``example_input``.
        distill: further keyword arguments of :func:`~lightning_hessian.quant.distill.distill_data`.
    """

    calibration: str = "data"
    probe_data: Iterable[Any] | None = None
    probe_size: int = 512
    probe_batch_size: int = 256
    seed: int = 0
    loss_fn: LossFn | None = None
    example_input: Any = None
    input_shape: Sequence[int] | None = None
    distill: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        check_choice(self.calibration, "calibration", CALIBRATIONS)
        for name in ("probe_size", "probe_batch_size"):
            check_positive_int(getattr(self, name), name)
        check_seed(self.seed)
        self.distill = _check_distill(self.distill)
        if self.input_shape is None and self.calibration == "distilled":
            if not isinstance(self.example_input, torch.Tensor):
                raise ValueError("calibration='distilled' needs the shape of one input sample: pass input_shape=, e.g. "
                                 "(3, 32, 32), or a tensor example_input=")
            self.input_shape = self.example_input.shape[1:]
        if self.input_shape is not None:
            shape = tuple(self.input_shape)
            if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
                raise ValueError(f"input_shape must be positive ints (one sample's shape, e.g. (3, 32, 32)), got "
                                 f"{self.input_shape!r}")
            self.input_shape = tuple(int(s) for s in shape)


@dataclass
class SensitivityOptions:
    """How each layer's sensitivity is measured on the probe set (``HAWQModule(sensitivity=)``).

    >>> SensitivityOptions(metric="qbert").max_samples
    200

    Args:
        metric: one of :data:`~lightning_hessian.quant.sensitivity.METRICS` (see ``HAWQModule``).
        trace_rel_tol: the Hutchinson stopping rule: relative standard error of every layer's trace.
        max_samples: the Hutchinson cap on probes (at least the 32 every trace takes first).
        cache_dir: folder of the sensitivity cache (re-planning the same model and probe set is then free).
    """

    metric: str = "trace"
    trace_rel_tol: float = 0.05
    max_samples: int = 200
    cache_dir: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        check_choice(self.metric, "metric", METRICS)
        check_positive_int(self.max_samples, "max_samples")
        if self.max_samples < MIN_TRACE_SAMPLES:
            raise ValueError(f"max_samples={self.max_samples} is below the {MIN_TRACE_SAMPLES} Hutchinson probes "
                             f"every trace takes first; pass max_samples >= {MIN_TRACE_SAMPLES}")
        check_number(self.trace_rel_tol, "trace_rel_tol", 0, low_open=True)  # kept as given: the cache key reads it


@dataclass
class QuantizationOptions:
    """The quantized network: fixed bits or a plan within budgets, and how weights and activations round
    (``HAWQModule(quantization=)``).

    >>> QuantizationOptions(budgets={"size": 1, "bops": 0.25}, bit_choices=[8, 4, 8]).bit_choices
    [4, 8]

    Args:
        bits: a fixed configuration instead of a plan: an int for every layer or ``{layer: bits}``.
        budgets: plan the bits within ``{"size": ..., "bops": ...}`` (fractions in ``[0, 1]``, else absolute).
        bit_choices: candidate weight bit widths (2..8) for the plan.
        act_bits: activation bit width (2..8) of every layer's input, or ``"follow"`` (each layer's weight bits).
        ties: groups of layer names that must share a bit width.
        solver: OR-Tools solver of :func:`~lightning_hessian.quant.allocation.allocate_bits`.
        groups: which weights share a scale (:func:`~lightning_hessian.quant.swap.resolve_groups`); ``None``: per
            output channel.
        momentum: activation range tracking: ``None`` running min/max, else the EMA momentum in ``(0, 1]``.
        report_dir: where ``hawq_report.md``/``.png`` go; ``None``: ``<trainer.default_root_dir>/hawq``.
    """

    bits: int | Mapping[str, int] | None = None
    budgets: Mapping[str, float] | None = None
    bit_choices: Sequence[int] = (4, 8)
    act_bits: int | str = 8
    ties: Iterable[Iterable[str]] = ()
    solver: str = "cbc"
    groups: Any = None
    momentum: float | None = None
    report_dir: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        if self.bits is not None and self.budgets is not None:
            raise ValueError("pass either bits= (a fixed configuration) or budgets= (a plan), not both")
        if isinstance(self.bits, Mapping):
            self.bits = {name: validate_bits(b, f"bits[{name!r}]") for name, b in self.bits.items()}
        elif self.bits is not None:
            self.bits = validate_bits(self.bits, "bits")
        if self.budgets is not None:
            self.budgets = _check_budgets(self.budgets)
        self.bit_choices = validate_bit_choices(self.bit_choices)
        self.act_bits = validate_act_bits(self.act_bits, "act_bits")
        self.ties = _check_ties(self.ties)
        if self.solver not in SOLVERS:
            raise ValueError(f"solver={self.solver!r} is not supported; use one of {SOLVERS}")
        if self.momentum is not None:
            check_number(self.momentum, "momentum (None: running min/max)", 0, 1, low_open=True)


@dataclass
class FineTuneOptions:
    """The quantization-aware fine-tune (``HAWQModule(finetune=)``).

    >>> FineTuneOptions(distill_weight=0.5, temperature=2).temperature
    2.0

    Args:
        optimizer: factory ``optimizer(params)``; ``None``: the wrapped module's own ``configure_optimizers``.
        distill_weight: ``w`` in ``(1 - w) * task_loss + w * T^2 * KL(teacher || student)`` on the float
            model's logits (0: no distillation).
        temperature: the distillation temperature ``T``.
    """

    optimizer: Callable[..., torch.optim.Optimizer] | None = None
    distill_weight: float = 0.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        self.distill_weight = check_number(self.distill_weight, "distill_weight (0: no distillation)", 0, 1)
        self.temperature = check_number(self.temperature, "temperature", 0, low_open=True)


OPTION_GROUPS: dict[str, type] = {
    "probe": ProbeOptions, "sensitivity": SensitivityOptions, "quantization": QuantizationOptions,
    "finetune": FineTuneOptions,
}
FLAT_KEYS = tuple(f.name for cls in OPTION_GROUPS.values() for f in fields(cls))


def merge_options(flat: Mapping[str, Any], groups: Mapping[str, Any]) -> dict[str, Any]:
    """The four option groups from flat keywords (``None``: not given) and group objects (``None``: not given).

    A flat keyword fills its field of a group not given; beside a group given, it must agree with the group's
    value (after the group's own normalisation), else a ``ValueError`` names both. The groups' checks also
    apply to the combination, e.g. ``QuantizationOptions(budgets=...)`` beside a flat ``bits=``.

    >>> merge_options({"metric": "qbert"}, {})["sensitivity"].metric
    'qbert'
    """
    unknown = sorted(set(flat) - set(FLAT_KEYS))
    if unknown:
        raise TypeError(f"unknown HAWQModule options {unknown}")
    out = {}
    for name, cls in OPTION_GROUPS.items():
        given = groups.get(name)
        keys = {f.name: flat[f.name] for f in fields(cls) if flat.get(f.name) is not None}
        if given is None:
            out[name] = cls(**keys)
            continue
        if not isinstance(given, cls):
            raise TypeError(f"{name} must be a {cls.__name__} (or None), got {type(given).__name__}")
        merged = replace(given, **keys)
        for key, value in keys.items():
            if not _same(getattr(merged, key), getattr(given, key)):
                raise ValueError(f"{key}={value!r} and {name}={cls.__name__}(..., {key}={getattr(given, key)!r}) set "
                                 f"{key} twice with different values; set it in one place")
        out[name] = merged
    return out


def check_combination(sensitivity: SensitivityOptions, quantization: QuantizationOptions) -> None:
    """The checks between groups that need no module: ``metric="quadratic+act"`` needs ``act_bits="follow"``."""
    if sensitivity.metric == "quadratic+act" and quantization.act_bits != FOLLOW:
        raise ValueError(f"metric='quadratic+act' prices each layer's input activations at the layer's bits, so it "
                         f"needs act_bits={FOLLOW!r} (got act_bits={quantization.act_bits!r}); use 'quadratic' "
                         "otherwise")


def _same(a: Any, b: Any) -> bool:
    """Equality that also holds for tensors (``example_input``) and lists of them (``probe_data``)."""
    if a is b:
        return True
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):  # tensors of several elements, or of different shapes
        return False


def _check_distill(distill: Mapping[str, Any] | None) -> dict[str, Any]:
    """``distill_data``'s further options, none of those HAWQModule sets itself."""
    if distill is not None and not isinstance(distill, Mapping):
        raise ValueError(f"distill must be a mapping of distill_data options, e.g. {{'max_steps': 200}}, got "
                         f"{distill!r}")
    options = dict(distill or {})
    reserved = sorted(set(_SET_BY_HAWQ) & set(options))
    if reserved:
        raise ValueError(f"distill: {reserved} are set by HAWQModule (probe_size, seed, input_shape and the run's "
                         "device); leave them out")
    unknown = sorted(set(options) - set(inspect.signature(distill_data).parameters))
    if unknown:
        raise ValueError(f"distill: unknown options {unknown}; distill_data takes batch_size, max_steps, lr, tol, "
                         "patience, input_prior, progress")
    return options


def _check_budgets(budgets: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(budgets, Mapping) or not budgets:
        raise ValueError(f"budgets must be a non-empty mapping such as {{'size': 0.5}}, got {budgets!r}")
    out = {}
    for resource, value in budgets.items():
        if resource not in RESOURCES:
            raise ValueError(f"budgets: unknown resource {resource!r}; use {RESOURCES}")
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"budgets[{resource!r}] must be a finite number >= 0 (a fraction in [0, 1] or an "
                             f"absolute budget), got {value!r}")
        out[resource] = float(value)
    return out


def _check_ties(ties: Iterable[Iterable[str]]) -> list[tuple[str, ...]]:
    """``ties`` as tuples of layer names (whether the layers exist, ``HAWQModule`` checks)."""
    if isinstance(ties, str) or not isinstance(ties, Iterable):
        raise TypeError(f"ties must be groups of layer names, e.g. [('conv1', 'shortcut.0')], got {ties!r}")
    groups = []
    for group in ties:
        if isinstance(group, str) or not isinstance(group, Iterable):
            raise TypeError(f"ties must be groups of layer names, e.g. [('conv1', 'shortcut.0')], got {group!r}")
        groups.append(tuple(group))
    return groups
