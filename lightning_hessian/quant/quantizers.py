"""Uniform symmetric quantizers with straight-through estimators, and the deployed integer arithmetic.

Weights are quantized per output channel, ``scale_c = max|w_c| / (2^(b-1) - 1)``, or group-wise
(``WeightGroups``: one scale per block of consecutive output rows and input columns); activations per tensor,
signed (``[-2^(b-1), 2^(b-1)-1]``) or unsigned after a ReLU (``[0, 2^b - 1]``), with ranges tracked by
running min/max or an exponential moving average and frozen in eval mode. Biases are quantized to int32
with scale ``s_w * s_in`` (HAWQ-V3), so they add straight into the integer accumulator.

The deployed arithmetic is onnxruntime's (the CPU kernels of ``QuantizeLinear``, ``QLinearConv``,
``QGemm`` and ``QLinearAdd`` on x86-64): int8 x int8 products summed exactly in int32, then one float32
multiply per output and a round-half-to-even (``requantize``); a residual addition is two fused float32
multiply-adds (``requantize_sum``). Activation codes live in uint8 containers, with zero point 128 for
signed codes (``zero_point``). These functions are that arithmetic, bit for bit (tests check them
against onnxruntime itself); ``lightning_hessian.quant.integer`` runs a model with them, and
quantization-aware training rounds at the same places with the same rounding (``fake_quantize``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from numbers import Integral

import torch
import torch.distributed as dist
from torch import Tensor, nn

MIN_BITS, MAX_BITS = 2, 8
FOLLOW = "follow"  # act_bits: each layer's input activations take its weight bits (HAWQ-V3's W4A4/W8A8)
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def validate_bits(bits: object, name: str = "bits") -> int:
    """Return ``bits`` as an int if it is an integer in 2..8, else raise an error naming ``name``.

    The one bit-width check of the package: arguments, dict values and table keys all go through it.
    """
    if isinstance(bits, bool) or not isinstance(bits, Integral):
        raise TypeError(f"{name} must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r} ({type(bits).__name__})")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name}={bits} is outside the supported bit widths {MIN_BITS}..{MAX_BITS}")
    return int(bits)


def validate_bit_choices(bit_choices: Iterable[int], name: str = "bit_choices") -> list[int]:
    """Sorted distinct candidate bit widths, each checked by :func:`validate_bits`; at least one."""
    bits = sorted({validate_bits(b, name) for b in bit_choices})
    if not bits:
        raise ValueError(f"{name} must hold at least one bit width in {MIN_BITS}..{MAX_BITS}, e.g. (4, 8)")
    return bits


def validate_act_bits(act_bits: int | str, name: str = "act_bits") -> int | str:
    """Return ``act_bits`` if it is an int in 2..8 (every layer) or ``"follow"`` (each layer's weight bits)."""
    if isinstance(act_bits, str):
        if act_bits != FOLLOW:
            raise ValueError(f"{name}={act_bits!r} is not supported: use an int in {MIN_BITS}..{MAX_BITS} (the same "
                             f"bits for every layer's activations) or {FOLLOW!r} (activation bits = weight bits)")
        return act_bits
    return validate_bits(act_bits, name)


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a symmetric signed (``±(2^(b-1)-1)``) or unsigned (``0..2^b-1``) b-bit code."""
    if signed:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def fake_quantize(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """``clamp(round(x / scale), qmin, qmax) * scale`` with a straight-through gradient.

    The gradient with respect to ``x`` is exactly 1 inside ``[qmin*scale, qmax*scale]`` and 0 outside
    (the clamp is applied in the value domain so no ``1/scale * scale`` rounding touches it).
    """
    scale = scale.detach()
    clamped = torch.clamp(x, qmin * scale, qmax * scale)
    return clamped + (torch.round(clamped / scale) * scale - clamped).detach()


def quantize(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """Integer codes ``clamp(round(x / scale), qmin, qmax)`` (same dtype as ``x``; no gradient)."""
    return torch.clamp(torch.round(x.detach() / scale), qmin, qmax)


def weight_scale(weight: Tensor, bits: int) -> Tensor:
    """Per-output-channel scale ``max|w_c| / (2^(b-1)-1)``, shape ``(out_channels,)``, detached.

    An all-zero channel (pruned, or folded with a zero BatchNorm gain) codes to zeros at any scale: it takes
    the largest channel's scale (1 if all are zero), so its int32 bias grid ``s_w * s_in`` stays as fine as
    the other channels' instead of overflowing.
    """
    _, qmax = qrange(bits, signed=True)
    scale = weight.detach().abs().flatten(1).amax(dim=1) / qmax
    largest = scale.max()
    return torch.where(scale > 0, scale, torch.where(largest > 0, largest, 1.0))


def _per_channel(scale: Tensor, like: Tensor) -> Tensor:
    return scale.view(-1, *([1] * (like.dim() - 1)))


def weight_codes(weight: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Integer weight codes (float tensor holding integers) and their per-channel scale."""
    scale = weight_scale(weight, bits)
    qmin, qmax = qrange(bits, signed=True)
    return quantize(weight, _per_channel(scale, weight), qmin, qmax), scale


def quantize_weight(weight: Tensor, bits: int, scale: Tensor | None = None, groups: WeightGroups | None = None
                    ) -> Tensor:
    """Fake-quantized weight ``Q_b(W)`` with a straight-through (identity) gradient, per channel or in ``groups``;
    ``scale`` is ``weight_scale(weight, bits)`` (per channel) or ``group_scales(weight, bits, groups)`` when the
    caller already has it."""
    validate_bits(bits, "bits")
    qmin, qmax = qrange(bits, signed=True)
    if groups is not None and not groups.per_channel:
        scale = element_scale(group_scales(weight, bits, groups) if scale is None else scale, groups, weight)
    else:
        scale = _per_channel(weight_scale(weight, bits) if scale is None else scale, weight)
    # every weight is in range by construction: clamping the codes only (not the values) keeps the gradient
    # 1 on max|w_c|, which a value-domain clamp at qmax * scale (rounded below max|w_c|) could cut
    return weight + (quantize(weight, scale, qmin, qmax) * scale - weight).detach()


@dataclass(frozen=True)
class WeightGroups:
    """Which weights share a scale: blocks of ``rows`` consecutive output rows by ``columns`` consecutive input columns.

    ``rows=1, columns=None`` (the default) is per output channel; ``rows=None`` takes all rows and ``columns=None`` the
    whole row, so ``WeightGroups(None, None)`` is one scale per tensor. Groups of input columns (``columns=32``,
    int4 practice) are finer than per-channel scales and need a 2-D weight (``Linear``, ``Embedding``: an embedding's
    rows are its tokens, its columns the features); groups of rows (Q-BERT's) are coarser and apply to any weight.
    Each block's scale is ``max|w_block| / (2^(b-1) - 1)``, so one block per row is per-channel and one block is
    per-tensor, bit for bit:

    >>> weight = torch.randn(6, 8)
    >>> torch.equal(quantize_weight(weight, 4, groups=WeightGroups(rows=1, columns=8)), quantize_weight(weight, 4))
    True
    >>> WeightGroups(columns=4).blocks((6, 8)), WeightGroups.parse("tensor").blocks((6, 8))  # one block's rows, columns
    ((1, 4), (6, 8))
    >>> str(WeightGroups.parse({"columns": 4}))
    'groups of 4 columns'
    """

    rows: int | None = 1
    columns: int | None = None

    def __post_init__(self):
        for name in ("rows", "columns"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, Integral) or value < 1):
                raise ValueError(f"WeightGroups.{name} must be a positive int or None (all of them), got {value!r}")

    @classmethod
    def parse(cls, spec: WeightGroups | Mapping[str, int | None] | str | None) -> WeightGroups:
        """A ``WeightGroups`` from itself, ``None`` or ``"channel"`` (per-channel), ``"tensor"`` (per-tensor), or a
        mapping with keys ``rows`` and/or ``columns`` (e.g. from a config file)."""
        if spec is None or spec == "channel":
            return cls()
        if spec == "tensor":
            return cls(None, None)
        if isinstance(spec, WeightGroups):
            return spec
        if isinstance(spec, Mapping) and set(spec) <= {"rows", "columns"}:
            return cls(**spec)
        raise ValueError(f"weight groups must be 'channel', 'tensor', a WeightGroups or a mapping with keys 'rows' and "
                         f"'columns' (e.g. {{'columns': 32}}), got {spec!r}")

    @property
    def per_channel(self) -> bool:
        return self.rows == 1 and self.columns is None

    def blocks(self, shape: tuple[int, ...] | torch.Size, name: str = "weight") -> tuple[int, int]:
        """``(rows, columns)`` of one block of a ``shape`` weight; an error naming ``name`` if they do not tile it."""
        out, inner = shape[0], math.prod(shape[1:])
        rows = out if self.rows is None else self.rows
        if self.columns is not None and len(shape) != 2:
            raise ValueError(f"{name}: groups of input columns need a 2-D weight (Linear, Embedding), got shape "
                             f"{tuple(shape)}; use rows= groups or per-channel scales")
        columns = inner if self.columns is None else self.columns
        if out % rows or inner % columns:
            raise ValueError(f"{name}: groups of {rows} rows x {columns} columns do not tile its {out} x {inner} "
                             "weight; choose sizes that divide it")
        return rows, columns

    def __str__(self) -> str:
        if self.per_channel:
            return "per-channel"
        if self.rows is None and self.columns is None:
            return "per-tensor"
        if self.rows == 1:
            return f"groups of {self.columns} columns"
        rows = "all rows" if self.rows is None else f"{self.rows} rows"
        return f"groups of {rows}" + ("" if self.columns is None else f" x {self.columns} columns")


