"""Quantized layers for quantization-aware training: fake-quantized weights (per channel or in groups) and a
``QuantAct`` on each input a deployed kernel reads, so training rounds where the integer model rounds.

Every quantizer sits on the input of the module that reads it and rounds what reaches it once: a layer's
accumulator (through ReLU, reshapes), a residual sum, a pooled sum or the model input. That is where the
deployed model rounds too: each ``QuantAct`` becomes the output requantization of the kernel producing
its input (``QLinearConv``, ``QGemm``, ``QLinearAdd``; ``lightning_hessian.quant.integer``), which
rounds half to even as ``fake_quantize`` does. ``calibrate`` sets the activation ranges from data; the layers
are put in place by :func:`~lightning_hessian.quant.swap.quantize_model`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_hessian.modes import training_mode
from lightning_hessian.quant.quantizers import (
    ActivationQuantizer,
    WeightGroups,
    bias_codes,
    group_codes,
    group_scales,
    quantize_bias,
    quantize_weight,
    row_scale,
    validate_bits,
    weight_codes,
    weight_scale,
)


class QuantAct(ActivationQuantizer):
    """Activation quantizer module: model inputs, and the input of every quantized layer, addition and pool.

    Fake-quantizes in training and eval; deployed, it is the requantization fused into the kernel that
    produces its input (or the ``QuantizeLinear`` of the model input). A negative value makes the code signed:

    >>> q = QuantAct(bits=4)
    >>> _ = q(torch.tensor([-1.4, 0.7]))  # scale max(|min|, |max|) / 7 = 0.2
    >>> q.qrange(), q.eval()(torch.tensor([0.33, -2.0]))
    ((-8, 7), tensor([ 0.4000, -1.6000]))
    """


class _QuantWeights:
    """Fake-quantized weights per channel or in ``weight_groups`` (mixed in before the torch layer class)."""

    weight: nn.Parameter
    weight_bits: int
    weight_groups: WeightGroups

    def _init_weights(self, weight_bits: int, groups: WeightGroups | None) -> None:
        self.weight_bits = validate_bits(weight_bits, "weight_bits")
        self.weight_groups = WeightGroups() if groups is None else groups
        self.weight_groups.blocks(self.weight.shape, type(self).__name__)

    def weight_scales(self) -> Tensor:
        """The scales of the weight: ``(out,)`` per channel, else one per block (``group_scales``)."""
        if self.weight_groups.per_channel:
            return weight_scale(self.weight, self.weight_bits)
        return group_scales(self.weight, self.weight_bits, self.weight_groups)

    def channel_scale(self, scales: Tensor) -> Tensor:
        """Each output row's largest scale (the per-channel scale), the grid of its int32 bias."""
        return scales if self.weight_groups.per_channel else row_scale(scales, self.weight_groups, self.weight.shape[0])

    def weight_codes(self) -> tuple[Tensor, Tensor]:
        """Integer weight codes (int64) and float32 scales: per output row ``(out,)`` when every block spans whole
        rows, else ``(out, in / columns)``: one per row and column group."""
        if self.weight_groups.per_channel:
            codes, scale = weight_codes(self.weight, self.weight_bits)
            return codes.long(), scale.float()
        codes, scales = group_codes(self.weight, self.weight_bits, self.weight_groups)
        per_row = scales.repeat_interleave(self.weight.shape[0] // scales.shape[0], dim=0)
        return codes.long(), (per_row[:, 0] if self.weight_groups.columns is None else per_row).float()

    def quantized_weight(self) -> tuple[Tensor, Tensor]:
        """``(Q_b(W), scales)``: the fake-quantized weight and its scales (computed once, for the bias grid too)."""
        scales = self.weight_scales()
        return quantize_weight(self.weight, self.weight_bits, scales, self.weight_groups), scales

    def extra_repr(self) -> str:
        groups = "" if self.weight_groups.per_channel else f", weight_groups={self.weight_groups}"
        return f"{super().extra_repr()}, weight_bits={self.weight_bits}{groups}"


class _QuantLayer(_QuantWeights):
    """Shared behaviour of the quantized conv/linear layers: quantized weights, an int32 bias, a quantized input."""

    bias: nn.Parameter | None
    act: QuantAct

    def _init_quant(self, weight_bits: int, act_bits: int, momentum: float | None,
                    groups: WeightGroups | None = None) -> None:
        self._init_weights(weight_bits, groups)
        self.act = QuantAct(act_bits, signed=None, momentum=momentum)

    def integer_params(self) -> tuple[Tensor, Tensor | None, Tensor]:
        """Weight codes (int64), int32 bias codes (int64, or None) and the float32 weight scales (``weight_codes``:
        per output channel, or per row and column group); the bias is on each row's grid ``channel scale * s_in``.
        The single source of the integer parameters for conversion and export.
        """
        codes, scale = self.weight_codes()
        row = scale if scale.dim() == 1 else scale.amax(dim=1)
        bias = None if self.bias is None else bias_codes(self.bias, row.double() * self.act.scale().double())
        return codes, bias, scale

    def _layer_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(x)
        weight, scales = self.quantized_weight()
        bias = self.bias
        if bias is not None and self.act.calibrated:
            bias = quantize_bias(bias, self.channel_scale(scales) * self.act.scale())
        return self._layer_op(x, weight, bias)


class _QuantConv(_QuantLayer):
    @classmethod
    def from_float(cls, conv: nn.Module, weight_bits: int, act_bits: int = 8, momentum: float | None = None,
                   groups: WeightGroups | None = None):
        """Quantized copy of ``conv`` sharing its parameters (``groups``: of output channels, in blocks of rows)."""
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
                weight_bits=weight_bits, act_bits=act_bits, momentum=momentum, weight_groups=groups)
        q.weight, q.bias = conv.weight, conv.bias
        return q.train(conv.training)

    def _layer_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv_forward(x, weight, bias)


