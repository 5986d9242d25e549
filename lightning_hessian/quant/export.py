"""Deployable exports of an ``IntegerModel`` that run without this package: ONNX (onnxruntime) or torch.export.

``export_onnx`` lowers each step of the ``IntegerModel`` to the onnxruntime kernel whose arithmetic it
reproduces, so onnxruntime's output equals the torch model's bit for bit (on x86-64 CPUs with AVX2 and
VNNI; see below) and runs on its fast int8 kernels:

- entry: ``QuantizeLinear`` of the float input (one float op);
- conv / linear: ``QLinearConv`` / ``QGemm`` (com.microsoft) on uint8 activation codes (zero point 0, or
  128 for signed codes) and int8 weights with per-channel float32 scales, an int32 bias and the reader's
  scale, which fuses the requantization (and a following ReLU, through the unsigned output range) into
  the kernel; a conv or linear producing the model output dequantizes instead (``ConvInteger`` or a
  float-output ``QGemm``);
- residual additions: ``QLinearAdd`` (com.microsoft); global average pools: ``QLinearGlobalAveragePool``
  (com.microsoft), other adaptive pools an int32 ``ReduceSum`` and a float32 multiply-round; codes narrower
  than their uint8 container (4-bit activations) get a ``Clip``;
- weights of 4 bits or fewer are stored packed as ``INT4`` (two per byte, opset 21) and cast to int8 once,
  when onnxruntime folds constants at session start;
- a conv with a channel count that is not a multiple of 4 gets zero filters up to one (its readers zero
  weights for them), which lets onnxruntime use its fast symmetric-quantization kernels: exact, since
  the extra channels hold the code of 0 and meet only zero weights (MNIST-1D CNN's 25 channels: 28).

Each step type has one lowering (``_LOWERINGS``: graph builder, step, input names -> output name); a new
step type adds its own. The graph is a fixed
program recorded from ``example_input`` (as in any tracing export); the batch dimension stays dynamic.
Exactness holds where onnxruntime's int8 kernels accumulate exactly: x86-64 CPUs with VNNI (AVX512-VNNI or
AVX-VNNI) or AMX; without VNNI its u8s8 kernels sum pairs of products in saturating int16, and
``QLinearAdd``'s float arithmetic is that of its AVX2 kernel (``quantizers.requantize_sum``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_hessian.quant.integer import (
    AddStep,
    ConvStep,
    DequantizeStep,
    IntegerModel,
    LinearStep,
    PermuteStep,
    PoolStep,
    QParams,
    QuantizeStep,
    ReluStep,
    RequantStep,
    ReshapeStep,
)

_DATA_STEPS = (ReluStep, ReshapeStep, PermuteStep)  # their output is coded like their input


class _Graph:
    """A small ONNX graph builder: named values, constants and nodes."""

    def __init__(self, opset: int):
        import onnx
        from onnx import helper, numpy_helper

        self.onnx, self.helper, self.numpy_helper = onnx, helper, numpy_helper
        self.opset = opset
        self.nodes, self.initializers, self.count = [], [], 0
        self.weights: dict[tuple, str] = {}
        self.padded: dict[int, int] = {}  # id(step) -> channels (conv) or features (flatten) it exports
        self.widths: dict[str, int] = {}  # value name -> its padded channels or features
        self.ranks: dict[str, int] = {}  # value name -> its number of dimensions
        self.coded: dict[str, QParams | None] = {}  # value name -> how it is coded (None: float)

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value: Tensor | float | int, hint: str = "c", dtype: torch.dtype | None = None) -> str:
        name = self.name(hint)
        value = torch.as_tensor(value, dtype=dtype)
        self.initializers.append(self.numpy_helper.from_array(value.detach().cpu().numpy(), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str | None = None, domain: str = "", **attrs) -> str:
        out = self.name(hint or op.lower())
        self.nodes.append(self.helper.make_node(op, inputs, [out], domain=domain, **attrs))
        return out

    def cast(self, x: str, dtype: str) -> str:
        return self.node("Cast", [x], to=getattr(self.onnx.TensorProto, dtype))

    def scale(self, q: QParams) -> str:
        return self.const(q.tensor(), "scale")

    def zero_point(self, q: QParams) -> str:
        return self.const(q.zero_point, "zero_point", torch.uint8)

    def clip_codes(self, x: str, q: QParams) -> str:
        """Clip a uint8 container to ``q``'s range when it is narrower than 0..255 (e.g. 4-bit codes)."""
        lo, hi = q.qmin + q.zero_point, q.qmax + q.zero_point
        if (lo, hi) == (0, 255):
            return x
        return self.node("Clip", [x, self.const(lo, "lo", torch.uint8), self.const(hi, "hi", torch.uint8)])

    def weight(self, step: ConvStep | LinearStep, rows: int, cols: int) -> str:
        """The layer's int8 weight codes zero-padded to ``rows`` x ``cols``, shared by every step of the layer;
        packed INT4 at 4 bits or fewer."""
        key = (step.weight.data_ptr(), rows, cols)
        if key not in self.weights:
            w = step.weight.new_zeros(rows, cols, *step.weight.shape[2:])
            w[:step.weight.shape[0], :step.weight.shape[1]] = step.weight
            if step.weight_bits <= 4 and self.opset >= 21:
                packed = self.name("weight_int4")
                self.initializers.append(self.helper.make_tensor(packed, self.onnx.TensorProto.INT4, list(w.shape),
                                                                 w.flatten().tolist()))
                self.weights[key] = self.cast(packed, "INT8")
            else:
                self.weights[key] = self.const(w, "weight")
        return self.weights[key]

    def elementwise_requantize(self, x: str, multiplier: Tensor, in_zero_point: int, q: QParams) -> str:
        """``clamp(round_half_even(float32(x - zp_in) * m))`` in float32 ops (exact, IEEE), to a uint8 container."""
        y = self.cast(x, "FLOAT")
        if in_zero_point:
            y = self.node("Sub", [y, self.const(float(in_zero_point), dtype=torch.float32)])
        y = self.node("Round", [self.node("Mul", [y, self.const(multiplier.float(), "multiplier")])])
        y = self.node("Clip", [y, self.const(float(q.qmin), dtype=torch.float32),
                               self.const(float(q.qmax), dtype=torch.float32)])
        if q.zero_point:
            y = self.node("Add", [y, self.const(float(q.zero_point), dtype=torch.float32)])
        return self.cast(y, "UINT8")


