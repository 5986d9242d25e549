"""Integer-only (dyadic) inference: convert a calibrated, BN-folded quantized model to ``IntegerModel``.

Between the input quantization (the one float op on entry) and the logit dequantization (the one on
exit) the model runs integer multiply, add and bit shift only:

- weights are int8 codes (4-bit and lower held in int8 containers), biases int32, activations int32
  tensors holding codes; conv and linear layers multiply int8 codes into int32 accumulators with
  ``torch._int_mm`` (a true int8 x int8 -> int32 GEMM on CPU; convolutions unfold their input with
  ``Tensor.unfold`` views first). Unsigned 8-bit codes (0..255) enter the GEMM shifted by -128, and the
  matching ``128 * sum(w)`` is folded into the bias, so the accumulator is exact.
  Why not float64 accumulation (exact too, since every |sum| < 2^53)? It would put float ops inside
  the graph; and why not int64 matmul? It has no fast CPU kernel (5-10x slower than float32 in our
  measurements, while ``_int_mm`` is faster than float32).
- every layer output is requantized by a dyadic multiplier ``m / 2^c`` per channel (30-bit mantissa,
  computed once at conversion, vectorised) with a round-half-up shift and a clamp; residual additions
  requantize both inputs to their output scale; average pooling is an integer window sum whose
  ``1/window`` rides in the next dyadic multiplier; ReLU is integer ``max(x, 0)``.
- every int32 sum is bounded at conversion from the weights and ranges alone (any input): a conv or linear
  accumulator, or a pooled window, that could pass ``2^31 - 1`` is refused rather than left to wrap.

Convolutions must have ``groups=1`` and ``padding_mode='zeros'`` (others are refused at conversion).

The conversion runs the model once in integer simulation (``set_integer_simulation``) on an example
input to learn the scale reaching every quantized layer, so it works on any model whose forward code
only reshapes and applies ReLU between quantized modules; anything else is reported with a clear error.
The result reproduces the simulation bit for bit.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_hessian.quant.modules import (
    _BATCHNORMS,
    QuantAct,
    QuantAdaptiveAvgPool,
    QuantResidualAdd,
    ScaledTensor,
    _float_leftovers,
    _QuantConv,
    _QuantLayer,
    _set_module,
    set_integer_simulation,
    window_sum,
)
from lightning_hessian.quant.quantizers import INT32_MAX, dyadic, quantize

_INT8_OFFSET = 128  # unsigned 8-bit codes (0..255) enter the int8 GEMM as code - 128


class Requantizer(nn.Module):
    """``clamp(round_half_up(x * in_scale / out_scale)) - offset`` as ``(x * m + 2^(c-1)) >> c`` in int64.

    Identical to ``quantizers.requantize`` (then minus ``offset``): the offset is folded into the
    rounding constant as ``- offset * 2^c``, which is exact, and the work is done in place.
    """

    def __init__(self, in_scale: Tensor, out_scale: Tensor, qmin: int | None = None, qmax: int | None = None,
                 offset: int = 0):
        super().__init__()
        mantissa, shift = dyadic(in_scale.double() / out_scale.double())
        # at least 1-d: a 0-d int64 operand would not promote an int32 input to int64 (overflow)
        mantissa, shift = mantissa.reshape(mantissa.shape or (1,)), shift.reshape(shift.shape or (1,))
        self.register_buffer("mantissa", mantissa.int())  # the deployed int32 mantissa
        self.register_buffer("shift", shift.to(torch.int8))
        self.register_buffer("rounding", (1 << (shift - 1)) - offset * (1 << shift), persistent=False)
        self.qmin = None if qmin is None else qmin - offset
        self.qmax = None if qmax is None else qmax - offset

    def forward(self, x: Tensor) -> Tensor:
        out = torch.mul(x, self.mantissa.long())  # int64: |x| < 2^31 and m < 2^30
        out.add_(self.rounding).bitwise_right_shift_(self.shift.long())
        return out if self.qmin is None and self.qmax is None else out.clamp_(self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"channels={self.mantissa.numel()}, range=({self.qmin}, {self.qmax})"


class IntegerAct(nn.Module):
    """A standalone ``QuantAct``: requantize to its codes (or pass through where the input was quantized on entry)."""

    def __init__(self, requant: Requantizer | None):
        super().__init__()
        self.requant = requant

    def forward(self, x: Tensor) -> Tensor:
        return x if self.requant is None else self.requant(x).int()


class _IntegerLayer(nn.Module):
    """Input requantization to int8 GEMM codes, int32 weights-times-codes accumulation, int32 bias."""

    def __init__(self, name: str, layer: _QuantLayer, in_scale: Tensor | None, matrix: Tensor):
        super().__init__()
        _, bias, _ = layer.integer_params()
        qmin, qmax = layer.act.qrange()
        self.offset = _INT8_OFFSET if qmax > 127 else 0
        bias = torch.zeros(matrix.shape[0], dtype=torch.long) if bias is None else bias
        bias = bias + self.offset * matrix.sum(1)
        bound = matrix.abs().sum(1) * max(qmax - self.offset, self.offset - qmin) + bias.abs()
        if bool((bound > INT32_MAX).any()):
            raise ValueError(f"layer {name!r}: its int32 accumulator may overflow (|weight codes| x largest input "
                             f"code + |bias code| reaches {int(bound.max())} > 2^31 - 1)")
        # in_scale None: the input arrives as codes, quantized on entry
        self.requant = None if in_scale is None else Requantizer(in_scale, layer.act.scale(), qmin, qmax, self.offset)
        self.weight_bits = layer.weight_bits
        self.in_features = matrix.shape[1]
        self.register_buffer("weight", matrix.t().contiguous().to(torch.int8))  # (K, out) for the GEMM
        self.register_buffer("bias", bias.int())

    def _codes(self, x: Tensor) -> Tensor:
        """int8 GEMM codes: the requantized input (or the entry codes) minus the offset."""
        return (x - self.offset if self.requant is None else self.requant(x)).to(torch.int8)


class IntegerLinear(_IntegerLayer):
    def __init__(self, name: str, layer: _QuantLayer, in_scale: Tensor | None):
        super().__init__(name, layer, in_scale, layer.integer_params()[0])

    def forward(self, x: Tensor) -> Tensor:
        x = self._codes(x)
        acc = torch._int_mm(x.reshape(-1, self.in_features).contiguous(), self.weight).add_(self.bias)
        return acc.view(*x.shape[:-1], -1)


class IntegerConv(_IntegerLayer):
    """N-d convolution as an int8 GEMM over unfolded (im2col) channels-last codes; zero padding on the codes.

    The input is moved to channels-last once so every im2col row is a run of contiguous channels (the
    weight matrix is laid out as ``(kernel..., in_channels)`` to match): a 20x faster gather than NC-first.
    """

    def __init__(self, name: str, layer: _QuantConv, in_scale: Tensor | None):
        codes = layer.integer_params()[0]
        d = codes.dim() - 2
        super().__init__(name, layer, in_scale, codes.permute(0, *range(2, 2 + d), 1).reshape(codes.shape[0], -1))
        self.kernel_size, self.stride, self.dilation = layer.kernel_size, layer.stride, layer.dilation
        if layer.padding == "same":
            total = [dil * (k - 1) for dil, k in zip(layer.dilation, layer.kernel_size)]
            pads = [(t // 2, t - t // 2) for t in total]
        else:
            pads = [(0, 0)] * d if layer.padding == "valid" else [(p, p) for p in layer.padding]
        self.pad = [p for pair in reversed(pads) for p in pair]  # F.pad order: last dim first

    def forward(self, x: Tensor) -> Tensor:
        d = len(self.kernel_size)
        x = F.pad(self._codes(x).movedim(1, -1), [0, 0, *self.pad], value=-self.offset)  # channels-last
        for i, (k, s, dil) in enumerate(zip(self.kernel_size, self.stride, self.dilation)):
            x = x.unfold(1 + i, dil * (k - 1) + 1, s)  # (N, *out_spatial, C, *window)
        if any(dil > 1 for dil in self.dilation):
            x = x[(..., *(slice(None, None, dil) for dil in self.dilation))]
        n, spatial = x.shape[0], x.shape[1:1 + d]
        cols = x.permute(0, *range(1, 1 + d), *range(2 + d, 2 + 2 * d), 1 + d).reshape(-1, self.in_features)
        # a batch of 1 leaves cols an overlapping-stride view, which _int_mm misreads: copy it
        acc = torch._int_mm(cols.contiguous(), self.weight).add_(self.bias)
        return acc.view(n, *spatial, -1).movedim(-1, 1).contiguous()


class IntegerResidualAdd(nn.Module):
    """Both inputs requantized to the output codes, added and clamped."""

    def __init__(self, requant_a: Requantizer, requant_b: Requantizer, qmin: int, qmax: int):
        super().__init__()
        self.requant_a, self.requant_b = requant_a, requant_b
        self.qmin, self.qmax = qmin, qmax

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return (self.requant_a(a) + self.requant_b(b)).clamp(self.qmin, self.qmax).int()


class IntegerAvgPool(nn.Module):
    """Integer window sum of an adaptive average pool (the ``1/window`` lives in the next requantization)."""

    def __init__(self, output_size: tuple[int | None, ...], input_size: tuple[int, ...]):
        super().__init__()
        self.output_size, self.input_size = output_size, input_size
        self.window = math.prod(s // (s if o is None else o) for o, s in zip(output_size, input_size))

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"IntegerAvgPool was converted for inputs of spatial size {self.input_size} (its "
                             f"window is baked into the next scale); got {tuple(x.shape[2:])}")
        return window_sum(x, self.output_size)


class IntegerModel(nn.Module):
    """Integer-only model: ``dequantize_output(body(quantize_input(x)))``; ``body`` sees only integer tensors."""

    def __init__(self, body: nn.Module, input_scale: Tensor, input_range: tuple[int, int], output_scale: Tensor):
        super().__init__()
        self.body = body
        self.input_range = input_range
        self.register_buffer("input_scale", input_scale.double())
        self.register_buffer("output_scale", output_scale.double())

    def quantize_input(self, x: Tensor) -> Tensor:
        """The entry: float input to int32 codes (the only float op before the body)."""
        return quantize(x.double(), self.input_scale, *self.input_range).int()

    def dequantize_output(self, n: Tensor) -> Tensor:
        """The exit: int32 output codes to float32 logits (``(n * scale)`` in float64, rounded once)."""
        return (n.double() * self.output_scale).float()

    def forward(self, x: Tensor) -> Tensor:
        return self.dequantize_output(self.body(self.quantize_input(x)))

    def packed_size_bytes(self) -> int:
        """Deployed size: weights at their bit width, int32 biases and mantissas, int8 shifts, float64 scales."""
        bits = 64 * (self.input_scale.numel() + self.output_scale.numel())
        for m in self.body.modules():
            if isinstance(m, _IntegerLayer):
                bits += m.weight.numel() * m.weight_bits + 32 * m.bias.numel()
            elif isinstance(m, Requantizer):
                bits += m.mantissa.numel() * 32 + m.shift.numel() * 8
        return (bits + 7) // 8


def _static_scale(scale: Tensor, x: Tensor, name: str) -> Tensor:
    """Drop the batch dimension from a scale that was expanded to the full tensor shape by a reshape."""
    if scale.dim() == x.dim() and scale.shape[0] > 1:
        if not bool((scale == scale[:1]).all()):
            raise ValueError(f"the scale reaching {name!r} varies along the batch dimension")
        return scale[:1]
    return scale


def _check_convertible(model: nn.Module) -> None:
    bns = [n for n, m in model.named_modules() if isinstance(m, _BATCHNORMS)]
    if bns:
        raise ValueError(f"BatchNorm layers {bns} are not folded: call fold_batchnorm(model, example_input) first")
    layers, ops = _float_leftovers(model, {})
    leftovers = {**layers, **ops}
    if leftovers:
        raise ValueError(f"layers left in float block integer-only conversion: {leftovers}; quantize them "
                         "(quantize_model with bits for every layer) or remove them")
    for name, m in model.named_modules():
        if isinstance(m, _QuantConv) and (m.groups != 1 or m.padding_mode != "zeros"):
            raise ValueError(f"{name!r}: integer conv supports groups=1 and padding_mode='zeros' only "
                             f"(got groups={m.groups}, padding_mode={m.padding_mode!r})")


def _trace_inputs(model: nn.Module, example_input: Tensor) -> tuple[dict[str, list], ScaledTensor]:
    """Run the simulation once; record, for each quantized module, what reaches it: a scale, 'input' or 'float'."""
    seen: dict[str, list] = {}

    def hook(name):
        def record(module, args):
            kinds = []
            for a in args:
                if isinstance(a, ScaledTensor) and a.quantized:
                    kinds.append((_static_scale(a.scale, a, name), tuple(a.shape), a.bound))
                else:
                    kinds.append("input" if isinstance(a, ScaledTensor) and a.is_input else "float")
            seen.setdefault(name, []).append(kinds)
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, (QuantAct, QuantResidualAdd, QuantAdaptiveAvgPool))]
    try:
        with torch.no_grad():
            out = model(ScaledTensor.wrap(example_input, None, is_input=True))
    finally:
        for h in handles:
            h.remove()
    return seen, out


def to_integer_model(model: nn.Module, example_input: Tensor) -> IntegerModel:
    """Integer-only copy of a calibrated, BN-folded quantized model (``quantize_model`` output).

    ``example_input`` (a batch like the deployment inputs) is run once in integer simulation to learn the
    scale reaching every quantized layer; its spatial size is fixed into average pools. Raises
    ``ValueError`` naming the layers when BatchNorm is unfolded, layers or ops are left in float, ranges
    are uncalibrated, a layer is unreachable from ``example_input``, a conv has ``groups > 1`` or a
    ``padding_mode`` other than ``'zeros'``, or an int32 accumulator or pooled sum could overflow.
    """
    _check_convertible(model)
    body = set_integer_simulation(copy.deepcopy(model).eval(), True)
    seen, out = _trace_inputs(body, example_input)
    modules = dict(body.named_modules())
    targets = [n for n, m in modules.items() if isinstance(m, (QuantAct, QuantResidualAdd, QuantAdaptiveAvgPool))]
    unreached = [n for n in targets if n not in seen]
    floats = sorted({n for n, calls in seen.items() for kinds in calls if "float" in kinds})
    if unreached:
        raise ValueError(f"quantized modules {unreached} are not reached by example_input; integer conversion "
                         "needs every quantized module on the traced path")
    if floats:
        raise ValueError(f"float tensors reach the quantized modules {floats}: a functional op or unquantized "
                         "layer sits before them (only reshapes, ReLU and dropout may run between quantized modules)")
    if not (isinstance(out, ScaledTensor) and out.quantized):
        raise ValueError("the model output is not produced by a quantized module (float ops after the last layer)")
    for name, calls in seen.items():
        first = calls[0]
        for kinds in calls[1:]:
            if any(isinstance(a, tuple) != isinstance(b, tuple)
                   or (isinstance(a, tuple) and not torch.equal(a[0], b[0])) for a, b in zip(first, kinds)):
                raise ValueError(f"{name!r} is called several times with different input scales")

    entries = [n for n, calls in seen.items() if "input" in calls[0]]
    if any(not isinstance(modules[n], QuantAct) for n in entries):
        raise ValueError(f"the raw input must first reach activation quantizers, not {entries}")
    entry_params = {(float(modules[n].scale()), modules[n].qrange()) for n in entries}
    if len(entry_params) != 1:
        raise ValueError(f"the raw input reaches quantizers {entries} with different scales; use one input QuantAct")

    def in_scale(name: str) -> Tensor | None:
        kind = seen[name][0][0]
        return None if kind == "input" else kind[0]

    for name, m in modules.items():
        if isinstance(m, _QuantLayer):
            cls = IntegerConv if isinstance(m, _QuantConv) else IntegerLinear
            _set_module(body, name, cls(name, m, in_scale(f"{name}.act")))
        elif isinstance(m, QuantAct) and not isinstance(modules[name.rpartition(".")[0]], _QuantLayer):
            scale = in_scale(name)  # a standalone QuantAct (layers' input quantizers are handled above)
            _set_module(body, name, IntegerAct(None if scale is None else Requantizer(scale, m.scale(), *m.qrange())))
        elif isinstance(m, QuantResidualAdd):
            (scale_a, *_), (scale_b, *_) = seen[name][0]
            qmin, qmax = m.act.qrange()
            _set_module(body, name, IntegerResidualAdd(Requantizer(scale_a, m.act.scale()),
                                                       Requantizer(scale_b, m.act.scale()), qmin, qmax))
        elif isinstance(m, QuantAdaptiveAvgPool):
            _, shape, bound = seen[name][0][0]
            pool = IntegerAvgPool(m.output_size, shape[2:])
            if pool.window * bound > INT32_MAX:
                raise ValueError(f"average pool {name!r} sums windows of {pool.window} values of up to {bound} in "
                                 "magnitude: the sum may overflow int32; requantize its input first (a QuantAct "
                                 "module in front of the pool) or pool smaller windows")
            _set_module(body, name, pool)
    entry = modules[entries[0]]
    return IntegerModel(body, entry.scale(), entry.qrange(), _static_scale(out.scale, out, "the output"))
