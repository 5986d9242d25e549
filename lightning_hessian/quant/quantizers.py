"""Uniform symmetric quantizers with straight-through estimators, and the dyadic integer arithmetic.

Weights are quantized per output channel, ``scale_c = max|w_c| / (2^(b-1) - 1)``; activations per tensor,
signed (``[-(2^(b-1)-1), 2^(b-1)-1]``) or unsigned after a ReLU (``[0, 2^b - 1]``), with ranges tracked by
running min/max or an exponential moving average and frozen in eval mode. Biases are quantized to int32
with scale ``s_w * s_in`` (HAWQ-V3), so they add straight into the integer accumulator.

Requantization between layers multiplies by a *dyadic* number ``m / 2^c`` (``dyadic``) and shifts with
round-half-up (``requantize``): integer multiply, add and shift only. The training-time simulation and
the integer model both call these two functions, which is what makes them agree bit for bit.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from numbers import Integral

import torch
import torch.distributed as dist
from torch import Tensor, nn

MIN_BITS, MAX_BITS = 2, 8
FOLLOW = "follow"  # act_bits: each layer's input activations take its weight bits (HAWQ-V3's W4A4/W8A8)
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
MANTISSA_BITS = 30  # m in [2^29, 2^30): |n * m| + 2^(c-1) < 2^62 for any int32 n (room for an offset of 2^62)
MAX_SHIFT = 54  # keeps 128 * 2^c (an int8 offset folded into the rounding) and x * m + 2^62 inside int64


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


def round_ste(x: Tensor) -> Tensor:
    """``round(x)`` in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


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
        signed: ``True`` for a symmetric signed code, ``False`` for an unsigned one (after a ReLU),
            ``None`` to decide from the observed range (unsigned when the running minimum is >= 0).
        momentum: ``None`` tracks the running min/max over all training batches; a float in (0, 1]
            tracks an exponential moving average ``r <- (1 - momentum) * r + momentum * batch_r``.

    Before the first training batch the range is unknown and ``forward`` passes its input through
    unchanged (e.g. during Lightning's sanity check); integer simulation and conversion refuse that state.
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
        return qrange(self.bits, self.is_signed)

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


def dyadic(multiplier: Tensor) -> tuple[Tensor, Tensor]:
    """Approximate positive real multipliers by dyadic numbers ``m / 2^c``, vectorised.

    Returns int64 tensors ``m`` (a 30-bit mantissa in ``[2^29, 2^30)``, so it fits an int32) and ``c``
    (shift, 1..54), chosen so the relative error is below ``2^-29``. Multipliers below ``2^-24`` keep
    ``c = 54`` with a shorter mantissa: the absolute error on any int32 input stays below ``2^-24``.
    Multipliers of ``2^29`` or more are rejected.
    """
    multiplier = multiplier.double()
    if not bool((multiplier > 0).all()) or not bool(torch.isfinite(multiplier).all()):
        raise ValueError("dyadic multipliers must be positive and finite (a scale is zero, negative or nan)")
    frac, exp = torch.frexp(multiplier)  # multiplier = frac * 2^exp, frac in [0.5, 1)
    shift = MANTISSA_BITS - exp.long()
    mantissa = torch.round(frac * 2.0**MANTISSA_BITS).long()  # exact: scaling by a power of two
    carry = mantissa == 2**MANTISSA_BITS
    mantissa = torch.where(carry, mantissa // 2, mantissa)
    shift = torch.where(carry, shift - 1, shift)
    if bool((shift < 1).any()):
        raise ValueError(f"requantization multiplier {multiplier.max().item():g} is too large (>= 2^29)")
    small = shift > MAX_SHIFT
    if bool(small.any()):
        mantissa = torch.where(small, torch.round(multiplier * 2.0**MAX_SHIFT).long(), mantissa)
        shift = shift.clamp_max(MAX_SHIFT)
    return mantissa, shift


def requantize(n: Tensor, mantissa: Tensor, shift: Tensor, qmin: int | None = None,
               qmax: int | None = None) -> Tensor:
    """``clamp((n * m + 2^(c-1)) >> c, qmin, qmax)`` in int64: ``round-half-up(n * m / 2^c)``, clamped.

    ``n`` must hold integers with ``|n| < 2^31`` (int32 accumulators); the product then fits int64.
    """
    out = (n.long() * mantissa + (1 << (shift - 1))) >> shift
    if qmin is not None or qmax is not None:
        out = out.clamp(qmin, qmax)
    return out