def _quantize(g: _Graph, step: QuantizeStep, x: str) -> str:
    return g.clip_codes(g.node("QuantizeLinear", [x, g.scale(step.out_q), g.zero_point(step.out_q)]), step.out_q)


def _requant(g: _Graph, step: RequantStep, x: str) -> str:
    return g.elementwise_requantize(x, step.in_q.tensor() / step.out_q.tensor(), step.in_q.zero_point, step.out_q)


def _conv(g: _Graph, step: ConvStep, x: str) -> str:
    d = len(step.kernel_size)
    attrs = dict(kernel_shape=list(step.kernel_size), strides=list(step.stride), dilations=list(step.dilation),
                 pads=[p[0] for p in step.pads] + [p[1] for p in step.pads])
    channels, extra = step.weight.shape[0], g.padded.get(id(step), step.weight.shape[0]) - step.weight.shape[0]
    x_zp, weight = g.zero_point(step.in_q), g.weight(step, channels + extra, g.widths.get(x, step.weight.shape[1]))
    if step.out_q is None:  # the model output: int32 accumulators, then float32
        acc = g.node("ConvInteger", [x, weight, x_zp, g.const(0, dtype=torch.int8)], **attrs)
        acc = g.node("Add", [acc, g.const(step.bias.view(-1, *[1] * d), "bias")])
        return g.node("Mul", [g.cast(acc, "FLOAT"), g.const(step.acc_scale.view(-1, *[1] * d), "acc_scale")])
    y = g.node("QLinearConv", [x, g.scale(step.in_q), x_zp, weight,
                               g.const(F.pad(step.weight_scale, (0, extra), value=1.0), "w_scale"),
                               g.const(torch.zeros(channels + extra, dtype=torch.int8), "w_zero_point"),
                               g.scale(step.out_q), g.zero_point(step.out_q),
                               g.const(F.pad(step.bias, (0, extra)), "bias")], **attrs)
    y = g.clip_codes(y, step.out_q)
    if extra:
        g.widths[y] = channels + extra
    return y