def group_scales(weight: Tensor, bits: int, groups: WeightGroups) -> Tensor:
    """One scale per block, ``max|w_block| / (2^(b-1)-1)``, shape ``(out_rows / rows, in / columns)``, detached.

    An all-zero block codes to zeros at any scale: it takes the largest scale of its rows, else of the tensor (1 if
    all are zero), as :func:`weight_scale` does for a channel (the int32 bias grid ``row scale * s_in`` stays fine).
    """
    rows, columns = groups.blocks(weight.shape)
    _, qmax = qrange(bits, signed=True)
    w = weight.detach().abs().reshape(weight.shape[0] // rows, rows, -1, columns)
    scale = w.amax(dim=(1, 3)) / qmax
    row_max = scale.amax(dim=1, keepdim=True)
    largest = scale.max()
    fallback = torch.where(row_max > 0, row_max, torch.where(largest > 0, largest, 1.0))
    return torch.where(scale > 0, scale, fallback)


def element_scale(scales: Tensor, groups: WeightGroups, weight: Tensor) -> Tensor:
    """Block scales (:func:`group_scales`) spread to broadcast against ``weight``: ``(out, 1, ...)`` when a block
    spans whole rows, else ``(out, in)``."""
    rows, columns = groups.blocks(weight.shape)
    per_row = scales.repeat_interleave(rows, dim=0)
    if columns == math.prod(weight.shape[1:]):
        return _per_channel(per_row[:, 0], weight)
    return per_row.repeat_interleave(columns, dim=1)


def row_scale(scales: Tensor, groups: WeightGroups, out_rows: int) -> Tensor:
    """Each output row's largest block scale, shape ``(out_rows,)``: the per-channel scale ``max|w_c| / qmax``
    (division by ``qmax`` is monotonic), the grid of the row's int32 bias."""
    return scales.amax(dim=1).repeat_interleave(out_rows // scales.shape[0])


def group_codes(weight: Tensor, bits: int, groups: WeightGroups) -> tuple[Tensor, Tensor]:
    """Integer weight codes (float tensor holding integers) and their block scales (:func:`group_scales`)."""
    scales = group_scales(weight, bits, groups)
    qmin, qmax = qrange(bits, signed=True)
    return quantize(weight, element_scale(scales, groups, weight), qmin, qmax), scales


def bias_codes(bias: Tensor, scale: Tensor) -> Tensor:
    """int32 bias codes ``round(b / scale)`` as int64 (computed in float64; clamped to the int32 range, with a
    warning when that changes a bias)."""
    codes = torch.round(bias.detach().double() / scale.double())
    if bool((codes.abs() > INT32_MAX).any()):
        warnings.warn(f"bias codes exceed int32 on the accumulator grid s_w * s_in (smallest {scale.min().item():.3g}):"
                      " they are clamped, so the quantized bias is wrong; a channel with tiny weights and a large "
                      "bias needs its weights or bias rescaled", UserWarning, stacklevel=2)
    return torch.clamp(codes, INT32_MIN, INT32_MAX).long()


def quantize_bias(bias: Tensor, scale: Tensor) -> Tensor:
    """Fake-quantized int32 bias on the accumulator grid ``scale = s_w * s_in``, identity gradient."""
    return fake_quantize(bias, scale.to(bias.dtype), INT32_MIN, INT32_MAX)


class ActivationQuantizer(nn.Module):
    """Per-tensor activation fake-quantizer with a range tracked in training and frozen in eval.

    Args:
        bits: bit width, 2..8.
        signed: ``True`` for a signed code, ``False`` for an unsigned one (after a ReLU), ``None`` to decide
            from the observed range (unsigned when the running minimum is >= 0). A signed code's scale maps
            the larger of ``|min|``, ``|max|`` to ``2^(b-1) - 1``; its range also holds ``-2^(b-1)`` (values
            beyond the observed range), so it fills its int8 container and the deployed kernels need no
            extra clamp.
        momentum: ``None`` tracks the running min/max over all training batches; a float in (0, 1]
            tracks an exponential moving average ``r <- (1 - momentum) * r + momentum * batch_r``.

    Before the first training batch the range is unknown and ``forward`` passes its input through
    unchanged (e.g. during Lightning's sanity check); integer conversion refuses that state.

    >>> q = ActivationQuantizer(bits=8)
    >>> _ = q(torch.tensor([0.0, 1.0, 2.55]))  # training: the range [0, 2.55] is tracked, so the code is unsigned
    >>> q.is_signed, q.qrange(), q.scale()
    (False, (0, 255), tensor(0.0100))
    >>> q.eval()(torch.tensor([0.123, 9.0]))  # frozen in eval: rounded to the grid, clamped to the range
    tensor([0.1200, 2.5500])
    """

    def __init__(self, bits: int = 8, signed: bool | None = None, momentum: float | None = None):
        super().__init__()
        self.bits = validate_bits(bits, "act_bits")
        if signed not in (True, False, None):
            raise TypeError(f"signed must be True, False or None (decide from the range), got {signed!r}")
        if momentum is not None and not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum={momentum} must be in (0, 1], or None for running min/max")
        self.signed = signed
        self.momentum = momentum
        self.register_buffer("running_min", torch.zeros(()))
        self.register_buffer("running_max", torch.zeros(()))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))

    @property
    def is_signed(self) -> bool:
        """Whether the code is signed (fixed, or decided by the observed running minimum)."""
        return self.signed if self.signed is not None else bool(self.running_min < 0)

    def qrange(self) -> tuple[int, int]:
        """Code range: ``[-2^(b-1), 2^(b-1) - 1]`` signed, ``[0, 2^b - 1]`` unsigned."""
        qmin, qmax = qrange(self.bits, self.is_signed)
        return (qmin - 1 if qmin < 0 else qmin), qmax

    def scale(self) -> Tensor:
        """Scale of the code: ``max(|min|, |max|) / qmax`` (signed) or ``max / qmax`` (unsigned)."""
        _, qmax = self.qrange()
        if self.is_signed:
            bound = torch.maximum(self.running_min.abs(), self.running_max.abs())
        else:
            bound = self.running_max.clamp_min(0)
        return torch.where(bound > 0, bound / qmax, 1.0)  # a zero range codes to zeros at any scale

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Update the tracked range with a batch (called by ``forward`` in training mode)."""
        lo, hi = x.detach().min().float(), x.detach().max().float()
        if not self.calibrated:
            self.running_min.copy_(lo)
            self.running_max.copy_(hi)
        elif self.momentum is None:
            self.running_min.copy_(torch.minimum(self.running_min, lo))
            self.running_max.copy_(torch.maximum(self.running_max, hi))
        else:
            self.running_min.lerp_(lo, self.momentum)
            self.running_max.lerp_(hi, self.momentum)
        self.calibrated.fill_(True)

    @torch.no_grad()
    def merge_ranks(self, group: dist.ProcessGroup | None = None) -> None:
        """Merge the range with the other ranks' (``torch.distributed``): min of the minima, max of the maxima.

        A rank that saw no input takes the others' range; the quantizer is calibrated if any rank was.
        """
        if not self.calibrated:
            self.running_min.fill_(float("inf"))
            self.running_max.fill_(float("-inf"))
        dist.all_reduce(self.running_min, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(self.running_max, op=dist.ReduceOp.MAX, group=group)
        self.calibrated.fill_(bool(torch.isfinite(self.running_max)))
        if not self.calibrated:  # no rank saw any input
            self.running_min.zero_()
            self.running_max.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.observe(x)
        if not self.calibrated:
            return x
        qmin, qmax = self.qrange()
        return fake_quantize(x, self.scale().to(x.dtype), qmin, qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, momentum={self.momentum}"


def zero_point(qmin: int) -> int:
    """Zero point of a code's uint8 container: 128 for signed codes (``qmin < 0``), 0 for unsigned ones."""
    return 128 if qmin < 0 else 0


