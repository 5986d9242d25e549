"""Hessian-aware mixed-precision quantization (HAWQ): quantizers, quantized modules, sensitivity, bit
allocation with OR-Tools (and the exact Pareto frontier), data-free calibration data (ZeroQ), the ``HAWQModule``
LightningModule, and int8 inference with its ONNX export."""

from lightning_hessian.quant.allocation import (
    InfeasibleBudgetError,
    NotProvenOptimalWarning,
    ParetoPoint,
    allocate_bits,
    allocation_total,
    pareto_frontier,
)
from lightning_hessian.quant.costs import (
    LayerStats,
    bops_costs,
    budget_between,
    layer_costs,
    layer_stats,
    model_bops,
    model_size,
    size_costs,
)
from lightning_hessian.quant.distill import batchnorm_mismatch, distill_data
from lightning_hessian.quant.export import export_onnx, export_program
from lightning_hessian.quant.hawq import HAWQModule
from lightning_hessian.quant.integer import IntegerModel, to_integer_model
from lightning_hessian.quant.modules import (
    QuantAct,
    QuantAdaptiveAvgPool,
    QuantConv1d,
    QuantConv2d,
    QuantizationReport,
    QuantLinear,
    QuantResidualAdd,
    calibrate,
    fold_batchnorm,
    quantizable_layers,
    quantize_model,
)
from lightning_hessian.quant.quantizers import (
    FOLLOW,
    ActivationQuantizer,
    quantize_weight,
    requantize,
    requantize_sum,
    validate_act_bits,
    validate_bits,
)
from lightning_hessian.quant.report import BitReport, LayerRow, bit_report
from lightning_hessian.quant.sensitivity import (
    Sensitivity,
    activation_quadratic_forms,
    activation_ranges,
    kl_divergences,
    layer_sensitivity,
    quadratic_forms,
    weight_perturbation,
)

__all__ = [
    "ActivationQuantizer", "BitReport", "FOLLOW", "HAWQModule", "InfeasibleBudgetError", "IntegerModel", "LayerRow",
    "LayerStats", "NotProvenOptimalWarning", "ParetoPoint", "QuantAct", "QuantAdaptiveAvgPool", "QuantConv1d",
    "QuantConv2d", "QuantLinear", "QuantResidualAdd", "QuantizationReport", "Sensitivity", "activation_quadratic_forms",
    "activation_ranges", "allocate_bits",
    "allocation_total", "batchnorm_mismatch", "bit_report", "bops_costs", "budget_between", "calibrate",
    "distill_data", "export_onnx",
    "export_program", "fold_batchnorm", "kl_divergences", "layer_costs", "layer_sensitivity", "layer_stats",
    "model_bops", "model_size",
    "pareto_frontier", "quadratic_forms", "quantizable_layers", "quantize_model", "quantize_weight", "requantize",
    "requantize_sum", "size_costs", "to_integer_model", "validate_act_bits", "validate_bits",
    "weight_perturbation",
]