def _linear(g: _Graph, step: LinearStep, x: str) -> str:
    k, n, rank = g.widths.get(x, step.weight.shape[1]), step.weight.shape[0], g.ranks[x]
    rows = x if rank == 2 else g.node("Reshape", [x, g.const(torch.tensor([-1, k]))])
    inputs = [rows, g.scale(step.in_q), g.zero_point(step.in_q), g.weight(step, n, k),
              g.const(step.weight_scale, "w_scale"), g.const(torch.zeros(n, dtype=torch.int8), "w_zero_point"),
              g.const(step.bias, "bias")]
    if step.out_q is not None:
        inputs += [g.scale(step.out_q), g.zero_point(step.out_q)]
    y = g.node("QGemm", inputs, domain="com.microsoft", transB=1)
    if rank != 2:  # back to (..., n)
        lead = g.node("Slice", [g.node("Shape", [x]), g.const(torch.tensor([0])), g.const(torch.tensor([-1]))])
        y = g.node("Reshape", [y, g.node("Concat", [lead, g.const(torch.tensor([n]))], axis=0)])
    return y if step.out_q is None else g.clip_codes(y, step.out_q)


def _add(g: _Graph, step: AddStep, a: str, b: str) -> str:
    y = g.node("QLinearAdd", [a, g.scale(step.a_q), g.zero_point(step.a_q), b, g.scale(step.b_q),
                              g.zero_point(step.b_q), g.scale(step.out_q), g.zero_point(step.out_q)],
               domain="com.microsoft")
    return g.clip_codes(y, step.out_q)


