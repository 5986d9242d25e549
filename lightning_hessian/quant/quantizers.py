"""Uniform symmetric quantizers with straight-through estimators, and the deployed integer arithmetic.

Weights are quantized per output channel, ``scale_c = max|w_c| / (2^(b-1) - 1)``; activations per tensor,
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
from collections.abc import Iterable
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


def quantize_weight(weight: Tensor, bits: int, scale: Tensor | None = None) -> Tensor:
    """Per-channel fake-quantized weight ``Q_b(W)`` with a straight-through (identity) gradient; ``scale`` is
    ``weight_scale(weight, bits)`` when the caller already has it."""
    validate_bits(bits, "bits")
    qmin, qmax = qrange(bits, signed=True)
    scale = _per_channel(weight_scale(weight, bits) if scale is None else scale, weight)
    # every weight is in range by construction: clamping the codes only (not the values) keeps the gradient
    # 1 on max|w_c|, which a value-domain clamp at qmax * scale (rounded below max|w_c|) could cut
    return weight + (quantize(weight, scale, qmin, qmax) * scale - weight).detach()


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