class QuantConv1d(_QuantConv, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized weights (per channel, or ``weight_groups`` of rows), an int32 bias and a
    quantized input.

    >>> q = QuantConv1d.from_float(nn.Conv1d(2, 4, 3), weight_bits=4, groups=WeightGroups(rows=2))
    >>> q.weight_scales().shape  # one scale per block of two output channels
    torch.Size([2, 1])
    >>> codes, scales = q.weight_codes()  # each row takes its block's scale
    >>> torch.equal(scales, q.weight_scales()[:, 0].repeat_interleave(2)), int(codes.abs().max())
    (True, 7)
    """

    def __init__(self, *args, weight_bits: int = 8, act_bits: int = 8, momentum: float | None = None,
                 weight_groups: WeightGroups | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_bits, act_bits, momentum, weight_groups)


class QuantConv2d(_QuantConv, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized weights (per channel, or ``weight_groups`` of rows), an int32 bias and a
    quantized input.

    >>> conv = nn.Conv2d(3, 4, 3, padding=1)
    >>> q = QuantConv2d.from_float(conv, weight_bits=8)
    >>> x = torch.randn(2, 3, 5, 5)
    >>> _ = q(x)  # training mode: the first batch sets the input range
    >>> with torch.no_grad():  # at 8 bits the output stays close to the float layer's
    ...     bool((q.eval()(x) - conv(x)).abs().max() < 0.05)
    True
    """

    def __init__(self, *args, weight_bits: int = 8, act_bits: int = 8, momentum: float | None = None,
                 weight_groups: WeightGroups | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_bits, act_bits, momentum, weight_groups)


class QuantLinear(_QuantLayer, nn.Linear):
    """``nn.Linear`` with fake-quantized weights (per channel or in ``weight_groups``), an int32 bias and a quantized
    input.

    >>> linear = nn.Linear(8, 3)
    >>> q = QuantLinear.from_float(linear, weight_bits=4)
    >>> q.weight is linear.weight  # it fine-tunes the float parameters
    True
    >>> codes, scale = q.weight_codes()
    >>> codes.abs().amax(dim=1).tolist()  # each row's largest weight takes the largest 4-bit code
    [7, 7, 7]
    >>> torch.allclose(q.quantized_weight()[0], codes * scale[:, None])
    True
    """

    def __init__(self, *args, weight_bits: int = 8, act_bits: int = 8, momentum: float | None = None,
                 weight_groups: WeightGroups | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(weight_bits, act_bits, momentum, weight_groups)

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_bits: int, act_bits: int = 8, momentum: float | None = None,
                   groups: WeightGroups | None = None):
        """Quantized copy of ``linear`` sharing its parameters."""
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype, weight_bits=weight_bits,
                act_bits=act_bits, momentum=momentum, weight_groups=groups)
        q.weight, q.bias = linear.weight, linear.bias
        return q.train(linear.training)

    def _layer_op(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)


