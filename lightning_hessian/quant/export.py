"""Deployable exports of an ``IntegerModel`` that run without this package: ONNX (onnxruntime) or torch.export.

``export_onnx`` writes an ONNX graph made of integer operators only, between one float entry
(``Round(x / s)``, clipped, cast to int32) and one float exit (``Cast(n) * s``):

- conv / linear: ``MatMulInteger`` on uint8 codes with zero point 128 (the torch model's int8 GEMM codes
  plus 128), int8 weights, int32 accumulators, int32 bias; a convolution first gathers its im2col matrix
  in channels-last layout with ``Slice`` + ``Concat`` (``ConvInteger`` expresses it too, but onnxruntime's
  kernel measured ~10x slower than this form);
- requantization: int64 ``Mul`` by the mantissa, ``Add`` of the rounding constant, an arithmetic right shift
  and ``Clip``. ONNX ``BitShift`` is defined on unsigned types only, so the signed shift is done as
  ``((x + 2^62) >>> c) - 2^(62-c)`` in uint64, exact because ``|x| < 2^62`` and ``2^c`` divides ``2^62``;
- ReLU (``Relu`` on int32), reshapes, integer residual additions, and average pooling as ``ReduceSum``.

Every op is exact integer arithmetic with the same rounding as the torch model, so onnxruntime's
logits are bit-identical to ``IntegerModel``'s. The graph is recorded by running the model once, so
control flow is fixed by ``example_input`` (as in any tracing export); the batch dimension stays dynamic
where the model's reshapes keep it. ONNX has no direct form for arbitrary indexing or other ops the
model's forward code might apply; ``export_onnx`` then names the op and ``export_program`` (a
``torch.export`` program of the same integer model, loadable with plain torch) is the fallback.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_hessian.quant.integer import (
    IntegerAct,
    IntegerAvgPool,
    IntegerConv,
    IntegerLinear,
    IntegerModel,
    IntegerResidualAdd,
    Requantizer,
)
from lightning_hessian.quant.modules import IDENTITY_OPS, RELU_OPS, RESHAPE_OPS, TRANSPOSE_OPS

_LEAVES = (IntegerAct, IntegerConv, IntegerLinear, IntegerResidualAdd, IntegerAvgPool)



class _Recorder(TorchFunctionMode):
    """Records the torch functions the model's own forward code applies outside the integer modules."""

    def __init__(self):
        super().__init__()
        self.depth = 0
        self.events: list[tuple] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0 and isinstance(out, Tensor):
            self.events.append(("op", func, args, kwargs, out))
        return out


def _record(model: IntegerModel, codes: Tensor) -> tuple[list[tuple], Tensor]:
    recorder = _Recorder()

    def enter(module, args):
        recorder.depth += 1

    def leave(module, args, out):
        recorder.depth -= 1
        if recorder.depth == 0:
            recorder.events.append(("module", module, args, {}, out))

    handles = []
    for m in model.body.modules():
        if isinstance(m, _LEAVES):
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    try:
        with torch.no_grad(), recorder:
            out = model.body(codes)
    finally:
        for h in handles:
            h.remove()
    return recorder.events, out


class _Graph:
    """A small ONNX graph builder: named values, integer constants and nodes."""

    def __init__(self):
        import onnx
        from onnx import helper, numpy_helper

        self.onnx, self.helper, self.numpy_helper = onnx, helper, numpy_helper
        self.nodes, self.initializers, self.count = [], [], 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value: Tensor, hint: str = "c") -> str:
        name = self.name(hint)
        self.initializers.append(self.numpy_helper.from_array(value.detach().cpu().numpy(), name))
        return name

    def node(self, op: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op.lower())
        self.nodes.append(self.helper.make_node(op, inputs, [out], **attrs))
        return out

    def cast(self, x: str, dtype: str) -> str:
        return self.node("Cast", [x], to=getattr(self.onnx.TensorProto, dtype))

    def requantize(self, x: str, rq: Requantizer, add: int = 0) -> str:
        """int64 ``clamp((x * m + rounding) >> c) + add`` with the signed shift done on a 2^62-offset uint64."""
        shift = rq.shift.long()
        y = self.node("Mul", [self.cast(x, "INT64"), self.const(rq.mantissa.long(), "mantissa")])
        y = self.node("Add", [y, self.const(rq.rounding + (1 << 62), "rounding")])
        y = self.node("BitShift", [self.cast(y, "UINT64"), self.const(shift.to(torch.uint64), "shift")],
                      direction="RIGHT")
        y = self.node("Sub", [self.cast(y, "INT64"), self.const((1 << (62 - shift)) - add, "offset")])
        if rq.qmin is not None or rq.qmax is not None:
            y = self.node("Clip", [y, self.const(torch.tensor(rq.qmin + add)), self.const(torch.tensor(rq.qmax + add))])
        return y