def quantize_input(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """onnxruntime's ``QuantizeLinear``: ``clamp(round_half_even(float32(x) / scale))`` as int32 codes."""
    return torch.round(x.float() / scale.float()).clamp_(qmin, qmax).int()


def requantize(n: Tensor, acc_scale: Tensor, out_scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """onnxruntime's requantization of int32 accumulators (``QLinearConv``, ``QGemm``), as int32 codes.

    ``clamp(round_half_even(float32(n) * m))`` with the float32 multiplier ``m = acc_scale / out_scale``;
    ``acc_scale`` (per tensor, or broadcasting per channel) is the float32 product ``s_in * s_w`` that
    onnxruntime forms from the input and weight scales, so ``m`` is its multiplier to the bit.
    """
    m = acc_scale.float() / out_scale.float()
    return torch.round(n.float() * m).clamp_(qmin, qmax).int()


def dequantize(n: Tensor, scale: Tensor) -> Tensor:
    """Codes or accumulators to float32 as onnxruntime's ``DequantizeLinear`` and float-output ``QGemm``:
    ``float32(n) * scale``."""
    return n.float() * scale.float()


def fma32(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """``x * y + z`` for float32 tensors, rounded once to float32 (what a fused multiply-add computes).

    The product is exact in float64; the float64 sum is rounded to odd when inexact (its error from
    TwoSum), which makes the final rounding to float32 exact (53 >= 24 + 2 bits: Boldo and Melquiond).
    """
    p, z = x.double().mul_(y.double()), z.double()
    s = p + z
    back = s - p
    err = (s - back).neg_().add_(p).add_(back.neg_().add_(z))  # (p - (s - back)) + (z - back), in place
    inexact = err != 0
    if bool(inexact.any()):  # rare: only where |z| and |x * y| lie more than 2^20 apart
        bits = s.view(torch.int64)
        toward_err = torch.where((err > 0) == (s > 0), 1, -1)
        bits.copy_(torch.where(inexact & (bits & 1 == 0), bits + toward_err, bits))
    return s.float()


def requantize_sum(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, zp_a: int, zp_b: int, out_scale: Tensor,
                   qmin: int, qmax: int) -> Tensor:
    """onnxruntime's ``QLinearAdd`` of codes ``a`` and ``b`` (x86-64, AVX2 kernel), as int32 codes.

    On the uint8 containers ``a + zp_a`` and ``b + zp_b`` it computes, in float32 with the ratios
    ``r_a = scale_a / out_scale`` and ``r_b = scale_b / out_scale``, ``fma(a, r_a, fma(b, r_b, f))`` with
    ``f = zp_out - (r_a * zp_a + r_b * zp_b)``, rounds half to even and saturates to 0..255; the code is
    that minus ``zp_out``, clamped to ``[qmin, qmax]``.
    """
    zp_out = zero_point(qmin)
    ratio_a, ratio_b = scale_a.float() / out_scale.float(), scale_b.float() / out_scale.float()
    fixed = zp_out - (ratio_a * zp_a + ratio_b * zp_b)  # products by 0 or 128 are exact: no FMA question here
    a, b = (a + zp_a).double(), (b + zp_b).double()
    if _sums_exact_in_float64(float(ratio_a), float(ratio_b), float(fixed)):  # one rounding, to float32
        inner = b.mul_(ratio_b.double()).add_(fixed.double()).float()
        total = a.mul_(ratio_a.double()).add_(inner.double()).float()
    else:
        total = fma32(a, ratio_a, fma32(b, ratio_b, fixed))
    return torch.round(total).clamp_(0, 255).sub_(zp_out).clamp_(qmin, qmax).int()


def _sums_exact_in_float64(ratio_a: float, ratio_b: float, fixed: float) -> bool:
    """Whether ``a * r_a + (b * r_b + f)`` (containers 0..255, float32 operands) is exact in float64 at both
    sums: every term is a multiple of the finest float32 unit ``2^k`` among them, so the sums are exact
    while they stay below ``2^(k + 53)`` (the inner sum, rounded to float32, keeps the grid ``2^k``)."""
    k = min(math.frexp(v)[1] - 24 for v in (ratio_a, ratio_b, fixed) if v != 0)
    inner = 255 * abs(ratio_b) + abs(fixed)
    return 255 * abs(ratio_a) + 2 * inner < 2.0 ** (k + 52)