def _pool(g: _Graph, step: PoolStep, x: str) -> str:
    m = float(step.multiplier)
    if all(o == 1 for o in step.output_size) and 2.0**-32 <= m < 256.0:  # the kernel's own range check
        y = g.node("QLinearGlobalAveragePool", [x, g.scale(step.in_q), g.zero_point(step.in_q), g.scale(step.out_q),
                                                g.zero_point(step.out_q)], domain="com.microsoft", channels_last=0)
        return g.clip_codes(y, step.out_q)
    x = g.cast(x, "INT32")
    if step.in_q.zero_point:
        x = g.node("Sub", [x, g.const(step.in_q.zero_point, dtype=torch.int32)])
    shape, axes = [0, 0], []
    for i, (o, s) in enumerate(zip(step.output_size, step.input_size)):
        o = s if o is None else o
        shape += [o, s // o]
        axes.append(3 + 2 * i)
    x = g.node("ReduceSum", [g.node("Reshape", [x, g.const(torch.tensor(shape))]), g.const(torch.tensor(axes))],
               keepdims=0)
    return g.elementwise_requantize(x, step.multiplier, 0, step.out_q)


def _relu(g: _Graph, step: ReluStep, x: str) -> str:
    q = g.coded[x]
    y = g.node("Relu", [x]) if q is None else g.node("Clip", [x, g.const(q.zero_point, "lo", torch.uint8)])
    if x in g.widths:
        g.widths[y] = g.widths[x]
    return y


def _reshape(g: _Graph, step: ReshapeStep, x: str) -> str:
    shape = [0 if s is None else s for s in step.shape]  # 0 copies the (dynamic) batch dimension
    if id(step) in g.padded:  # a flatten of padded channels: the zero channels' features come last
        shape[-1] = g.padded[id(step)]
        x = g.node("Reshape", [x, g.const(torch.tensor(shape))])
        g.widths[x] = g.padded[id(step)]
        return x
    return g.node("Reshape", [x, g.const(torch.tensor(shape))])


def _permute(g: _Graph, step: PermuteStep, x: str) -> str:
    return g.node("Transpose", [x], perm=list(step.perm))


def _dequantize(g: _Graph, step: DequantizeStep, x: str) -> str:
    return g.node("DequantizeLinear", [x, g.scale(step.in_q), g.zero_point(step.in_q)])


_LOWERINGS = {QuantizeStep: _quantize, RequantStep: _requant, ConvStep: _conv, LinearStep: _linear, AddStep: _add,
              PoolStep: _pool, ReluStep: _relu, ReshapeStep: _reshape, PermuteStep: _permute,
              DequantizeStep: _dequantize}


def _channel_padding(model: IntegerModel, values: list[Tensor]) -> dict[int, int]:
    """``id(step) -> padded size`` for the convs whose channels the export pads to a multiple of 4 (when that
    reaches the 16 channels of onnxruntime's symmetric kernels), and for the flattens of their outputs.

    A conv is padded only where every reader takes the zero channels: convs, ReLU, and a flatten of
    ``(N, C, *spatial)`` read by linear layers only (the zero channels' features come last)."""
    readers: dict[int, list[int]] = {}
    for j, inputs in enumerate(model.wiring):
        for i in inputs:
            readers.setdefault(i, []).append(j)

    def takes(value: int, channels: int, padded: int, found: dict[int, int]) -> bool:
        if value == model.output:
            return False
        for j in readers.get(value, []):
            step = model.steps[j]
            if isinstance(step, ReluStep):
                ok = takes(j + 1, channels, padded, found)
            elif isinstance(step, ReshapeStep):
                shape, out = values[value].shape, values[j + 1].shape
                inner = shape[2:].numel()
                ok = (out[0] == shape[0] and tuple(out[1:]) == (channels * inner,) and j + 1 != model.output
                      and all(isinstance(model.steps[k], LinearStep) for k in readers.get(j + 1, [])))
                found[id(step)] = padded * inner
            else:
                ok = isinstance(step, ConvStep)
            if not ok:
                return False
        return True

    plan: dict[int, int] = {}
    for i, step in enumerate(model.steps):
        channels = step.weight.shape[0] if isinstance(step, ConvStep) else 0
        padded = -(-channels // 4) * 4
        found: dict[int, int] = {}
        if step.out_q is not None and channels % 4 and padded >= 16 and takes(i + 1, channels, padded, found):
            plan[id(step)] = padded
            plan.update(found)
    return plan


def export_onnx(model: IntegerModel, example_input: Tensor, path: str | os.PathLike, opset: int = 21) -> Path:
    """Write ``model`` as an int8 ONNX graph to ``path`` (input ``"input"``, output ``"logits"``).

    ``opset`` 21 (the default, onnxruntime >= 1.20) stores weights of 4 bits or fewer packed as ``INT4``;
    an older opset (>= 13) stores them as int8. Where onnxruntime is installed, the written model is run on
    ``example_input`` and a ``UserWarning`` says so if its logits differ from ``model``'s (this machine's
    kernels do not compute the deployed arithmetic; see the module docstring).
    """
    import onnx

    model = model.eval()
    g = _Graph(opset)
    with torch.no_grad():  # shapes and ranks of every value, for the lowerings that need them
        values = [example_input]
        for step, inputs in zip(model.steps, model.wiring):
            values.append(step(*(values[i] for i in inputs)))
    g.padded = _channel_padding(model, values)
    names = ["input"]
    g.ranks["input"], g.coded["input"] = example_input.dim(), None
    for step, inputs, value in zip(model.steps, model.wiring, values[1:]):
        args = [names[i] for i in inputs]
        out = _LOWERINGS[type(step)](g, step, *args)
        names.append(out)
        g.ranks[out], g.coded[out] = value.dim(), g.coded[args[0]] if isinstance(step, _DATA_STEPS) else step.out_q
    g.nodes.append(g.helper.make_node("Identity", [names[model.output]], ["logits"]))
    out = values[model.output]
    graph = g.helper.make_graph(
        g.nodes, "integer_model",
        [g.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", *example_input.shape[1:]])],
        [g.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", *out.shape[1:]])],
        initializer=g.initializers)
    proto = g.helper.make_model(graph, opset_imports=[g.helper.make_opsetid("", opset),
                                                      g.helper.make_opsetid("com.microsoft", 1)],
                                producer_name="lightning_hessian")
    proto.ir_version = 10 if opset >= 21 else 8  # the oldest IR that carries the opset, for older runtimes
    onnx.checker.check_model(proto)
    path = Path(path)
    onnx.save(proto, path)
    _check_onnxruntime(path, values[0], values[model.output])
    return path


def _check_onnxruntime(path: Path, example_input: Tensor, expected: Tensor) -> None:
    """Warn when onnxruntime (if installed) does not reproduce the torch model on ``example_input``."""
    try:
        import onnxruntime
    except ImportError:
        return
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": example_input.float().numpy()})[0])
    differ = int((got != expected).sum())
    if differ:
        warnings.warn(f"export_onnx: onnxruntime {onnxruntime.__version__} on this machine computes {differ} of "
                      f"{expected.numel()} logits of the example input differently from the IntegerModel: its int8 "
                      "kernels here are not the exact ones the model reproduces (x86-64 with VNNI; see "
                      "lightning_hessian.quant.export); check the deployment machine the same way", UserWarning,
                      stacklevel=3)


def export_program(model: IntegerModel, example_input: Tensor, path: str | os.PathLike) -> Path:
    """Save ``model`` as a ``torch.export`` program (``torch.export.load(path).module()(x)`` runs it).

    Plain aten ops, so loading needs torch only; the batch dimension stays dynamic where it can.
    """
    program = torch.export.export(model.eval(), (example_input,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    path = Path(path)
    torch.export.save(program, path)
    return path