def _codes_u8(g: _Graph, x: str, layer: IntegerConv | IntegerLinear) -> tuple[str, str]:
    """uint8 GEMM codes (the torch model's int8 codes + 128) and their zero point 128."""
    if layer.requant is None:
        y = g.node("Add", [g.cast(x, "INT64"), g.const(torch.tensor(128 - layer.offset))])
    else:
        y = g.requantize(x, layer.requant, add=128)
    return g.cast(y, "UINT8"), g.const(torch.tensor(128, dtype=torch.uint8), "zero_point")


def _im2col(g: _Graph, codes: str, m: IntegerConv, out_spatial: tuple[int, ...]) -> str:
    """Channels-last im2col with Slice + Concat, columns ordered (kernel..., channel) like ``m.weight``.

    (onnxruntime's ConvInteger kernel measured ~10x slower than this im2col + MatMulInteger.)
    """
    d = len(m.kernel_size)
    x = g.node("Transpose", [codes], perm=[0, *range(2, 2 + d), 1])
    if any(m.pad):
        begins, ends = m.pad[0::2][::-1], m.pad[1::2][::-1]
        real_zero = g.const(torch.tensor(128 - m.offset, dtype=torch.uint8), "pad_value")  # the code of 0.0
        x = g.node("Pad", [x, g.const(torch.tensor([0, *begins, 0, 0, *ends, 0])), real_zero])
    axes = g.const(torch.arange(1, 1 + d), "axes")
    steps = g.const(torch.tensor(m.stride), "steps")
    slices = []
    for offsets in itertools.product(*(range(k) for k in m.kernel_size)):
        starts = torch.tensor([o * dil for o, dil in zip(offsets, m.dilation)])
        ends = starts + torch.tensor([(n - 1) * s + 1 for n, s in zip(out_spatial, m.stride)])
        slices.append(g.node("Slice", [x, g.const(starts, "starts"), g.const(ends, "ends"), axes, steps]))
    return slices[0] if len(slices) == 1 else g.node("Concat", slices, axis=-1)