class QuantEmbedding(_QuantWeights, nn.Embedding):
    """``nn.Embedding`` with fake-quantized weights: per token row (per channel), or in ``weight_groups`` of rows and
    feature columns. Its input is indices, so it has no activation quantizer; deployed, it gathers int8 codes and
    multiplies them by their scales (a float output that the next quantizer rounds).

    >>> embedding = QuantEmbedding(10, 8, weight_bits=4, weight_groups=WeightGroups(columns=4))
    >>> codes, scales = embedding.weight_codes()
    >>> scales.shape  # one scale per token and group of 4 features
    torch.Size([10, 2])
    >>> torch.allclose(embedding(torch.tensor([1, 2])), (codes * scales.repeat_interleave(4, dim=1))[[1, 2]])
    True
    """

    def __init__(self, *args, weight_bits: int = 8, weight_groups: WeightGroups | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_weights(weight_bits, weight_groups)

    @classmethod
    def from_float(cls, embedding: nn.Embedding, weight_bits: int, act_bits: int = 8, momentum: float | None = None,
                   groups: WeightGroups | None = None):
        """Quantized copy of ``embedding`` sharing its weight (``act_bits`` and ``momentum`` are unused)."""
        q = cls(embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx,
                scale_grad_by_freq=embedding.scale_grad_by_freq, sparse=embedding.sparse,
                device=embedding.weight.device, dtype=embedding.weight.dtype, weight_bits=weight_bits,
                weight_groups=groups)
        q.weight = embedding.weight
        return q.train(embedding.training)

    def forward(self, indices: Tensor) -> Tensor:
        weight, _ = self.quantized_weight()
        return F.embedding(indices, weight, self.padding_idx, None, 2.0, self.scale_grad_by_freq, self.sparse)


class QuantResidualAdd(nn.Module):
    """Quantized ``a + b``: each input quantized (``act_a``, ``act_b``), their sum left for its readers to round.

    Deployed as one ``QLinearAdd`` per distinct reader quantizer: the two codes are rescaled and summed in
    float32 straight onto the reader's grid, one rounding, as the reader's ``fake_quantize`` of the sum does.

    >>> add = QuantResidualAdd(bits=8)
    >>> a, b = torch.tensor([0.5, -1.0, 0.3]), torch.tensor([0.25, 2.0, -0.1])
    >>> _ = add(a, b)  # training: each input's range is tracked
    >>> error = (add.eval()(a, b) - (a + b)).abs()  # each input rounded once: within half a step of each grid
    >>> bool((error <= (add.act_a.scale() + add.act_b.scale()) / 2).all())
    True
    """

    def __init__(self, bits: int = 8, momentum: float | None = None):
        super().__init__()
        self.act_a = QuantAct(bits, signed=None, momentum=momentum)
        self.act_b = QuantAct(bits, signed=None, momentum=momentum)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.act_a(a) + self.act_b(b)


def window_sum(x: Tensor, output_size: tuple[int | None, ...]) -> Tensor:
    """Sum over the equal windows of an adaptive average pool (``(N, C, *spatial)``; dtype kept)."""
    spatial = x.shape[2:]
    out = [s if o is None else o for o, s in zip(output_size, spatial)]
    if any(s % o for o, s in zip(out, spatial)):
        raise ValueError(f"integer average pooling needs input size {tuple(spatial)} divisible by the output "
                         f"size {tuple(out)} (equal windows)")
    shape = [x.shape[0], x.shape[1]]
    for o, s in zip(out, spatial):
        shape += [o, s // o]
    return x.reshape(shape).sum(dim=tuple(3 + 2 * i for i in range(len(out))), dtype=x.dtype)


class QuantAdaptiveAvgPool(nn.Module):
    """Adaptive average pool of a quantized input (``act``); its mean is left for its readers to round.

    Deployed as an integer window sum whose ``1/window`` rides in the reader's requantization (one rounding).

    >>> pool = QuantAdaptiveAvgPool.from_float(nn.AdaptiveAvgPool2d(1), bits=8)
    >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)  # range [0, 15]: the integers are on the 8-bit grid 15 / 255
    >>> pool(x)
    tensor([[[[7.5000]]]])
    """

    def __init__(self, output_size: int | tuple[int | None, ...], dims: int, bits: int = 8,
                 momentum: float | None = None):
        super().__init__()
        self.output_size = (output_size,) * dims if isinstance(output_size, int) or output_size is None \
            else tuple(output_size)
        self.dims = dims
        self.act = QuantAct(bits, signed=None, momentum=momentum)

    @classmethod
    def from_float(cls, pool: nn.Module, bits: int = 8, momentum: float | None = None) -> QuantAdaptiveAvgPool:
        return cls(pool.output_size, 1 if isinstance(pool, nn.AdaptiveAvgPool1d) else 2, bits, momentum)

    def forward(self, x: Tensor) -> Tensor:
        pool = F.adaptive_avg_pool1d if self.dims == 1 else F.adaptive_avg_pool2d
        return pool(self.act(x), self.output_size)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


QUANT_MODULES = (QuantAct, QuantConv1d, QuantConv2d, QuantLinear, QuantEmbedding, QuantResidualAdd,
                 QuantAdaptiveAvgPool)


@torch.no_grad()
def calibrate(
    model: nn.Module, inputs: Iterable[Any], forward: Callable[[nn.Module, Any], object] | None = None
) -> nn.Module:
    """Track activation ranges on ``inputs`` with only the quantizers in training mode.

    ``forward(model, batch)`` runs one batch, e.g. a ``loss_fn(model, batch)`` for ``(x, y)`` batches; by
    default ``model(batch)``. Everything else (BatchNorm statistics, dropout) runs in eval mode; all modes
    are restored afterwards.
    """
    with training_mode(model, False):
        for m in model.modules():
            if isinstance(m, ActivationQuantizer):
                m.train()
        for batch in inputs:
            if forward is None:
                model(batch)
            else:
                forward(model, batch)
    return model
