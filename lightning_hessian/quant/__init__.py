"""Hessian-aware mixed-precision quantization (HAWQ): quantizers, quantized modules, sensitivity, bit
allocation with OR-Tools (and the exact Pareto frontier), data-free calibration data (ZeroQ), the ``HAWQModule``
LightningModule, and int8 inference with its ONNX export."""

from lightning_hessian._lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "lightning_hessian.quant.allocation": [
        "InfeasibleBudgetError", "NotProvenOptimalWarning", "ParetoPoint", "allocate_bits", "allocation_total",
        "pareto_frontier",
    ],
    "lightning_hessian.quant.attention": ["MultiheadAttention", "TransformerEncoderLayer", "unpack_attention"],
    "lightning_hessian.quant.costs": [
        "LayerStats", "bops_costs", "budget_between", "layer_costs", "layer_stats", "model_bops", "model_size",
        "size_costs",
    ],
    "lightning_hessian.quant.distill": ["batchnorm_mismatch", "distill_data"],
    "lightning_hessian.quant.export": ["export_onnx", "export_program"],
    "lightning_hessian.quant.hawq": ["HAWQModule"],
    "lightning_hessian.quant.hawq_options": [
        "FineTuneOptions", "ProbeOptions", "QuantizationOptions", "SensitivityOptions",
    ],
    "lightning_hessian.quant.integer": ["IntegerModel", "to_integer_model"],
    "lightning_hessian.quant.layers": [
        "QuantAct", "QuantAdaptiveAvgPool", "QuantConv1d", "QuantConv2d", "QuantEmbedding", "QuantLinear",
        "QuantResidualAdd", "calibrate",
    ],
    "lightning_hessian.quant.swap": ["QuantizationReport", "quantizable_layers", "quantize_model", "resolve_groups"],
    "lightning_hessian.quant.folding": ["fold_batchnorm"],
    "lightning_hessian.quant.quantizers": [
        "FOLLOW", "ActivationQuantizer", "WeightGroups", "quantize_weight", "requantize", "requantize_sum",
        "validate_act_bits", "validate_bits",
    ],
    "lightning_hessian.quant.report": ["BitReport", "LayerRow", "bit_report"],
    "lightning_hessian.quant.sensitivity": [
        "Sensitivity", "activation_quadratic_forms", "activation_ranges", "kl_divergences", "layer_sensitivity",
        "quadratic_forms", "subsample_top_eigenvalues", "weight_perturbation",
    ],
})