def _emit_module(g: _Graph, m: nn.Module, inputs: list[str], out: Tensor) -> str:
    if isinstance(m, IntegerAct):
        return inputs[0] if m.requant is None else g.cast(g.requantize(inputs[0], m.requant), "INT32")
    if isinstance(m, IntegerResidualAdd):
        a, b = (g.requantize(x, rq) for x, rq in zip(inputs, (m.requant_a, m.requant_b)))
        s = g.node("Clip", [g.node("Add", [a, b]), g.const(torch.tensor(m.qmin)), g.const(torch.tensor(m.qmax))])
        return g.cast(s, "INT32")
    if isinstance(m, IntegerAvgPool):
        shape = [0, 0]
        for o, s in zip(out.shape[2:], m.input_size):
            shape += [o, s // o]
        x = g.node("Reshape", [inputs[0], g.const(torch.tensor(shape))])
        axes = [3 + 2 * i for i in range(len(m.input_size))]
        return g.node("ReduceSum", [x, g.const(torch.tensor(axes))], keepdims=0)
    codes, zero = _codes_u8(g, inputs[0], m)
    if isinstance(m, IntegerConv):
        codes = _im2col(g, codes, m, tuple(out.shape[2:]))
    acc = g.node("Add", [g.node("MatMulInteger", [codes, g.const(m.weight, "weight"), zero]), g.const(m.bias, "bias")])
    if isinstance(m, IntegerConv):  # back to channels-first
        acc = g.node("Transpose", [acc], perm=[0, out.dim() - 1, *range(1, out.dim() - 1)])
    return acc


def _emit_op(g: _Graph, func, args: tuple, kwargs: dict, src: str, x: Tensor, out: Tensor) -> str:
    if func in IDENTITY_OPS:
        return src
    if func in RELU_OPS:
        return g.node("Relu", [src])
    if func in RESHAPE_OPS:
        shape = list(out.shape)
        if out.dim() and x.dim() and out.shape[0] == x.shape[0]:
            shape[0] = 0  # copy the (dynamic) batch dimension
        return g.node("Reshape", [src, g.const(torch.tensor(shape))])
    if func in TRANSPOSE_OPS:
        dims = [*args[1:], *(v for k, v in kwargs.items() if k != "input")]  # transpose(dim0=1, dim1=2) too
        if func in (torch.transpose, Tensor.transpose):
            perm = list(range(x.dim()))
            a, b = (d % x.dim() for d in dims)
            perm[a], perm[b] = perm[b], perm[a]
        else:
            dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
            perm = [d % x.dim() for d in dims]
        return g.node("Transpose", [src], perm=perm)
    name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
    raise NotImplementedError(f"export_onnx cannot express {name} applied in the model's forward code; "
                              "use export_program (torch.export) for this model")


def export_onnx(model: IntegerModel, example_input: Tensor, path: str | os.PathLike, opset: int = 17) -> Path:
    """Write ``model`` as an integer-operator ONNX graph to ``path`` (input ``"input"``, output ``"logits"``)."""
    import onnx

    model = model.eval()
    g = _Graph()
    codes = model.quantize_input(example_input)
    events, out = _record(model, codes)
    qmin, qmax = model.input_range
    x = g.node("Div", [g.cast("input", "DOUBLE"), g.const(model.input_scale, "input_scale")])
    x = g.node("Clip", [g.node("Round", [x]), g.const(torch.tensor(float(qmin), dtype=torch.float64)),
                        g.const(torch.tensor(float(qmax), dtype=torch.float64))])
    names = {id(codes): g.cast(x, "INT32")}  # ids stay unique: events hold every traced tensor
    for kind, obj, args, kwargs, result in events:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        missing = [t for t in tensors if id(t) not in names]
        if missing:
            what = type(obj).__name__ if kind == "module" else getattr(obj, "__name__", str(obj))
            raise NotImplementedError(f"export_onnx: {what} uses a tensor not produced by the traced graph "
                                      "(a constant created in forward?); use export_program")
        inputs = [names[id(t)] for t in tensors]
        if kind == "module":
            names[id(result)] = _emit_module(g, obj, inputs, result)
        else:
            names[id(result)] = _emit_op(g, obj, args, kwargs, inputs[0], tensors[0], result)
    if id(out) not in names:
        raise NotImplementedError("export_onnx: the model output is not produced by the traced integer graph")
    logits = g.cast(g.node("Mul", [g.cast(names[id(out)], "DOUBLE"), g.const(model.output_scale, "output_scale")]),
                    "FLOAT")
    g.nodes.append(g.helper.make_node("Identity", [logits], ["logits"]))
    batch = ["batch", *example_input.shape[1:]]
    graph = g.helper.make_graph(
        g.nodes, "integer_model",
        [g.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, batch)],
        [g.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", *out.shape[1:]])],
        initializer=g.initializers)
    proto = g.helper.make_model(graph, opset_imports=[g.helper.make_opsetid("", opset)],
                                producer_name="lightning_hessian")
    proto.ir_version = 8  # the oldest IR that carries opset 17, for older runtimes
    onnx.checker.check_model(proto)
    path = Path(path)
    onnx.save(proto, path)
    return path


def export_program(model: IntegerModel, example_input: Tensor, path: str | os.PathLike) -> Path:
    """Save ``model`` as a ``torch.export`` program (``torch.export.load(path).module()(x)`` runs it).

    Plain aten integer ops, so loading needs torch only; the batch dimension stays dynamic where it can.
    """
    program = torch.export.export(model.eval(), (example_input,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    path = Path(path)
    torch.export.save(program, path)
    return path
